"""Memory: what loading an export folder costs, against the bytes of its weights (`chattts-ort memory`)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .format import iter_graphs, read_manifest

_RSS_PROBE = r"""
import json, sys
args = json.loads(sys.argv[1])

def rss():  # (current, peak) resident set in bytes, from the kernel's own accounting
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                got[k] = int(v.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]

import numpy, onnxruntime as ort
if args["via"] == "runtime":
    from chattts_ort import Runtime
    from chattts_ort._native import core
    core()
before = rss()[0]
if args["via"] == "runtime":
    keep = Runtime.load(args["folder"], threads=1, max_context=args["max_context"], verify=False,
                        session_config=args["config"])
else:
    keep = []
    for path in args["files"]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        for k, v in args["config"].items():
            so.add_session_config_entry(k, v)
        keep.append(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
after, peak = rss()
print(json.dumps({"before": before, "after": after, "peak": peak}))
"""


@dataclass
class RSSReport:
    folder: Path
    via: str                 # "runtime" (the C++ core) or "ort" (one Python onnxruntime session per block)
    prepacking: bool
    weight_bytes: int        # sum of the folder's graph files
    rss_before: int          # resident bytes before loading (interpreter, onnxruntime)
    rss_after: int           # resident bytes with every block loaded
    peak_rss: int            # the high-water mark while loading

    @property
    def loaded_bytes(self) -> int:
        return self.rss_after - self.rss_before

    @property
    def ratio(self) -> float:
        """Resident bytes the loaded blocks hold, per byte of weights (goal <= 1.2)."""
        return self.loaded_bytes / self.weight_bytes

    @property
    def peak_ratio(self) -> float:
        return (self.peak_rss - self.rss_before) / self.weight_bytes

    def summary(self) -> str:
        return (f"{self.folder.name} via {self.via}, prepacking {'on' if self.prepacking else 'off'}: weights "
                f"{self.weight_bytes / 1e6:.1f} MB, loaded +{self.loaded_bytes / 1e6:.1f} MB resident "
                f"({self.ratio:.2f}x), peak while loading +{(self.peak_rss - self.rss_before) / 1e6:.1f} MB "
                f"({self.peak_ratio:.2f}x)")

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "via": self.via, "prepacking": self.prepacking,
                "weight_bytes": self.weight_bytes, "rss_before": self.rss_before, "rss_after": self.rss_after,
                "peak_rss": self.peak_rss, "ratio": self.ratio, "peak_ratio": self.peak_ratio}


def load_rss(folder, via: str = "runtime", disable_prepacking: bool = False, max_context: int = 16,
             timeout: float = 600) -> RSSReport:
    """Load every block of `folder` in a fresh subprocess and measure its resident memory (Linux /proc).

    via="runtime" loads through the C++ core (Runtime.load; max_context small, so the KV cache it allocates
    is negligible: 2 * layers * heads * max_context * head_dim * 4 bytes); via="ort" opens one Python
    onnxruntime session per block. disable_prepacking sets the session config "session.disable_prepacking"
    (ONNX Runtime otherwise re-lays-out MatMul weights at load into kernel-specific packed copies)."""
    if via not in ("runtime", "ort"):
        raise ValueError(f"via must be 'runtime' or 'ort', got {via!r}")
    if not Path("/proc/self/status").exists():
        raise RuntimeError("load_rss reads /proc/self/status (Linux only)")
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = [str(folder / e["file"]) for _, e in iter_graphs(manifest)]
    config = {"session.disable_prepacking": "1"} if disable_prepacking else {}
    args = {"folder": str(folder), "files": files, "via": via, "config": config, "max_context": int(max_context)}
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"load_rss: loading {folder} failed:\n{r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    weights = sum(Path(f).stat().st_size for f in files)
    return RSSReport(folder, via, not disable_prepacking, weights, got["before"], got["after"], got["peak"])
