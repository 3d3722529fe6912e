"""The package's shape: no import circle, no upward import (tools/import_graph.py), and a runtime that streams
with torch blocked."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import import_graph  # noqa: E402


def test_no_import_circle_and_no_upward_import():
    edges = import_graph.graph()
    assert len(edges) > 20 and "chattts_ort.runtime" in edges
    assert import_graph.cycles(edges) == []
    assert import_graph.upward(edges) == []
    # the root never reaches export/ or checks/ (only the CLI, the composition root, does)
    for mod, deps in edges.items():
        if import_graph.floor(mod) == 0:
            assert not [d for d in deps if import_graph.floor(d) > 0], mod
    assert not [d for d in edges["chattts_ort.export.exporter"] if d.startswith("chattts_ort.checks")]


def test_the_checker_sees_a_circle_and_an_upward_import():
    edges = {"chattts_ort.format": {"chattts_ort.runtime"}, "chattts_ort.runtime": {"chattts_ort.format"},
             "chattts_ort.export.model": {"chattts_ort.checks.verify"}, "chattts_ort.checks.verify": set()}
    assert import_graph.cycles(edges) == [["chattts_ort.format", "chattts_ort.runtime"]]
    assert import_graph.upward(edges) == [("chattts_ort.export.model", "chattts_ort.checks.verify")]


_BLOCKED = r"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import chattts_ort
from chattts_ort import InferCodeParams, Runtime
import chattts_ort.format, chattts_ort.memory, chattts_ort.defaults, chattts_ort.cli, chattts_ort.speaker
rt = Runtime.load(sys.argv[1], threads=1, max_context=64)
frames = list(rt.stream("hello world", params=InferCodeParams(max_new_token=8, min_new_token=8, manual_seed=0)))
assert len(frames) == 8, len(frames)
from chattts_ort.cli import main
assert main(["demo", "hello", "--model", sys.argv[1], "--frames", "4", "--threads", "1"]) == 0
try:
    import chattts_ort.export.model
except ImportError:
    print("torch blocked", flush=True)
"""


def test_runtime_streams_with_torch_blocked(tiny_export):
    r = subprocess.run([sys.executable, "-c", _BLOCKED, str(tiny_export)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch blocked" in r.stdout and "4 frames" in r.stdout
