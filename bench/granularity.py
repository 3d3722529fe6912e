"""Block granularity: decode ms/step with N decoder layers per layer graph (export --layers-per-graph N).

    python bench/granularity.py [--model full] [--layers-per-graph 1 2 5 20] [--precisions fp32 int8 int4]
                                [--reps 3] [--steps 200]

Each N is exported once (the random default weights, fused form) and quantized per precision; every (N,
precision) runs in a fresh subprocess (2 threads, the default spinning policy), the N alternating within each
repetition so that a slow minute of the shared machine hits every N alike. Reported: the median over repetitions of
each run's median ms/step and p99, and the ratio to N = 1 in the same run. Results:
bench/results/DATE-granularity-MODEL.{json,md}.
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

def export_for(model: str, n: int, precision: str) -> str:
    from chattts_ort.defaults import cache_dir
    from chattts_ort.export.exporter import default_export, export_model
    from chattts_ort.export.quantize import quantize_export

    base = default_export(model)  # N = 1, the default export
    fp32 = base if n == 1 else cache_dir() / "exports" / f"{base.name}-lpg{n}"
    if not (Path(fp32) / "manifest.json").is_file():
        export_model("random" if model == "full" else "random-tiny", fp32, force=True, progress=False,
                     layers_per_graph=n)
    if precision == "fp32":
        return str(fp32)
    out = Path(fp32).with_name(Path(fp32).name + f"-{precision}")
    if not (out / "manifest.json").is_file():
        quantize_export(fp32, out, plan=precision, force=True, progress=False)
    return str(out)


def main(argv=None) -> int:
    from streams import cpu_name

    from chattts_ort.format import read_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--layers-per-graph", nargs="+", type=int, default=[1, 2, 5, 20])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    stamp = datetime.now(timezone.utc)
    rows = []
    for prec in args.precisions:
        exports = {n: export_for(args.model, n, prec) for n in args.layers_per_graph}
        runs = {n: [] for n in exports}
        for _ in range(args.reps):
            for n, folder in exports.items():
                runs[n].append(decode_ms({"export": folder, "steps": args.steps, "threads": 2, "audio": False}))
        base = statistics.median(x["median"] for x in runs[min(runs)])
        for n, xs in runs.items():
            row = {"precision": prec, "layers_per_graph": n,
                   "graphs": len(read_manifest(exports[n])["graphs"]["layers"]),
                   "ms_median": statistics.median(x["median"] for x in xs),
                   "ms_p99": statistics.median(x["p99"] for x in xs), "runs": xs}
            row["vs_n1"] = row["ms_median"] / base
            rows.append(row)
            print(f"{prec} N={n:2d}: {row['ms_median']:.2f} ms/step (p99 {row['ms_p99']:.2f}), "
                  f"{row['vs_n1']:.3f}x N={min(runs)}", flush=True)
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": cpu_name(), "model": args.model, "rows": rows,
           "command": "python bench/granularity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"#### Layers per graph ({args.model} model), {res['date']} on {res['machine']}", "",
             f"Command: `{res['command']}`. Decode ms/step, 2 threads, median of {args.reps} alternating runs.", "",
             "| precision | layers per graph | layer graphs | ms/step | p99 | vs 1 per graph |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['layers_per_graph']} | {r['graphs']} | {r['ms_median']:.2f} | "
                     f"{r['ms_p99']:.2f} | {r['vs_n1']:.3f} |")
    write_results(Path(args.out) / f"{stamp:%Y-%m-%d}-granularity-{args.model}", res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
