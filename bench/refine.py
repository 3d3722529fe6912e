"""What refining the text (`say --refine`, the server's refine_text, stream_audio(refine=...)) adds to first audio.

    python bench/refine.py [--model full|tiny] [--precision int8] [--refine-tokens 16 32 64] [--reps 5]

ChatTTS's infer() refines by default: before any code is sampled the GPT runs in text mode over
"[Sbreak]{text}[Pbreak]{prompt}" until [Ebreak]. That generation is serial with the codes, so its whole length is
added to the time to first audio. On real weights the refined text is about as long as the input plus a few tags;
the random default model never says [Ebreak] on cue, so the probe fixes the refinement's length
(min_new_token = max_new_token = N text tokens) and reports the added time per N, from one Runtime, in one
process, alternating the two kinds of run (first audio with refine N, then without), median of --reps.
Results: bench/results/DATE-refine-MODEL-PRECISION.{json,md}.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TEXT = "四川美食确实以辣闻名，但也有不辣的选择。"


def first_audio(rt, text, params, refine) -> float:
    t0 = time.perf_counter()
    for _ in rt.stream_audio(text, params=params, refine=refine):
        return time.perf_counter() - t0
    raise RuntimeError("no audio")


def main(argv=None) -> int:
    from decode_probe import write_results
    from granularity import export_for
    from streams import cpu_name

    from chattts_ort import InferCodeParams, RefineTextParams, Runtime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int8", choices=["fp32", "int8", "int4"])
    ap.add_argument("--refine-tokens", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    folder = export_for(args.model, 1, args.precision)
    rt = Runtime.load(folder, threads=args.threads)
    code = InferCodeParams(max_new_token=80, min_new_token=80, manual_seed=1)
    prompt_tokens = len(rt.tokenize(f"[Sbreak]{rt.prepare_text(TEXT)[0]}[Pbreak]"))
    first_audio(rt, TEXT, code, RefineTextParams(max_new_token=8, min_new_token=8))  # warm both modes
    rows = []
    for n in args.refine_tokens:
        refine = RefineTextParams(max_new_token=n, min_new_token=n, manual_seed=2)
        plain, refined = [], []
        for _ in range(args.reps):
            refined.append(first_audio(rt, TEXT, code, refine))
            plain.append(first_audio(rt, TEXT, code, None))
        a, b = statistics.median(plain), statistics.median(refined)
        rows.append({"refine_tokens": n, "first_audio_s": a, "first_audio_refined_s": b, "added_s": b - a,
                     "added_ms_per_token": 1000 * (b - a) / n, "plain_runs": plain, "refined_runs": refined})
        print(f"refine {n:3d} tokens: first audio {a:.3f} s -> {b:.3f} s (+{b - a:.3f} s, "
              f"{1000 * (b - a) / n:.1f} ms per refined token)", flush=True)
    rt.close()

    machine = f"{cpu_name()}, {platform.machine()}, threads {rt.threads}"
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
           "model": args.model, "precision": args.precision, "text": TEXT, "prompt_tokens": prompt_tokens,
           "reps": args.reps, "rows": rows}
    lines = [f"# What refining the text adds to first audio ({args.model}, {args.precision})", "",
             f"{res['date']}, {machine}; `python bench/refine.py --model {args.model} --precision "
             f"{args.precision}`; text {TEXT!r} ({prompt_tokens} prompt tokens in text mode); exact lookahead; "
             f"median of {args.reps} alternating runs.", "",
             "| refined tokens | first audio | with refine | added | per token |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['refine_tokens']} | {r['first_audio_s']:.3f} s | {r['first_audio_refined_s']:.3f} s | "
                     f"+{r['added_s']:.3f} s | {r['added_ms_per_token']:.1f} ms |")
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    write_results(HERE / "results" / f"{day}-refine-{args.model}-{args.precision}", res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
