"""Shared weights: what N processes serving one export cost together, and what sharing costs per step.

    python bench/shared_weights.py [--model full] [--precisions int8 int4 fp32] [--processes 4] [--reps 3]

For each precision: the export as quantized ("plain": weights inside each graph file, every process packs its own
copy at load) and its `chattts-ort share-weights` form ("shared": weights pre-packed in a data file per block that
every process maps). Memory: the summed PSS of 1 and of N processes holding the model at once
(chattts_ort.memory.shared_memory: Pss splits each shared page among the processes mapping it), and the ratio
N / 1 (the issue's goal: <= 1.5 at int8 for N = 4). Speed: decode ms/step (median of each run's median, p99),
plain and shared alternating in fresh subprocesses, and the load time. Results:
bench/results/DATE-shared-weights-MODEL.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_probe import decode_ms, write_results  # noqa: E402

def shared_for(export: str) -> str:
    from chattts_ort.export.quantize import share_weights_export

    out = Path(export).with_name(Path(export).name + "-shared")
    if not (out / "manifest.json").is_file():
        share_weights_export(export, out, force=True, progress=False)
    return str(out)


def main(argv=None) -> int:
    from streams import cpu_name, export_for

    from chattts_ort.memory import shared_memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precisions", nargs="+", default=["int8", "int4", "fp32"])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    stamp = datetime.now(timezone.utc)
    mb = lambda b: b / 2**20  # noqa: E731
    rows = []
    base = shared_memory(None, processes=1).pss_total
    for prec in args.precisions:
        plain = export_for(args.model, prec)
        forms = {"plain": plain, "shared": shared_for(plain)}
        for form, folder in forms.items():
            one, many = shared_memory(folder, 1), shared_memory(folder, args.processes)
            row = {"precision": prec, "form": form, "export": folder, "pss_1_mb": mb(one.pss_total),
                   f"pss_{args.processes}_mb": mb(many.pss_total), "ratio": many.pss_total / one.pss_total,
                   "rss_each_mb": mb(many.each[0]["rss"]), "private_each_mb": mb(many.each[0]["private"]),
                   "mapped_each_mb": mb(many.each[0].get("mapped_rss", 0)), "speed": []}
            rows.append(row)
            print(f"{prec} {form}: PSS 1 process {row['pss_1_mb']:.0f} MB, {args.processes} processes "
                  f"{row[f'pss_{args.processes}_mb']:.0f} MB ({row['ratio']:.2f}x); each: private "
                  f"{row['private_each_mb']:.0f} MB, mapped from the export {row['mapped_each_mb']:.0f} MB", flush=True)
        for _ in range(args.reps):  # the two forms alternate
            for row in rows[-2:]:
                row["speed"].append(decode_ms({"export": row["export"], "steps": args.steps, "threads": 2,
                                               "audio": False}))
        for row in rows[-2:]:
            row["ms_median"] = statistics.median(s["median"] for s in row["speed"])
            row["ms_p99"] = statistics.median(s["p99"] for s in row["speed"])
            row["load_s"] = statistics.median(s["load_s"] for s in row["speed"])
            print(f"{prec} {row['form']}: {row['ms_median']:.2f} ms/step (p99 {row['ms_p99']:.2f}), load "
                  f"{row['load_s']:.2f} s", flush=True)
    n = args.processes
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": cpu_name(), "model": args.model,
           "baseline_pss_mb": mb(base), "processes": n, "rows": rows,
           "command": "python bench/shared_weights.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"#### Shared weights ({args.model} model), {res['date']} on {res['machine']}", "",
             f"Command: `{res['command']}`. PSS summed over processes holding the model at once (GPT and audio "
             f"graphs, max_context 16); a process with no model (python, numpy, onnxruntime): {mb(base):.0f} MB. "
             f"ms/step: GPT decode, 2 threads, median of {args.reps} alternating runs.", "",
             f"| precision | export | PSS 1 process MB | PSS {n} processes MB | {n} / 1 | private per process MB "
             f"| mapped per process MB | ms/step | p99 | load s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['form']} | {r['pss_1_mb']:.0f} | {r[f'pss_{n}_mb']:.0f} | "
                     f"{r['ratio']:.2f} | {r['private_each_mb']:.0f} | {r['mapped_each_mb']:.0f} | "
                     f"{r['ms_median']:.2f} | {r['ms_p99']:.2f} | {r['load_s']:.2f} |")
    write_results(Path(args.out) / f"{stamp:%Y-%m-%d}-shared-weights-{args.model}", res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
