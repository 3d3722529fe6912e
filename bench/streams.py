"""Parallel streams: N concurrent streams on one Runtime (batched step by step in the core), against the same
streams run one after another and against N separate Runtimes in N threads, in one run.

    python bench/streams.py [--model full|tiny] [--precision int4 ...] [--streams 1 2 4 8 16] [--frames 150]

Per scenario and N: aggregate frames/s, per-stream ms/step (median and p99 of the gaps between a stream's
frames), first-frame latency (all streams started together), and the first frame of a stream that joins N-1
running ones. Results: bench/results/DATE-streams-MODEL.{json,md,png}. Each scenario runs in its own
subprocess (fresh memory, one ONNX Runtime thread pool of --threads threads).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REALTIME_MS = 1000 / 46.875

_PROBE = r"""
import json, sys, threading, time
import numpy as np
args = json.loads(sys.argv[1])
from chattts_ort import InferCodeParams, Runtime
N, F, mode = args["n"], args["frames"], args["mode"]
texts = ["hello world, this is stream %d of the benchmark" % i for i in range(N)]
params = lambda i: InferCodeParams(max_new_token=F, min_new_token=F, manual_seed=i)
if mode == "batched":
    rts = [Runtime.load(args["export"], threads=args["threads"], max_context=512, max_streams=max(N, 2))] * N
elif mode == "separate":
    rts = [Runtime.load(args["export"], threads=args["threads"], max_context=512) for _ in range(N)]
else:
    rts = [Runtime.load(args["export"], threads=args["threads"], max_context=512)] * N
list(rts[0].stream("warm up", params=InferCodeParams(max_new_token=5, min_new_token=5)))
stamps = [[] for _ in range(N)]
starts = [0.0] * N

def run(i):
    starts[i] = time.perf_counter()
    for f in rts[i].stream(texts[i], params=params(i)):
        stamps[i].append(time.perf_counter())

t0 = time.perf_counter()
if mode == "sequential":
    for i in range(N):
        run(i)
else:
    ts = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    [t.start() for t in ts]
    [t.join() for t in ts]
wall = time.perf_counter() - t0
gaps = [np.diff(s) * 1000 for s in stamps]
allgaps = np.concatenate(gaps)
out = {"wall_s": wall, "frames": int(sum(len(s) for s in stamps)),
       "aggregate_fps": sum(len(s) for s in stamps) / wall,
       "ms_step_median": float(np.median(allgaps)), "ms_step_p99": float(np.percentile(allgaps, 99)),
       "first_frame_ms": [1000 * (s[0] - st) for s, st in zip(stamps, starts)]}
if mode == "batched" and N > 1:
    # A stream joining N-1 running ones: its first frame, measured from its call.
    rt = rts[0]
    go, ready = threading.Event(), threading.Barrier(N)
    def background(i):
        for j, f in enumerate(rt.stream(texts[i], params=InferCodeParams(max_new_token=F, min_new_token=F, manual_seed=i))):
            if j == 3:
                ready.wait()
    ts = [threading.Thread(target=background, args=(i,)) for i in range(N - 1)]
    [t.start() for t in ts]
    ready.wait()
    t1 = time.perf_counter()
    it = rt.stream("a stream that joins late", params=InferCodeParams(max_new_token=5, min_new_token=5))
    next(it)
    out["join_first_frame_ms"] = 1000 * (time.perf_counter() - t1)
    list(it)
    [t.join() for t in ts]
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
out["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(out))
"""


_IDENTITY = r"""
import json, sys, threading
import numpy as np
from chattts_ort import InferCodeParams, Runtime
args = json.loads(sys.argv[1])
N, steps = args["n"], args["steps"]
texts = ["hello world, this is stream %d" % i for i in range(N)]
rng = np.random.default_rng(0)
noise = [rng.exponential(size=(steps, 4, 626)).astype(np.float32) for _ in range(N)]
out = {}
for invariant in (False, True):
    for temp in (0.05, 0.3):
        p = InferCodeParams(max_new_token=steps, min_new_token=steps, temperature=temp)
        rt = Runtime.load(args["export"], threads=args["threads"], max_context=512, max_streams=N,
                          batch_invariant=invariant)
        alone = [rt.generate(texts[i], params=p, noise=noise[i]).codes[0] for i in range(N)]
        got = {}
        ts = [threading.Thread(target=lambda i=i: got.__setitem__(i, rt.generate(texts[i], params=p, noise=noise[i]).codes[0]))
              for i in range(N)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        rt.close()
        same = sum(int((alone[i] == got[i]).all(axis=1).sum()) for i in range(N))
        out[f"batch_invariant={invariant}, temperature={temp}"] = f"{same}/{N * steps}"
print(json.dumps(out))
"""


def identity(export: str, n: int, steps: int, threads: int) -> dict:
    """Frames of N concurrent streams identical to each stream run alone (same Runtime, same noise)."""
    args = {"export": export, "n": n, "steps": steps, "threads": threads}
    r = subprocess.run([sys.executable, "-c", _IDENTITY, json.dumps(args)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"identity check failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe(mode: str, export: str, n: int, frames: int, threads: int) -> dict:
    args = {"mode": mode, "export": export, "n": n, "frames": frames, "threads": threads}
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} N={n} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def export_for(model: str, precision: str) -> str:
    sys.path.insert(0, str(HERE))
    from chattts_ort.defaults import cache_dir
    from chattts_ort.export.exporter import default_export
    from chattts_ort.export.quantize import quantize_export

    export = default_export(model, progress=False)
    if precision == "fp32":
        return str(export)
    path = cache_dir() / "exports" / f"{export.name}-{precision}"
    if not (path / "manifest.json").is_file():
        quantize_export(export, path, plan=precision, force=True, progress=False)
    return str(path)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", nargs="+", default=["int4"])
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["batched", "sequential", "separate"])
    ap.add_argument("--max-separate", type=int, default=8, help="largest N for N separate Runtimes (N weight copies)")
    ap.add_argument("--identity", action="store_true",
                    help="only check that 4 concurrent streams equal their solo runs (200 steps), per precision")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    stamp = datetime.now(timezone.utc)
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": f"{cpu_name()}, {__import__('os').cpu_count()} cores",
           "model": args.model, "frames": args.frames, "threads": args.threads, "runs": []}
    if args.identity:
        for prec in args.precision:
            got = identity(export_for(args.model, prec), 4, 200, args.threads)
            print(f"{prec}: identical frames of 4 concurrent streams vs each alone: {got}", flush=True)
        return 0
    for prec in args.precision:
        export = export_for(args.model, prec)
        for n in args.streams:
            for mode in args.modes:
                if mode == "separate" and n > args.max_separate:
                    continue
                got = probe(mode, export, n, args.frames, args.threads)
                got.update(precision=prec, streams=n, mode=mode)
                res["runs"].append(got)
                print(f"{prec} N={n:2d} {mode:10s}: {got['aggregate_fps']:7.1f} frames/s, "
                      f"{got['ms_step_median']:6.2f} ms/step (p99 {got['ms_step_p99']:6.2f}), first frame "
                      f"{statistics.median(got['first_frame_ms']):7.1f} ms"
                      + (f", joining stream's first frame {got['join_first_frame_ms']:.1f} ms"
                         if "join_first_frame_ms" in got else ""), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stamp:%Y-%m-%d}-streams-{args.model}"
    Path(f"{base}.json").write_text(json.dumps(res, indent=2))
    Path(f"{base}.md").write_text(table(res))
    plot(res, Path(f"{base}.png"))
    print(table(res))
    return 0


def table(res: dict) -> str:
    lines = [f"#### Parallel streams ({res['model']} model, {res['frames']} frames per stream, {res['threads']} threads)",
             "", f"{res['date']} on {res['machine']}", "",
             "| precision | streams | mode | aggregate frames/s | vs sequential | ms/step median | p99 | every stream real time | first frame median ms | joining stream first frame ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    seq = {(r["precision"], r["streams"]): r["aggregate_fps"] for r in res["runs"] if r["mode"] == "sequential"}
    for r in res["runs"]:
        base = seq.get((r["precision"], r["streams"]))
        rt = "yes" if r["ms_step_median"] <= REALTIME_MS else "no"
        lines.append(f"| {r['precision']} | {r['streams']} | {r['mode']} | {r['aggregate_fps']:.1f} | "
                     f"{r['aggregate_fps'] / base:.2f}x | {r['ms_step_median']:.2f} | {r['ms_step_p99']:.2f} | {rt} | "
                     f"{statistics.median(r['first_frame_ms']):.1f} | "
                     f"{r.get('join_first_frame_ms', float('nan')):.1f} | {r['peak_rss_mb']:.0f} |"
                     if base else f"| {r['precision']} | {r['streams']} | {r['mode']} | {r['aggregate_fps']:.1f} | | "
                     f"{r['ms_step_median']:.2f} | {r['ms_step_p99']:.2f} | {rt} | "
                     f"{statistics.median(r['first_frame_ms']):.1f} | | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Real time = a stream's median gap between frames <= {REALTIME_MS:.2f} ms (46.875 frames/s). "
              "'sequential' runs the same streams one after another (its ms/step is one stream's); 'separate' runs "
              "N Runtimes (N copies of the weights) in N threads sharing one thread pool.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for prec in sorted({r["precision"] for r in res["runs"]}):
        for mode, style in (("batched", "-o"), ("sequential", "--s"), ("separate", ":^")):
            rs = [r for r in res["runs"] if r["precision"] == prec and r["mode"] == mode]
            if not rs:
                continue
            ns = [r["streams"] for r in rs]
            axes[0].plot(ns, [r["aggregate_fps"] for r in rs], style, label=f"{prec} {mode}")
            axes[1].plot(ns, [r["ms_step_median"] for r in rs], style, label=f"{prec} {mode}")
    axes[1].axhline(REALTIME_MS, color="k", lw=0.8, ls=":", label="real time")
    for ax, title in zip(axes, ("aggregate frames/s", "per-stream ms/step (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"chattts-ort parallel streams, {res['model']} model, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
