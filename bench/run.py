#!/usr/bin/env python
"""chattts-ort against its peers, in one run: decode ms/step, prefill, time to first frame, RTF, memory.

    python bench/run.py                 # full-shape random model, all systems and precisions (~10 min)
    python bench/run.py --quick         # a smoke run (< 3 min): short contexts, fewer steps
    python bench/run.py --model tiny --systems chattts-ort,ort-python --out /tmp/b

Every system runs in its own subprocess (so peak RSS is its own), and the repetitions alternate between
systems so that drift on a shared machine hits all of them alike. Results: bench/results/<date>-<mode>.json
and .md, plus PNG plots. Every number is measured in this run; a system that cannot run is listed with the
reason instead of a number.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FRAME_RATE = 46.875          # audio frames per second (24 kHz / 512)
REAL_TIME_MS = 1000 / FRAME_RATE
SYSTEMS = ("chattts-ort", "ort-python", "torch-eager", "chattts-0.2.5", "onnxruntime-genai")
PRECISIONS = ("fp32", "int8", "int4")


# ------------------------------------------------------------------------------------------------ worker side


def _rss_mb():
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited from the parent across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:  # pragma: no cover
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover
        return float("nan")


def worker(args) -> dict:
    """Runs one system once; prints a JSON dict."""
    import peers

    t0 = time.perf_counter()
    out = {"system": args.system, "precision": args.precision, "prompt_len": args.prompt_len, "steps": args.steps}
    if args.system == "chattts-ort":
        from chattts_ort import InferCodeParams, Runtime

        rt = Runtime.load(args.export, threads=args.threads, max_context=args.prompt_len + args.steps + 8, verify=False)
        out["load_s"] = time.perf_counter() - t0
        out["rss_after_load_mb"] = _current_rss_mb()
        rng = np.random.default_rng(0)
        prompt = [[21131, 21144, 21173] + rng.integers(1000, 20000, args.prompt_len - 4).tolist() + [21132]]
        params = InferCodeParams(max_new_token=args.steps, min_new_token=args.steps, manual_seed=0)
        stamps = []
        t_start = time.perf_counter()
        for _ in rt.stream_tokens(prompt, params=params):
            stamps.append(time.perf_counter())
        d = np.diff([t_start] + stamps) * 1000
        out.update(prefill_ms=float(d[0]), step_ms=d[1:].tolist())
    elif args.system == "ort-python":
        out.update(peers.measure_ort_python(args.export, args.prompt_len, args.steps, args.threads))
    elif args.system == "torch-eager":
        out.update(peers.measure_torch_eager(args.model, args.prompt_len, args.steps, args.threads))
    elif args.system == "chattts-0.2.5":
        out.update(peers.measure_chattts(args.model, args.prompt_len, args.steps, args.threads))
    elif args.system == "onnxruntime-genai":
        out.update(peers.measure_genai(args.export, args.prompt_len, args.steps, args.threads))
    else:
        raise SystemExit(f"unknown system {args.system}")
    out["rss_peak_mb"] = _rss_mb()
    out["wall_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------ parent side


def machine_info() -> dict:
    cpu, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not cpu.strip():
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "avx2": "avx2" in flags, "fma": "fma" in flags,
            "avx512f": "avx512f" in flags, "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    v = {}
    for mod, name in (("chattts_ort", "chattts-ort"), ("onnxruntime", "onnxruntime"), ("torch", "torch"),
                      ("transformers", "transformers"), ("onnxruntime_genai", "onnxruntime-genai"), ("numpy", "numpy")):
        try:
            m = __import__(mod)
            v[name] = getattr(m, "__version__", "?")
        except Exception:
            v[name] = None
    return v


def prepare(model: str, systems, precisions, log) -> dict:
    """Export/quantize/build what each (system, precision) needs; returns {(system, precision): path or error}."""
    import peers
    from chattts_ort.defaults import cache_dir, default_export

    targets = {}
    export = default_export(model, progress=False)
    log(f"export: {export}")
    for prec in precisions:
        path = export
        if prec != "fp32":
            from chattts_ort.quantize import quantize_export

            path = cache_dir() / "exports" / f"{export.name}-{prec}"
            if not (path / "manifest.json").is_file():
                quantize_export(export, path, plan=prec, force=True, progress=False)
        for s in ("chattts-ort", "ort-python"):
            if s in systems:
                targets[(s, prec)] = str(path) if (s == "chattts-ort" or prec == "fp32") else "skip"
    if "torch-eager" in systems:
        targets[("torch-eager", "fp32")] = "torch"
    if "chattts-0.2.5" in systems:
        try:
            peers.chattts_modules()
            targets[("chattts-0.2.5", "fp32")] = "chattts"
        except Exception as e:
            targets[("chattts-0.2.5", "fp32")] = RuntimeError(f"unavailable: {e}")
    if "onnxruntime-genai" in systems:
        ok, why = peers.genai_available()
        for prec in precisions:
            if not ok:
                targets[("onnxruntime-genai", prec)] = RuntimeError(why)
                continue
            try:
                hf = peers.save_llama_for_causal_lm(model, cache_dir() / "genai" / f"hf-{model}")
                targets[("onnxruntime-genai", prec)] = str(peers.build_genai(hf, cache_dir() / "genai" / f"{model}-{prec}", prec))
            except Exception as e:
                targets[("onnxruntime-genai", prec)] = e
    return {k: v for k, v in targets.items() if v != "skip"}


def run_worker(system, precision, path, model, prompt_len, steps, threads, timeout=900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--precision", precision,
           "--export", str(path), "--model", model, "--prompt-len", str(prompt_len), "--steps", str(steps),
           "--threads", str(threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(runs: list, windows) -> dict:
    """Median over repetitions of each measured quantity."""
    step = np.array([r["step_ms"] for r in runs])  # [reps, steps-1]
    s = {"decode_ms_median": float(np.median(step[:, : min(100, step.shape[1])])),
         "decode_ms_p90": float(np.percentile(step[:, : min(100, step.shape[1])], 90)),
         "step_ms_per_rep": [r["step_ms"] for r in runs],
         "prefill_ms": float(np.median([r["prefill_ms"] for r in runs])),
         "rss_peak_mb": float(max(r["rss_peak_mb"] for r in runs))}
    if "rss_after_load_mb" in runs[0]:
        s["rss_after_load_mb"] = float(np.median([r["rss_after_load_mb"] for r in runs]))
    s["frames_per_s"] = 1000.0 / s["decode_ms_median"]
    s["rtf"] = s["decode_ms_median"] / REAL_TIME_MS
    for w in windows:
        end = min(w, step.shape[1])  # step i runs at context prompt_len + i, so the last window ends near w
        if end >= w - 40:
            s[f"decode_ms_at_{w}"] = float(np.median(step[:, end - 20:end]))
    if step.shape[1] >= 499:
        s["mean_ms_500_frames"] = float(np.mean(step[:, :499]))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, short contexts (< 3 min)")
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per system (alternating)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--export", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=30, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=100, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.system = args.worker
        print(json.dumps(worker(args)))
        return 0

    systems = [s for s in args.systems.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; systems: {', '.join(SYSTEMS)}")
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}")
    quick = args.quick
    reps = args.reps or (1 if quick else 2)
    long_steps = 0 if quick else 1500        # decode at ~500 and ~1500 frames of context
    short_steps = 40 if quick else 150
    t_begin = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_begin:6.1f}s] {m}", flush=True)  # noqa: E731

    targets = prepare(args.model, systems, precisions, log)
    results = {}
    errors = {}
    for key, target in targets.items():
        if isinstance(target, Exception):
            errors[key] = str(target)
    jobs = [k for k, t in targets.items() if not isinstance(t, Exception)]
    # (label, prompt_len, steps): decode at short context (30-token prompt), prefill at 100 tokens, and long runs.
    phases = [("short", 30, short_steps), ("prefill100", 100, 3)]
    if long_steps:
        phases.append(("long", 30, long_steps))
    raw = {k: {p[0]: [] for p in phases} for k in jobs}
    for rep in range(reps):
        for label, plen, steps in phases:
            for key in jobs:
                system, prec = key
                if label == "long" and system in ("ort-python", "torch-eager", "chattts-0.2.5"):
                    continue  # Python loops at 1500 frames would take many minutes; short context shows them
                try:
                    r = run_worker(system, prec, targets[key], args.model, plen, steps, args.threads)
                    raw[key][label].append(r)
                    log(f"{system:18s} {prec:5s} {label:10s} rep {rep}: decode median "
                        f"{np.median(r['step_ms']) if r['step_ms'] else float('nan'):.2f} ms, prefill {r['prefill_ms']:.1f} ms")
                except Exception as e:
                    errors[key] = f"{label}: {e}"
                    log(f"{system} {prec} {label}: FAILED: {e}")
    for key in jobs:
        if key in errors or not raw[key]["short"]:
            continue
        s = summarize(raw[key]["short"], windows=())
        s["prefill_30_ms"] = s.pop("prefill_ms")
        if raw[key]["prefill100"]:
            s["prefill_100_ms"] = float(np.median([r["prefill_ms"] for r in raw[key]["prefill100"]]))
        if raw[key].get("long"):
            ls = summarize(raw[key]["long"], windows=(500, 1500))
            for k in ("decode_ms_at_500", "decode_ms_at_1500", "mean_ms_500_frames"):
                if k in ls:
                    s[k] = ls[k]
            s["long_step_ms_per_rep"] = ls["step_ms_per_rep"]
            s["rss_peak_mb"] = max(s["rss_peak_mb"], ls["rss_peak_mb"])
        results[key] = s

    report = build_report(args, results, errors, targets, time.perf_counter() - t_begin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}-{args.model}-{'quick' if quick else 'full'}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    plots = make_plots(report, out, stem)
    print(md)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {', '.join(map(str, plots))}" if plots else ""))
    return 0


def build_report(args, results, errors, targets, seconds) -> dict:
    rows = []
    for (system, prec), s in sorted(results.items()):
        row = {"system": system, "precision": prec, **s}
        genai = results.get(("onnxruntime-genai", prec))
        torch_ = results.get(("torch-eager", "fp32"))
        if genai:
            row["ratio_vs_genai"] = s["decode_ms_median"] / genai["decode_ms_median"]
        if torch_:
            row["ratio_vs_torch"] = s["decode_ms_median"] / torch_["decode_ms_median"]
        if "decode_ms_at_1500" in s:
            row["ratio_1500_vs_short"] = s["decode_ms_at_1500"] / s["decode_ms_median"]
        rows.append(row)
    goals = []
    ours = {r["precision"]: r for r in rows if r["system"] == "chattts-ort"}
    for prec, r in ours.items():
        if "ratio_vs_genai" in r:
            goals.append({"goal": f"{prec}: <= 0.8x onnxruntime-genai ms/step", "value": round(r["ratio_vs_genai"], 3),
                          "met": r["ratio_vs_genai"] <= 0.8})
        if "ratio_1500_vs_short" in r:
            goals.append({"goal": f"{prec}: at 1500 frames <= 1.5x short-context ms/step",
                          "value": round(r["ratio_1500_vs_short"], 3), "met": r["ratio_1500_vs_short"] <= 1.5})
    if "int8" in ours and "mean_ms_500_frames" in ours["int8"]:
        v = ours["int8"]["mean_ms_500_frames"]
        goals.append({"goal": "int8: real time over a 500-frame utterance (mean <= 21.3 ms/step)", "value": round(v, 2),
                      "met": v <= REAL_TIME_MS})
    if "fp32" in ours and "ratio_vs_torch" in ours["fp32"]:
        v = ours["fp32"]["ratio_vs_torch"]
        goals.append({"goal": "fp32: >= 1.5x faster per step than PyTorch eager (ratio <= 0.667)", "value": round(v, 3),
                      "met": v <= 1 / 1.5})
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
            "model": args.model, "threads": args.threads, "machine": machine_info(), "versions": versions(),
            "seconds": seconds, "results": rows, "goals": goals,
            "unavailable": [{"system": s, "precision": p, "reason": str(e)} for (s, p), e in errors.items()],
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def _fmt(v, nd=2):
    return "" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"### chattts-ort benchmark ({rep['mode']}, {rep['model']} model, {rep['threads']} threads)", "",
             f"{rep['date']} on {m['cpu']}, {m['cores']} cores (AVX2 {m['avx2']}, FMA {m['fma']}, AVX-512 {m['avx512f']}); "
             + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v), "",
             "| system | precision | decode ms/step (median) | p90 | vs genai | vs torch | prefill 30 tok ms | prefill 100 tok ms "
             "| frames/s | RTF | ms/step @500 | @1500 | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        lines.append("| " + " | ".join([r["system"], r["precision"], _fmt(r["decode_ms_median"]), _fmt(r["decode_ms_p90"]),
                                       _fmt(r.get("ratio_vs_genai")), _fmt(r.get("ratio_vs_torch")),
                                       _fmt(r.get("prefill_30_ms"), 1), _fmt(r.get("prefill_100_ms"), 1),
                                       _fmt(r["frames_per_s"], 1), _fmt(r["rtf"], 3), _fmt(r.get("decode_ms_at_500")),
                                       _fmt(r.get("decode_ms_at_1500")), _fmt(r["rss_peak_mb"], 0)]) + " |")
    if rep["goals"]:
        lines += ["", "Goals:", ""]
        lines += [f"- {g['goal']}: {g['value']} — {'met' if g['met'] else 'NOT met'}" for g in rep["goals"]]
    if rep["unavailable"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- {u['system']} {u['precision']}: {u['reason']}" for u in rep["unavailable"]]
    lines += ["", "RTF = decode ms/step / 21.33 ms (46.875 frames of audio per second); < 1 is faster than real time. "
              "Prefill = time to the first frame (prompt forward + first sample)."]
    return "\n".join(lines) + "\n"


def make_plots(rep: dict, out: Path, stem: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rep["results"]:
        series = r.get("long_step_ms_per_rep") or r["step_ms_per_rep"]
        arr = np.median(np.array(series), axis=0)
        k = 25
        if len(arr) >= k:
            sm = np.convolve(arr, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(sm)) + 30 + k, sm, label=f"{r['system']} {r['precision']}")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms/step (moving mean, log scale)")
    ax.set_yscale("log")
    ax.axhline(REAL_TIME_MS, color="k", lw=0.8, ls="--", label="real time")
    ax.legend(fontsize=7)
    ax.set_title(f"ms/step vs context ({rep['machine']['cpu'][:40]}, {rep['threads']} threads)", fontsize=9)
    fig.tight_layout()
    p = out / f"{stem}-context.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    fig, ax = plt.subplots(figsize=(7, 4))
    systems = sorted({r["system"] for r in rep["results"]})
    precs = [p for p in PRECISIONS if any(r["precision"] == p for r in rep["results"])]
    w = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        vals = [next((r["decode_ms_median"] for r in rep["results"] if r["system"] == s and r["precision"] == p), 0) for p in precs]
        ax.bar(np.arange(len(precs)) + i * w, vals, w, label=s)
    ax.set_xticks(np.arange(len(precs)) + w * (len(systems) - 1) / 2)
    ax.set_xticklabels(precs)
    ax.set_ylabel("decode ms/step (median, short context)")
    ax.axhline(REAL_TIME_MS, color="k", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / f"{stem}-precision.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


if __name__ == "__main__":
    sys.exit(main())
