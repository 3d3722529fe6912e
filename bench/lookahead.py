"""Lookahead against exactness: the streamed audio at each lookahead against the exact stream (which equals the
whole-utterance decode), on the same frames, with the audio path's time per emitted chunk.

    python bench/lookahead.py [--model full|tiny] [--precision int4] [--frames 300] [--lookahead 0 4 8 ...]

Prints a markdown table (max abs error, error relative to the peak, SNR in dB, flushes, audio graph time per
second of audio) and writes bench/results/DATE-lookahead-MODEL.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from streams import cpu_name, export_for  # noqa: E402

    from chattts_ort import InferCodeParams, Runtime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--lookahead", nargs="+", type=int, default=[0, 4, 8, 16, 24, 32, 40, 48, 52])
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    stamp = datetime.now(timezone.utc)
    rt = Runtime.load(export_for(args.model, args.precision), threads=2)
    p = InferCodeParams(max_new_token=args.frames, min_new_token=args.frames, manual_seed=11)
    text = "chattts-ort speaks from a native core, as the words are sampled."

    def run(L):
        s0 = rt.audio_stats()
        wav = np.concatenate([c.samples for c in rt.stream_audio(text, params=p, lookahead=L, chunk_frames=args.chunk)])
        s1 = rt.audio_stats()
        return wav, s1["flushes"] - s0["flushes"], (s1["step_ms"] + s1["flush_ms"] - s0["step_ms"] - s0["flush_ms"])

    exact, _, _ = run(rt.exact_lookahead)
    peak = float(np.abs(exact).max())
    lines = [f"# Lookahead against exactness ({stamp:%Y-%m-%d})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores. Model: random weights, {args.model} shape, GPT "
             f"{args.precision}, audio fp32; {args.frames} frames ({args.frames * 512 / 24000:.1f} s), chunk "
             f"{args.chunk} frames; reference: the exact stream (lookahead {rt.exact_lookahead}, equal to the whole "
             f"decode). Peak |x| {peak:.3f}. Command: `python bench/lookahead.py {' '.join(argv or sys.argv[1:])}`",
             "", "| lookahead (frames) | ms of audio | max abs error | / peak | SNR dB | flushes | audio graphs ms per s of audio |",
             "|---|---|---|---|---|---|---|"]
    for L in args.lookahead:
        wav, flushes, ms = run(L)
        err = wav - exact
        snr = 10 * np.log10(np.sum(exact ** 2) / max(np.sum(err ** 2), 1e-30))
        lines.append(f"| {L} | {L * 512 / 24:.0f} | {np.abs(err).max():.2e} | {np.abs(err).max() / peak:.1e} | "
                     f"{min(snr, 999):.1f} | {flushes} | {ms / (len(exact) / 24000):.0f} |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp:%Y-%m-%d}-lookahead-{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
