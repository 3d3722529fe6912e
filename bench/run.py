#!/usr/bin/env python
"""chattts-ort against its peers, in one run: decode ms/step, prefill, time to first frame, RTF, memory.

    python bench/run.py                 # full-shape random model, all systems and precisions (~12 min)
    python bench/run.py --quick         # a smoke run (< 3 min once the exports are cached): short contexts
    python bench/run.py --model tiny --systems chattts-ort,ort-python --precisions fp32 --out /tmp/b
    chattts-ort bench --quick           # the same, through the CLI

Systems: chattts-ort (the product), ort-python, torch-eager, chattts-0.2.5, onnxruntime-genai (see peers.py).

Every system runs in its own subprocess (so peak RSS is its own), and the repetitions alternate between
systems so that drift on a shared machine hits all of them alike. Results: <out>/<date>-<model>-<mode>.json
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
    """Runs one system in this process; returns a JSON-able dict of raw measurements.

    Load, one cold 2-frame run (its first frame: the time to first frame right after load), then
    `prefill_reps` 1-frame runs (warm time to first frame), then one `steps`-frame decode run."""
    import peers

    t0 = time.perf_counter()
    system = peers.make_system(args.system, export=args.export, model=args.model, threads=args.threads,
                               max_context=args.prompt_len + max(args.steps, 2) + 8)
    out = {"system": args.system, "precision": args.precision, "prompt_len": args.prompt_len, "steps": args.steps,
           "load_s": time.perf_counter() - t0, "rss_after_load_mb": _current_rss_mb()}

    def frames(n):
        tc, st = system.run(args.prompt_len, n)
        if len(st) != n:
            raise RuntimeError(f"{args.system}: {len(st)} frames instead of {n}")
        return tc, st

    tc, st = frames(2)
    out["cold_ttff_ms"] = (st[0] - tc) * 1000
    prefill = []
    for _ in range(args.prefill_reps):
        tc, st = frames(1)
        prefill.append((st[0] - tc) * 1000)
    step_ms = []
    if args.steps > 1:
        tc, st = frames(args.steps)
        prefill.append((st[0] - tc) * 1000)
        step_ms = (np.diff(st) * 1000).tolist()
        out["decode_prefill_ms"] = prefill[-1]
    out["prefill_ms"] = prefill
    out["step_ms"] = step_ms
    out["rss_peak_mb"] = _rss_mb()
    out["wall_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------------------ parent side


def machine_info() -> dict:
    cpu, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
            "python": platform.python_version(), "platform": platform.platform()}


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


SHORT_WINDOW = 100                 # "short context": the first 100 decode steps after a 30-token prompt
CONTEXT_WINDOWS = {"short": (31, 131), "500": (450, 550), "1500": (1450, 1530)}   # [lo, hi) context lengths
PY_LOOPS = ("ort-python", "torch-eager", "chattts-0.2.5")   # long runs only in the first repetition


def prepare(model: str, systems, precisions, log):
    """Export/quantize/build what each (system, precision) needs.
    Returns ({(system, precision): path}, {(system, precision): reason it cannot run})."""
    import peers
    from chattts_ort.defaults import cache_dir
    from chattts_ort.export.exporter import default_export

    targets, unavailable = {}, {}
    export = default_export(model, progress=False)
    log(f"export: {export}")
    for prec in precisions:
        path = export
        if prec != "fp32" and "chattts-ort" in systems:
            try:
                from chattts_ort.export.quantize import quantize_export

                path = cache_dir() / "exports" / f"{export.name}-{prec}"
                if not (path / "manifest.json").is_file():
                    log(f"quantizing {export.name} -> {prec}")
                    quantize_export(export, path, plan=prec, force=True, progress=False)
            except Exception as e:
                unavailable[("chattts-ort", prec)] = f"not available: quantize_export({prec}) failed: {e}"
                continue
        if "chattts-ort" in systems:
            targets[("chattts-ort", prec)] = str(path)
        if "ort-python" in systems and prec == "fp32":  # fp32 only: it shows the loop's cost, not the kernels'
            targets[("ort-python", prec)] = str(path)
    if "fp32" in precisions:
        if "torch-eager" in systems:
            targets[("torch-eager", "fp32")] = "torch"
        if "chattts-0.2.5" in systems:
            try:
                peers.chattts_modules()
                targets[("chattts-0.2.5", "fp32")] = "chattts"
            except Exception as e:
                unavailable[("chattts-0.2.5", "fp32")] = f"unavailable: {type(e).__name__}: {e}"
    if "onnxruntime-genai" in systems:
        ok, why = peers.genai_available()
        for prec in precisions:
            if not ok:
                unavailable[("onnxruntime-genai", prec)] = why
                continue
            try:
                hf = peers.save_llama_for_causal_lm(model, cache_dir() / "genai" / f"hf-{model}")
                out = cache_dir() / "genai" / f"{model}-{prec}"
                if not (out / "genai_config.json").is_file():
                    log(f"building onnxruntime-genai {model} {prec}")
                targets[("onnxruntime-genai", prec)] = str(peers.build_genai(hf, out, prec))
            except Exception as e:
                unavailable[("onnxruntime-genai", prec)] = f"{type(e).__name__}: {e}"
    return targets, unavailable


def run_worker(system, precision, path, model, prompt_len, steps, prefill_reps, threads, timeout=900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--precision", precision,
           "--export", str(path), "--model", model, "--prompt-len", str(prompt_len), "--steps", str(steps),
           "--prefill-reps", str(prefill_reps), "--threads", str(threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def window(step_lists, prompt_len, lo, hi):
    """Per-step times whose context length (prompt + frames so far) lies in [lo, hi), all runs together,
    or None when the runs do not reach hi. Step i (0-based) of step_ms attends over prompt_len + i + 1."""
    a, b = lo - prompt_len - 1, hi - prompt_len - 1
    if a < 0 or any(len(s) < b for s in step_lists):
        return None
    return np.concatenate([np.asarray(s[a:b]) for s in step_lists])


def summarize(raw: dict, long_prompt: int = 30) -> dict:
    """One result row from the raw worker outputs of one (system, precision): {phase: [runs]}."""
    short, p100, long_ = raw.get("short", []), raw.get("prefill100", []), raw.get("long", [])
    everything = short + p100 + long_
    dec = np.concatenate([np.asarray(r["step_ms"][:SHORT_WINDOW]) for r in short])
    s = {"decode_ms_median": float(np.median(dec)), "decode_ms_p90": float(np.percentile(dec, 90)),
         "short_window_steps": SHORT_WINDOW, "step_ms_per_rep": [r["step_ms"] for r in short]}
    s["frames_per_s"] = 1000.0 / s["decode_ms_median"]
    s["rtf"] = s["decode_ms_median"] / REAL_TIME_MS
    pf30 = [x for r in short for x in r["prefill_ms"]]
    s["prefill_30_ms"], s["prefill_30_ms_samples"] = float(np.median(pf30)), pf30
    if p100:
        pf100 = [x for r in p100 for x in r["prefill_ms"]]
        s["prefill_100_ms"], s["prefill_100_ms_samples"] = float(np.median(pf100)), pf100
    cold = [r["cold_ttff_ms"] for r in short + long_]
    s["cold_ttff_ms"], s["cold_ttff_ms_samples"] = float(np.median(cold)), cold
    loads = [r["load_s"] for r in everything]
    s["load_s"], s["load_s_samples"] = float(np.median(loads)), loads
    after = [r["rss_after_load_mb"] for r in everything]
    s["rss_after_load_mb"], s["rss_after_load_mb_samples"] = float(np.median(after)), after
    rss = [r["rss_peak_mb"] for r in everything]
    s["rss_peak_mb"], s["rss_peak_mb_samples"] = float(max(rss)), rss
    if long_:
        steps = [r["step_ms"] for r in long_]
        s["long_step_ms_per_rep"] = steps
        s["long_prefill_ms_per_rep"] = [r["decode_prefill_ms"] for r in long_]
        for name, (lo, hi) in CONTEXT_WINDOWS.items():
            w = window(steps, long_prompt, lo, hi)
            if w is not None:
                s[f"decode_ms_at_{name}"] = float(np.median(w))
        if "decode_ms_at_1500" in s:
            s["ratio_1500_vs_short"] = s["decode_ms_at_1500"] / s["decode_ms_at_short"]
        if all(len(x) >= 499 for x in steps):
            # a 500-frame utterance: first frame (prefill) + 499 decode steps, per frame, mean over runs
            per = [(p + sum(x[:499])) / 500 for p, x in zip(s["long_prefill_ms_per_rep"], steps)]
            s["ms_per_frame_500_utterance"] = float(np.mean(per))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, short contexts only (< 3 min)")
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--systems", default=None, help=f"comma list of {', '.join(SYSTEMS)} (default: all; "
                    f"--quick: all but chattts-0.2.5)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per system, alternating (default 2, quick 1)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--export", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=30, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=100, help=argparse.SUPPRESS)
    ap.add_argument("--prefill-reps", type=int, default=2, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `chattts-ort bench -- --quick ...` forwards the separator too
        argv = argv[1:]
    args = ap.parse_args(argv)
    if args.worker:
        args.system = args.worker
        print(json.dumps(worker(args)))
        return 0

    quick = args.quick
    default_systems = [s for s in SYSTEMS if not (quick and s == "chattts-0.2.5")]
    systems = [s for s in (args.systems.split(",") if args.systems else default_systems) if s]
    precisions = [p for p in args.precisions.split(",") if p]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; systems: {', '.join(SYSTEMS)}")
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}; precisions: {', '.join(PRECISIONS)}")
    reps = args.reps or (1 if quick else 2)
    t_begin = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_begin:6.1f}s] {m}", flush=True)  # noqa: E731

    from chattts_ort.config import GPTConfig

    max_pos = (GPTConfig.full() if args.model == "full" else GPTConfig.tiny()).max_position_embeddings
    # (name, prompt length, decode steps, warm 1-frame prefill runs)
    phases = [("short", 30, 40 if quick else 150, 1 if quick else 2), ("prefill100", 100, 1, 2 if quick else 4)]
    if not quick:
        phases.append(("long", 30, min(1500, max_pos - 30 - 8), 0))

    targets, unavailable = prepare(args.model, systems, precisions, log)
    jobs = list(targets)
    raw = {k: {p[0]: [] for p in phases} for k in jobs}
    for rep in range(reps):
        for label, plen, steps, prefill_reps in phases:
            for key in jobs:
                system, prec = key
                if key in unavailable or (label == "long" and system in PY_LOOPS and rep > 0):
                    continue
                try:
                    r = run_worker(system, prec, targets[key], args.model, plen, steps, prefill_reps, args.threads)
                except Exception as e:
                    unavailable[key] = f"failed ({label}, rep {rep}): {type(e).__name__}: {e}"
                    log(f"{system} {prec} {label}: FAILED: {e}")
                    continue
                raw[key][label].append(r)
                dec = f"decode median {np.median(r['step_ms']):.2f} ms, " if r["step_ms"] else ""
                log(f"{system:18s} {prec:5s} {label:10s} rep {rep}: {dec}first frame {np.median(r['prefill_ms']):.1f} ms "
                    f"(cold {r['cold_ttff_ms']:.1f}), load {r['load_s']:.1f} s, peak RSS {r['rss_peak_mb']:.0f} MB")
    results = {k: summarize(raw[k]) for k in jobs if k not in unavailable and raw[k]["short"]}

    report = build_report(args, systems, precisions, results, unavailable, time.perf_counter() - t_begin)
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


NOTES = [
    "Each (system, precision, phase, repetition) runs in its own subprocess (peak RSS = VmHWM of that process); "
    "the order is repetition > phase > system, so the systems alternate and drift hits all alike.",
    "Every run: load, a cold 2-frame run (cold TTFF = its first frame, right after load), warm 1-frame runs "
    "(prefill = time from the call to the first frame: prompt forward + first sample), then the decode run.",
    "decode ms/step: per-frame arrival intervals over the first 100 steps after a 30-token prompt (context 31-130), "
    "all repetitions pooled; @500 / @1500: steps whose context is 450-549 / 1450-1529 in one 1500-frame run "
    "(Python loops: first repetition only); @1500/short compares with context 31-130 of that same run.",
    "chattts-ort: Runtime.stream(text), the text chosen so the templated prompt has exactly the prompt length; "
    "each frame timed as the stream yields it. ort-python: the same graphs from Python (chattts_ort.ortloop), "
    "stamped when its sample-head session returns (fp32 only: it shows what the C++ loop buys).",
    "torch-eager: transformers LlamaModel (eager attention, DynamicCache) + ChatTTS sampling in PyTorch. "
    "chattts-0.2.5: ChatTTS's own GPT.generate(stream=True, stream_batch=1).",
    "onnxruntime-genai: model builder (-e cpu, int4_accuracy_level=4) on the same layer weights as a LlamaForCausalLM "
    "with one 626-way code book (embed = emb_code[0], lm_head = head_code[0]); greedy; append_tokens + "
    "generate_next_token per token. It runs one head and no repetition penalty/top-p/top-k: a lighter step.",
    "RTF = decode ms/step / 21.33 ms (46.875 audio frames per second); < 1 is faster than real time.",
]


def build_report(args, systems, precisions, results, unavailable, seconds) -> dict:
    rows = []
    for (system, prec), s in sorted(results.items(), key=lambda kv: (SYSTEMS.index(kv[0][0]), PRECISIONS.index(kv[0][1]))):
        row = {"system": system, "precision": prec, **s}
        genai = results.get(("onnxruntime-genai", prec))
        torch_ = results.get(("torch-eager", "fp32"))
        if genai:
            row["ratio_vs_genai"] = s["decode_ms_median"] / genai["decode_ms_median"]
            if "decode_ms_at_1500" in s and "decode_ms_at_1500" in genai:
                row["ratio_vs_genai_at_1500"] = s["decode_ms_at_1500"] / genai["decode_ms_at_1500"]
        if torch_:
            row["ratio_vs_torch"] = s["decode_ms_median"] / torch_["decode_ms_median"]
        rows.append(row)
    goals = []

    def goal(text, value, ok, why=None):
        g = {"goal": text, "value": None if value is None else round(value, 3), "met": ok}
        if why:
            g["not_measured"] = why
        goals.append(g)

    ours = {r["precision"]: r for r in rows if r["system"] == "chattts-ort"}
    for prec in precisions:
        if "chattts-ort" not in systems:
            break
        r = ours.get(prec)
        miss = unavailable.get(("chattts-ort", prec)) if r is None else None
        if "onnxruntime-genai" in systems:
            if r is not None and "ratio_vs_genai" in r:
                goal(f"{prec}: <= 0.8x onnxruntime-genai ms/step", r["ratio_vs_genai"], r["ratio_vs_genai"] <= 0.8)
            else:
                goal(f"{prec}: <= 0.8x onnxruntime-genai ms/step", None, None,
                     miss or unavailable.get(("onnxruntime-genai", prec), "not measured"))
        if r is not None and "ratio_1500_vs_short" in r:
            goal(f"{prec}: at 1500 frames of context <= 1.5x the short-context ms/step", r["ratio_1500_vs_short"],
                 r["ratio_1500_vs_short"] <= 1.5)
    if "chattts-ort" in systems and "int8" in precisions:
        r = ours.get("int8")
        if r is not None and "ms_per_frame_500_utterance" in r:
            v = r["ms_per_frame_500_utterance"]
            goal("int8: real time over a 500-frame utterance (mean <= 21.33 ms/frame, first frame included)", v,
                 v <= REAL_TIME_MS)
    if "fp32" in ours and "ratio_vs_torch" in ours["fp32"]:
        v = ours["fp32"]["ratio_vs_torch"]
        goal("fp32: >= 1.5x faster per step than PyTorch eager (ratio <= 0.667)", v, v <= 1 / 1.5)
    notes = list(NOTES)
    if args.model == "tiny":
        notes.insert(0, "tiny model (2 layers, 64 wide): per-call overheads dominate; the goals are about the full "
                     "model, and the tiny run checks the harness, not the speed")
    if args.quick:
        notes.insert(0, "quick mode: 40-step decode runs, short contexts only, one repetition"
                     + ("; chattts-0.2.5 left out by default" if not args.systems else ""))
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
            "model": args.model, "threads": args.threads, "systems": systems, "precisions": precisions,
            "machine": machine_info(), "versions": versions(), "seconds": seconds, "results": rows, "goals": goals,
            "unavailable": [{"system": s, "precision": p, "reason": str(e)} for (s, p), e in sorted(unavailable.items())],
            "notes": notes, "command": " ".join(["bench/run.py"] + sys.argv[1:])}


def _fmt(v, nd=2):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"   # small values: 3 significant digits
    return str(v)


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"### chattts-ort benchmark ({rep['mode']}, {rep['model']} model, {rep['threads']} threads)", "",
             f"{rep['date']} on {m['cpu']}, {m['cores']} cores (AVX2 {m['avx2']}, FMA {m['fma']}, AVX-512 {m['avx512f']}); "
             + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v) + f"; python {m['python']}", "",
             "| system | precision | decode ms/step (median) | p90 | vs genai | vs torch | first frame, 30 tok ms "
             "| 100 tok ms | cold first frame ms | frames/s | RTF | ms/step @500 | @1500 | @1500 / short | peak RSS MB | load s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        lines.append("| " + " | ".join([r["system"], r["precision"], _fmt(r["decode_ms_median"]), _fmt(r["decode_ms_p90"]),
                                       _fmt(r.get("ratio_vs_genai")), _fmt(r.get("ratio_vs_torch")),
                                       _fmt(r["prefill_30_ms"], 1), _fmt(r.get("prefill_100_ms"), 1),
                                       _fmt(r["cold_ttff_ms"], 1), _fmt(r["frames_per_s"], 1), _fmt(r["rtf"], 3),
                                       _fmt(r.get("decode_ms_at_500")), _fmt(r.get("decode_ms_at_1500")),
                                       _fmt(r.get("ratio_1500_vs_short")), _fmt(r["rss_peak_mb"], 0),
                                       _fmt(r["load_s"], 1)]) + " |")
    if rep["goals"]:
        caveat = "; quick mode: one short repetition, indicative only" if rep["mode"] == "quick" else ""
        lines += ["", f"Goals (chattts-ort{caveat}):", ""]
        for g in rep["goals"]:
            verdict = f"{g['value']} — {'met' if g['met'] else 'NOT met'}" if g["met"] is not None \
                else f"not measured ({g['not_measured']})"
            lines.append(f"- {g['goal']}: {verdict}")
    if rep["unavailable"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- {u['system']} {u['precision']}: {u['reason']}" for u in rep["unavailable"]]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(lines) + "\n"


def make_plots(rep: dict, out: Path, stem: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rep["results"]:
        series = r.get("long_step_ms_per_rep") or r["step_ms_per_rep"]
        n = min(len(x) for x in series)
        arr = np.median(np.array([x[:n] for x in series]), axis=0)
        k = 25 if n >= 100 else 5
        if n >= k:
            sm = np.convolve(arr, np.ones(k) / k, mode="valid")
            # step i attends over 30 + i + 1 positions; a centred moving mean shifts by k // 2
            ax.plot(np.arange(len(sm)) + 31 + k // 2, sm, label=f"{r['system']} {r['precision']}")
    ax.set_xlabel("context length (tokens: 30-token prompt + frames so far)")
    ax.set_ylabel("decode ms/step (moving mean, log scale)")
    ax.set_yscale("log")
    ax.axhline(REAL_TIME_MS, color="k", lw=0.8, ls="--", label="real time (21.3 ms)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"ms/step vs context, {rep['model']} model ({rep['machine']['cpu'][:40]}, {rep['threads']} threads)",
                 fontsize=9)
    fig.tight_layout()
    p = out / f"{stem}-context.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rep["results"])]
    precs = [p for p in PRECISIONS if any(r["precision"] == p for r in rep["results"])]
    w = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        vals = [next((r["decode_ms_median"] for r in rep["results"] if r["system"] == s and r["precision"] == p),
                     float("nan")) for p in precs]   # nan: not measured, no bar
        bars = ax.bar(np.arange(len(precs)) + i * w, vals, w, label=s)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.3g}" for v in vals], fontsize=6)
    ax.set_xticks(np.arange(len(precs)) + w * (len(systems) - 1) / 2)
    ax.set_xticklabels(precs)
    ax.set_ylabel("decode ms/step (median, short context, log scale)")
    ax.set_yscale("log")
    ax.axhline(REAL_TIME_MS, color="k", lw=0.8, ls="--", label="real time (21.3 ms)")
    ax.legend(fontsize=7)
    ax.set_title(f"ms/step per precision, {rep['model']} model, {rep['threads']} threads", fontsize=9)
    fig.tight_layout()
    p = out / f"{stem}-precision.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


if __name__ == "__main__":
    sys.exit(main())
