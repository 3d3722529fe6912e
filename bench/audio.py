"""Speech out: chattts-ort's streamed audio (Runtime.stream_audio) against ChatTTS 0.2.5's stream mode on the same
random weights, in one run, for utterances of several lengths.

    python bench/audio.py [--model full|tiny] [--precision int4] [--seconds 5 10 20] [--lookahead 52 24]

Per system and length: time to the first audio sample (from the call), total time, end-to-end real-time factor
(GPT and audio together; < 1 is faster than real time), and the CPU time of the run against the same frames made
without audio (the audio path's share). chattts-ort also reports its audio graphs' own time (audio RTF).
Lengths are fixed frame counts (min_new_token = max_new_token), so both systems make the same amount of audio.

ChatTTS's stream mode (`Chat.infer(stream=True)`) cannot be imported here (its package imports torchaudio, which
has no build for this torch), so the probe runs ChatTTS's own modules — GPT.generate(stream=True,
stream_batch=24), its DVAE Decoder, vocos's backbone and ISTFT head — under the loop of ChatTTS 0.2.5's
`Chat._infer` as written there: at every yield (24 frames) it decodes the whole prefix, skips the first
`pass_first_n_batches` (2) yields, and emits at most `stream_speed` (12000) new samples per yield, the rest at the
end. Each system and length runs in its own subprocess. Results: bench/results/DATE-audio-MODEL.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAMES_PER_S = 24000 / 512

_ORT = r"""
import json, resource, sys, time
import numpy as np
from chattts_ort import InferCodeParams, Runtime
a = json.loads(sys.argv[1])
rt = Runtime.load(a["export"], threads=a["threads"], audio_threads=a["audio_threads"])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
P = lambda n, s: InferCodeParams(max_new_token=n, min_new_token=n, manual_seed=s)
list(rt.stream_audio("warm up", params=P(60, 1)))
out = {"runs": []}
for rep in range(a["repeats"]):
    s0, c0 = rt.audio_stats(), cpu()
    t0 = time.perf_counter(); first = None; n = 0
    for ch in rt.stream_audio(a["text"], params=P(a["frames"], 7 + rep), lookahead=a["lookahead"]):
        if first is None:
            first = time.perf_counter() - t0
        n += len(ch.samples)
    wall, c1, s1 = time.perf_counter() - t0, cpu(), rt.audio_stats()
    t1 = time.perf_counter()
    for f in rt.stream(a["text"], params=P(a["frames"], 7 + rep)):
        pass
    wall_codes, c2 = time.perf_counter() - t1, cpu()
    audio_ms = (s1["step_ms"] - s0["step_ms"]) + (s1["flush_ms"] - s0["flush_ms"])
    out["runs"].append({"first_s": first, "wall_s": wall, "samples": n, "cpu_s": c1 - c0, "wall_codes_s": wall_codes,
                        "cpu_codes_s": c2 - c1, "audio_graph_s": audio_ms / 1000})
print(json.dumps(out))
"""

_CHATTTS = r"""
import importlib.util, json, logging, resource, sys, time, types
from pathlib import Path
import numpy as np, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from chattts_ort.checks.audio_reference import load_reference
from chattts_ort.export.sources import random_asset_folder
folder = random_asset_folder(a["model"])
cfg = json.loads((folder / "gpt" / "config.json").read_text())
ref, why = load_reference(folder, cfg["hidden_size"])
if ref is None:
    print(json.dumps({"skipped": why})); sys.exit(0)
from ChatTTS.model.embed import Embed
from ChatTTS.model.gpt import GPT
from ChatTTS.model.processors import gen_logits
from chattts_ort.tokenizer import Tokenizer
logging.getLogger("ChatTTS").setLevel(logging.ERROR)
embed = Embed(cfg["hidden_size"], cfg["num_audio_tokens"], cfg["num_text_tokens"], cfg["num_vq"])
embed.load_pretrained(str(folder / "Embed.safetensors"), torch.device("cpu"))
gpt = GPT(cfg, embed)
gpt.load_pretrained(str(folder / "gpt"), str(folder / "Embed.safetensors"))
gpt.prepare()
tok = Tokenizer(folder / "tokenizer" / "tokenizer.json")
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def decode(x):  # Chat._decode_to_wavs: the whole prefix [1, 768, T] through the Decoder, then Vocos
    return ref.vocos(ref.decoder(x)).numpy()
def run(frames, seed, stream_batch=24, pass_first=2, speed=12000):
    ids = tok.encode("[Stts][empty_spk][speed_5]" + a["text"] + "[Ptts]")
    inp = torch.tensor(ids)[None, :, None].expand(1, len(ids), cfg["num_vq"]).clone()
    emb = embed(inp, torch.ones(1, len(ids), dtype=torch.bool))
    warpers, procs = gen_logits(cfg["num_audio_tokens"] - 1, top_P=0.7, top_K=20, repetition_penalty=1.05)
    t0 = time.perf_counter(); first = None; length = 0; n = 0; batches = 0
    gen = gpt.generate(emb, inp, temperature=torch.tensor([0.3] * cfg["num_vq"]), eos_token=cfg["num_audio_tokens"] - 1,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.bool), max_new_token=frames,
                       min_new_token=frames, logits_processors=(*procs, *warpers), show_tqdm=False,
                       manual_seed=seed, stream=True, stream_batch=stream_batch, return_hidden=True)
    for result in gen:
        h = result.hiddens[0]
        wavs = decode(h.permute(1, 0)[None]) if h.numel() else np.zeros((1, 0), np.float32)
        batches += 1
        if batches <= pass_first:
            continue
        b = min(length + speed, wavs.shape[1])
        new = wavs[:, length:b]
        length = b
        if new.size:
            if first is None:
                first = time.perf_counter() - t0
            n += new.shape[1]
    rest = wavs[:, length:]  # after the loop: the rest, less the columns that are all |x| <= 1e-5
    keep = np.sum(np.abs(rest) > 1e-5, axis=0) > 0
    if keep.any() and first is None:
        first = time.perf_counter() - t0
    n += int(keep.sum())
    return {"first_s": first, "wall_s": time.perf_counter() - t0, "samples": n, "decodes": batches}
run(30, 1)
out = {"runs": []}
with torch.inference_mode():
    for rep in range(a["repeats"]):
        c0 = cpu()
        r = run(a["frames"], 7 + rep)
        r["cpu_s"] = cpu() - c0
        out["runs"].append(r)
print(json.dumps(out))
"""


def probe(code: str, args: dict) -> dict:
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=3600,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"probe failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def summarize(system: str, seconds: float, frames: int, got: dict, lookahead=None, audio_threads=None) -> dict:
    runs = got["runs"]
    audio_s = median([r["samples"] for r in runs]) / 24000
    row = {"system": system, "seconds": seconds, "frames": frames, "lookahead": lookahead,
           "audio_threads": audio_threads,
           "first_audio_s": median([r["first_s"] for r in runs]), "wall_s": median([r["wall_s"] for r in runs]),
           "audio_s": audio_s, "cpu_s": median([r["cpu_s"] for r in runs]), "runs": runs}
    row["rtf"] = row["wall_s"] / audio_s
    if "audio_graph_s" in runs[0]:
        row["audio_rtf"] = median([r["audio_graph_s"] for r in runs]) / audio_s
        row["codes_rtf"] = median([r["wall_codes_s"] for r in runs]) / audio_s
        cpu_codes = median([r["cpu_codes_s"] for r in runs])
        row["audio_cpu_share"] = 1 - cpu_codes / row["cpu_s"]
    return row


def table(res: dict) -> str:
    lines = [f"# Speech out: chattts-ort vs ChatTTS 0.2.5 stream mode ({res['date'][:10]})", "",
             f"Machine: {res['machine']}. Model: random weights, {res['model']} shape; chattts-ort GPT "
             f"{res['precision']}, audio fp32, {res['threads']} threads; ChatTTS: PyTorch "
             f"{res['torch']}, {res['threads']} threads. Medians of {res['repeats']} runs. Command: `{res['command']}`",
             "", "| system | lookahead | audio threads | audio s | first audio s | total s | RTF | audio RTF "
                 "| GPT alone RTF | audio CPU share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {r['system']} | {r['lookahead'] if r['lookahead'] is not None else '-'} | "
                     f"{r.get('audio_threads') or '-'} | {r['audio_s']:.1f} | "
                     f"{f('first_audio_s')} | {f('wall_s', '{:.2f}')} | {f('rtf')} | {f('audio_rtf')} | "
                     f"{f('codes_rtf')} | {f('audio_cpu_share', '{:.0%}')} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    systems = sorted({(r["system"], r["lookahead"], r.get("audio_threads")) for r in res["rows"]}, key=str)
    for sysname, la, at in systems:
        rows = sorted((r for r in res["rows"] if r["system"] == sysname and r["lookahead"] == la
                       and r.get("audio_threads") == at), key=lambda r: r["audio_s"])
        label = sysname + (f" (lookahead {la}, {at} audio threads)" if la is not None else "")
        axes[0].plot([r["audio_s"] for r in rows], [r["first_audio_s"] for r in rows], "o-", label=label)
        axes[1].plot([r["audio_s"] for r in rows], [r["rtf"] for r in rows], "o-", label=label)
    axes[0].set(xlabel="utterance (s of audio)", ylabel="first audio sample (s)", title="latency")
    axes[1].set(xlabel="utterance (s of audio)", ylabel="end-to-end RTF", title="real-time factor (< 1: faster)")
    axes[1].axhline(1.0, color="gray", lw=0.8, ls="--")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from streams import cpu_name, export_for  # noqa: E402

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--seconds", nargs="+", type=float, default=[5, 10, 20])
    ap.add_argument("--lookahead", nargs="+", type=int, default=[52, 24])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--audio-threads", nargs="+", type=int, default=[None],
                    help="Runtime.load(audio_threads=...) values to compare (default: the runtime's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chattts-repeats", type=int, default=1)
    ap.add_argument("--no-chattts", action="store_true", help="skip ChatTTS's stream mode")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    import torch

    stamp = datetime.now(timezone.utc)
    export = export_for(args.model, args.precision)
    text = "chattts-ort speaks from a native core, as the words are sampled."
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
           "model": args.model, "precision": args.precision, "threads": args.threads, "repeats": args.repeats,
           "torch": torch.__version__, "command": "python bench/audio.py " + " ".join(argv or sys.argv[1:]),
           "rows": []}
    for sec in args.seconds:
        frames = int(round(sec * FRAMES_PER_S))
        for la in args.lookahead:
            for at in args.audio_threads:
                got = probe(_ORT, {"export": export, "threads": args.threads, "frames": frames, "text": text,
                                   "lookahead": la, "repeats": args.repeats, "audio_threads": at})
                row = summarize("chattts-ort", sec, frames, got, la, at)
                res["rows"].append(row)
                print(f"chattts-ort {sec:4.0f} s, lookahead {la}, audio threads {at}: first audio {row['first_audio_s']:.3f} s, "
                      f"RTF {row['rtf']:.3f} (audio graphs {row['audio_rtf']:.3f}, GPT alone {row['codes_rtf']:.3f}), "
                      f"audio CPU share {row['audio_cpu_share']:.0%}", flush=True)
        if not args.no_chattts:
            got = probe(_CHATTTS, {"model": args.model, "threads": args.threads, "frames": frames, "text": text,
                                   "repeats": args.chattts_repeats})
            if "skipped" in got:
                print(f"ChatTTS stream mode skipped: {got['skipped']}", flush=True)
                args.no_chattts = True
                continue
            row = summarize("ChatTTS 0.2.5 stream", sec, frames, got)
            res["rows"].append(row)
            print(f"ChatTTS stream {sec:4.0f} s: first audio {row['first_audio_s']:.3f} s, RTF {row['rtf']:.3f}",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stamp:%Y-%m-%d}-audio-{args.model}"
    Path(f"{base}.json").write_text(json.dumps(res, indent=2))
    Path(f"{base}.md").write_text(table(res))
    plot(res, Path(f"{base}.png"))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
