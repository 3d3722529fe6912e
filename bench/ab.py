"""A/B of two builds of chattts-ort on decode ms/step, alternating in one run (the machine is shared and noisy:
only a same-run ratio means anything).

    python bench/ab.py --a /path/to/other/python --a-core /path/to/_core.so --export DIR [--export DIR2 ...]

`--a` is the `python/` folder of another checkout (e.g. `git worktree add /tmp/old REV`) and `--a-core` its
built extension; B is the package installed in this environment. Each repetition runs A and B in fresh
subprocesses, one after the other, on the same export and thread count; the report is the median over
repetitions of each side's median ms/step, and B/A.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import json, sys, time
args = json.loads(sys.argv[1])
if args["pkg"]:
    # Run another checkout: drop the editable-install finder of this environment, then import from there.
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                     and "scikit" not in type(f).__name__.lower()]
    sys.path.insert(0, args["pkg"])
    import importlib.util
    import chattts_ort
    spec = importlib.util.spec_from_file_location("chattts_ort._core", args["core"])
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    sys.modules["chattts_ort._core"] = core
    chattts_ort._core = core
import chattts_ort
from chattts_ort import InferCodeParams, Runtime
rt = Runtime.load(args["export"], threads=args["threads"], max_context=1024)
n = args["steps"]
p = InferCodeParams(max_new_token=n, min_new_token=n, manual_seed=0)
list(rt.stream("warm up the caches", params=InferCodeParams(max_new_token=20, min_new_token=20, manual_seed=1)))
times, last = [], None
for f in rt.stream("hello world, this is a test of the runtime", params=p):
    now = time.perf_counter()
    if last is not None:
        times.append(now - last)
    last = now
times = sorted(times[5:])
print(json.dumps({"median_ms": 1000 * times[len(times) // 2], "file": chattts_ort.__file__}))
"""


def run_one(pkg: str, core: str, export: str, threads: int, steps: int) -> dict:
    args = {"pkg": pkg, "core": core, "export": export, "threads": threads, "steps": steps}
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"probe failed ({'A' if pkg else 'B'}, {export}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="python/ folder of the other checkout")
    ap.add_argument("--a-core", required=True, help="its built _core extension")
    ap.add_argument("--export", action="append", required=True, help="export folder(s) to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    result = {}
    for export in args.export:
        a, b = [], []
        for rep in range(args.reps):
            order = [("A", args.a, args.a_core), ("B", "", "")]
            if rep % 2:
                order.reverse()
            for side, pkg, core in order:
                got = run_one(pkg, core, export, args.threads, args.steps)
                (a if side == "A" else b).append(got["median_ms"])
                print(f"{Path(export).name} rep {rep} {side}: {got['median_ms']:.2f} ms/step ({got['file']})",
                      flush=True)
        ma, mb = statistics.median(a), statistics.median(b)
        result[export] = {"A_ms": a, "B_ms": b, "A_median": ma, "B_median": mb, "B_over_A": mb / ma}
        print(f"{Path(export).name}: A {ma:.2f} ms/step, B {mb:.2f} ms/step, B/A {mb / ma:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
