"""Decode ms/step (median, p99) with 0, 1, 2 CPU-bound processes at the same priority beside the measured one
(what an audio decoder, a web server or a UI thread is to a real-time app), for each thread policy.

    python bench/under_load.py [--model full] [--precision int4] [--competitors 0 1 2] [--reps 2]

Policies: threads 1 or 2, thread-pool spinning on or off, and "auto" (Runtime.load's default: spinning decided
at load from how busy the other processes keep the CPUs). Each measurement is a fresh subprocess (the thread
pool is fixed per process). Results: bench/results/DATE-under-load-MODEL-PRECISION.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_PROBE = r"""
import json, sys, time
import numpy as np
from chattts_ort import InferCodeParams, Runtime
a = json.loads(sys.argv[1])
rt = Runtime.load(a["export"], threads=a["threads"], spin=a["spin"], max_context=512)
list(rt.stream("warm up", params=InferCodeParams(max_new_token=10, min_new_token=10)))
gaps, last = [], None
for f in rt.stream("hello world, this is a test", params=InferCodeParams(max_new_token=a["steps"], min_new_token=a["steps"], manual_seed=0)):
    now = time.perf_counter()
    if last is not None:
        gaps.append(now - last)
    last = now
g = np.array(gaps[5:]) * 1000
print(json.dumps({"median": float(np.median(g)), "p99": float(np.percentile(g, 99)), "threads": rt.threads,
                  "spinning": rt.spinning}))
"""
_HOG = "while True:\n    pass\n"
POLICIES = {"2 threads, spin": (2, True), "2 threads, no spin": (2, False), "1 thread, spin": (1, True),
            "1 thread, no spin": (1, False), "auto (default)": (None, None)}


def main(argv=None) -> int:
    from streams import cpu_name, export_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--competitors", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    export = export_for(args.model, args.precision)
    stamp = datetime.now(timezone.utc)
    rows = []
    for n in args.competitors:
        hogs = [subprocess.Popen([sys.executable, "-c", _HOG]) for _ in range(n)]
        time.sleep(0.5)
        try:
            got = {name: [] for name in POLICIES}
            for _ in range(args.reps):  # policies alternate within each repetition
                for name, (threads, spin) in POLICIES.items():
                    a = {"export": export, "threads": threads, "spin": spin, "steps": args.steps}
                    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(a)], capture_output=True, text=True,
                                       timeout=900)
                    if r.returncode != 0:
                        raise RuntimeError(r.stderr[-2000:])
                    got[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
        finally:
            for h in hogs:
                h.kill()
        for name, ds in got.items():
            row = {"competitors": n, "policy": name, "median_ms": statistics.median(d["median"] for d in ds),
                   "p99_ms": statistics.median(d["p99"] for d in ds), "runs": ds}
            rows.append(row)
            print(f"{n} competitors, {name:18s}: median {row['median_ms']:6.2f} ms/step, p99 {row['p99_ms']:6.2f}"
                  f" (auto chose threads {ds[0]['threads']}, spin {ds[0]['spinning']})" if name.startswith("auto")
                  else f"{n} competitors, {name:18s}: median {row['median_ms']:6.2f} ms/step, p99 {row['p99_ms']:6.2f}",
                  flush=True)
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": cpu_name(), "model": args.model,
           "precision": args.precision, "steps": args.steps, "reps": args.reps, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stamp:%Y-%m-%d}-under-load-{args.model}-{args.precision}"
    Path(f"{base}.json").write_text(json.dumps(res, indent=2))
    lines = [f"#### Under load ({args.model} model, {args.precision}), {res['date']} on {res['machine']}", "",
             "| CPU-bound competitors | policy | ms/step median | p99 |", "|---|---|---|---|"]
    lines += [f"| {r['competitors']} | {r['policy']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} |" for r in rows]
    Path(f"{base}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
