"""bench/run.py --quick on the tiny model: the results file has the promised structure, every number measured."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_quick_bench_structure(tmp_path, tiny_export):
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--model", "tiny",
           "--systems", "chattts-ort,ort-python,torch-eager", "--precisions", "fp32,int8", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    rep = json.loads(files[0].read_text())
    assert rep["mode"] == "quick" and rep["model"] == "tiny" and rep["machine"]["cores"] >= 1
    assert rep["versions"]["onnxruntime"] and rep["versions"]["chattts-ort"]
    got = {(x["system"], x["precision"]) for x in rep["results"]}
    assert {("chattts-ort", "fp32"), ("chattts-ort", "int8"), ("ort-python", "fp32"), ("torch-eager", "fp32")} <= got
    for row in rep["results"]:
        steps = np.array(row["step_ms_per_rep"])
        assert steps.ndim == 2 and steps.shape[1] >= 10 and (steps > 0).all()
        # the reported median is the median of the measured per-step times
        assert math.isclose(row["decode_ms_median"], float(np.median(steps[:, :100])), rel_tol=1e-9)
        for k in ("decode_ms_median", "decode_ms_p90", "prefill_30_ms", "prefill_100_ms", "frames_per_s", "rtf",
                  "rss_peak_mb"):
            assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0, (row["system"], k)
        assert row["ratio_vs_torch"] > 0
    assert any(g["goal"].startswith("fp32: >= 1.5x") for g in rep["goals"])
    assert (out / files[0].name.replace(".json", "-precision.png")).is_file()
