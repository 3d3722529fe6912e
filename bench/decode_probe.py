"""The decode-step probe the benchmark scripts share: load an export in a fresh process (the thread pool is fixed
per process), warm up, stream N frames and report the median and p99 of the gaps between frames (ms/step), and
the load time; and the writer of a result pair (JSON + Markdown) under bench/results/.

    from decode_probe import decode_ms, write_results
    decode_ms({"export": DIR, "steps": 200, "threads": 2, "spin": None, "audio": False})
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import json, sys, time
import numpy as np
from chattts_ort import InferCodeParams, Runtime
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
rt = Runtime.load(a["export"], threads=a.get("threads"), spin=a.get("spin"), max_context=512, audio=a.get("audio"))
load = time.perf_counter() - t0
list(rt.stream("warm up", params=InferCodeParams(max_new_token=10, min_new_token=10)))
gaps, last = [], None
for f in rt.stream("hello world, this is a test", params=InferCodeParams(max_new_token=a["steps"], min_new_token=a["steps"], manual_seed=0)):
    now = time.perf_counter()
    if last is not None:
        gaps.append(now - last)
    last = now
g = np.array(gaps[5:]) * 1000
print(json.dumps({"median": float(np.median(g)), "p99": float(np.percentile(g, 99)), "threads": rt.threads,
                  "spinning": rt.spinning, "load_s": load}))
"""


def decode_ms(args: dict, probe: str = _PROBE, timeout: float = 900) -> dict:
    """Run PROBE (default: chattts-ort's decode probe) with ARGS in a fresh Python; its last stdout line as JSON."""
    r = subprocess.run([sys.executable, "-c", probe, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_results(stem: Path, res: dict, lines: list) -> None:
    """STEM.json (res) and STEM.md (lines), then the Markdown on stdout."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2))
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
