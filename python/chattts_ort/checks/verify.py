"""Verification of an export: each block against its PyTorch module, then the whole chain.

Per block: the graph (onnxruntime, Python API) and the PyTorch module it was exported from get the same
random inputs; max abs and max relative error go into a table and a JSON report. Chain: the graphs driven by
`OrtLoop` must give the same tokens as the PyTorch reference loop (`reference.generate_reference`) for
`steps` steps, batch 2 with left padding and a speaker, under shared Exp(1) noise.

With `against=FP32_DIR` (a quantized export), the reference of every block is the fp32 graph instead, and the
report adds cosine similarity and relative L2 error, plus greedy-token agreement and the mean KL divergence of
the code distributions over the chain (see quantize.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..export.blocks import example_inputs
from ..format import iter_graphs, manifest_layer_groups, open_export, read_manifest
from .report import Report

# fp32 tolerance on the max abs error, scaled by the output's magnitude: |err| <= ATOL + RTOL * max|want|.
# Observed fp32 errors are ~1e-7 relative (ORT and PyTorch sum in different orders).
ATOL, RTOL = 1e-5, 1e-5


@dataclass
class BlockResult:
    block: str
    output: str
    max_abs: float
    max_rel: float
    ok: bool
    extra: dict = field(default_factory=dict)


@dataclass
class VerifyReport(Report):
    # blocks: BlockResult rows; chain: token identity of the ONNX chain with the PyTorch reference loop

    @property
    def failed(self) -> list:
        bad = sorted({b.block for b in self.blocks if not b.ok})
        if self.chain and not self.chain.get("ok", False):
            bad.append("chain")
        return bad

    def table(self) -> str:
        lines = [f"{'block':<12} {'output':<14} {'max abs err':>12} {'max rel err':>12}  ok"]
        for b in self.blocks:
            lines.append(f"{b.block:<12} {b.output:<14} {b.max_abs:12.3e} {b.max_rel:12.3e}  {'yes' if b.ok else 'NO'}")
        if self.chain:
            c = self.chain
            lines.append(f"chain: {c['steps']} steps, batch {c['batch']}: tokens identical: {c['identical']} "
                         f"(first mismatch: {c['first_mismatch']})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "ok": self.ok, "failed": self.failed, "seconds": self.seconds,
                "blocks": [b.__dict__ for b in self.blocks], "chain": self.chain}


def _errors(got: np.ndarray, want: np.ndarray):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - want)
    fin = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), fin):
        return float("inf"), float("inf")
    d = diff[fin] if fin.any() else np.zeros(1)
    rel = d / (np.abs(want[fin]) + 1e-6) if fin.any() else np.zeros(1)
    return float(d.max()), float(rel.max())


def _torch_modules(manifest: dict):
    """The PyTorch model the export came from (its source must still be available)."""
    from ..export.sources import resolve_source

    src = manifest.get("source")
    if src is None:
        raise ValueError("the manifest names no source model to verify against")
    gpt, cfg, _ = resolve_source(src)
    return gpt.eval(), cfg


def _ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def verify_blocks(folder, manifest, gpt, cfg, progress=False) -> list:
    import torch

    from ..export.blocks import _wrappers

    EmbedBlock, LayerBlock, HeadCodeBlock, HeadTextBlock, SampleHead = _wrappers()
    results = []
    entries = list(iter_graphs(manifest))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), desc="verify blocks", unit="graph", leave=False)
    for name, entry in entries:
        if name == "embed":
            mod, args = EmbedBlock(gpt, cfg), example_inputs(cfg, "embed", seed=11)
        elif name.startswith("layer_") and manifest.get("layer_form") == "fused":
            group = manifest_layer_groups(manifest)[int(name[6:])]
            results += _verify_fused_layer(Path(folder) / entry["file"], name, [gpt.layers[i] for i in group], cfg,
                                           manifest.get("kv_dtype", "fp32"), manifest.get("layers_per_graph", 1))
            if bar is not None:
                bar.update(1)
            continue
        elif name.startswith("layer_"):
            mod, args = LayerBlock(gpt.layers[int(name[6:])]), example_inputs(cfg, "layer", B=2, S=3, P=5, seed=12)
        elif name == "head_code":
            mod, args = HeadCodeBlock(gpt.heads), example_inputs(cfg, "head_code", seed=13)
        elif name == "head_text":
            mod, args = HeadTextBlock(gpt.heads), example_inputs(cfg, "head_text", seed=14)
        else:
            mod, args = SampleHead(), example_inputs(cfg, "sample", seed=15)
        with torch.no_grad():
            want = mod(*args)
        want = want if isinstance(want, (tuple, list)) else (want,)
        sess = _ort_session(Path(folder) / entry["file"])
        feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        got = sess.run(None, feed)
        for out, g, w in zip(sess.get_outputs(), got, want):
            w = w.numpy()
            if g.dtype.kind in "iub":
                ok = bool(np.array_equal(g, w))
                results.append(BlockResult(name, out.name, 0.0 if ok else float("inf"), 0.0 if ok else float("inf"), ok))
            else:
                a, r = _errors(g, w)
                fin = np.isfinite(w)
                scale = float(np.abs(w[fin]).max()) if fin.any() else 0.0
                results.append(BlockResult(name, out.name, a, r, a <= ATOL + RTOL * scale))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _stream_graphs(step, flush, hidden: np.ndarray, chunk: int, samples: int) -> np.ndarray:
    """One utterance [1, T, E] through the streaming graphs (onnxruntime sessions), `chunk` frames per step."""
    a = step.get_inputs()[1].shape[1]
    state = np.zeros((1, a), np.float32)
    out = np.zeros((1, samples), np.float32)

    def put(sig, first):
        lo, hi = max(first, 0), min(first + sig.shape[1], samples)
        if hi > lo:
            out[:, lo:hi] = sig[:, lo - first:hi - first]

    T = hidden.shape[1]
    for done in range(0, T, chunk):
        sig, state, first = step.run(None, {"hidden": hidden[:, done:done + chunk], "state": state,
                                            "frames_done": np.array([done], np.int64)})
        put(sig, int(first[0]))
    sig, first = flush.run(None, {"state": state, "frames_done": np.array([T], np.int64)})
    put(sig, int(first[0]))
    return out


def verify_audio(folder, manifest, seed: int = 21) -> list:
    """The audio graphs: Decoder and Vocos against ChatTTS's and vocos's own modules on the asset's weights
    (checks.audio_reference; our PyTorch modules where those packages are missing, said in `extra`), and the
    streaming step + flush against the whole-utterance graphs (the stream must equal the whole)."""
    import torch

    from ..config import AudioConfig
    from ..export.audio import load_audio
    from ..export.sources import source_folder
    from .audio_reference import load_reference

    folder = Path(folder)
    a = manifest["audio"]
    c = AudioConfig.from_dict(a["config"])
    E = manifest["config"]["hidden_size"]
    src = source_folder(manifest["source"])
    ref, why = load_reference(src, E)
    if ref is None:
        dec, voc, _ = load_audio(src, E)

        def ref_decoder(h):
            with torch.no_grad():
                return dec(h.transpose(1, 2))

        def ref_vocos(m):
            with torch.no_grad():
                return voc(m)
        source = f"chattts-ort's PyTorch modules ({why})"
    else:
        ref_decoder, ref_vocos, source = ref.decoder, ref.vocos, ref.source
    g = torch.Generator().manual_seed(seed)
    T = 2 * c.exact_lookahead + 17  # longer than the receptive field on both sides
    hidden = torch.randn(2, T, E, generator=g)
    sess = {k: _ort_session(folder / a["graphs"][k]["file"]) for k in ("decoder", "vocos", "audio_step", "audio_flush")}
    results = []

    def row(block, output, got, want, **extra):
        err_abs, err_rel = _errors(got, want)
        scale = float(np.abs(want).max()) if want.size else 0.0
        results.append(BlockResult(block, output, err_abs, err_rel, err_abs <= ATOL + RTOL * scale,
                                   {"reference": source, **extra}))

    mel_want = ref_decoder(hidden.transpose(1, 2).contiguous()).numpy()
    mel = sess["decoder"].run(None, {"hidden": hidden.numpy()})[0]
    row("decoder", "mel", mel, mel_want)
    wav_want = ref_vocos(torch.from_numpy(mel_want)).numpy()
    wav = sess["vocos"].run(None, {"mel": mel_want})[0]
    row("vocos", "audio", wav, wav_want)
    whole = sess["vocos"].run(None, {"mel": mel})[0][:1]
    streamed = _stream_graphs(sess["audio_step"], sess["audio_flush"], hidden[:1].numpy(), 7, whole.shape[1])
    row("audio_step", "stream=whole", streamed, whole, reference_kind="decoder+vocos graphs", chunk_frames=7)
    return results


# With an fp16 KV cache, K/V and attention round to fp16 (relative error ~1e-3).
KV16_RTOL = 4e-3


def _verify_fused_layer(path: Path, name: str, layers, cfg, kv_dtype: str = "fp32", per_graph: int = 1) -> list:
    """A fused layer graph (one layer, or several consecutive ones) against the PyTorch layers run one after the
    other: a batch-2 prefill and a batch-2 decode step over a cache. Each layer's K/V is checked (named _j in a
    graph of several layers)."""
    import torch

    from ..export.fused import run_fused_group_reference_inputs
    from ..format import fused_kv_names

    sess = _ort_session(path)
    outs = [o.name for o in sess.get_outputs()]
    worst = {n: [0.0, 0.0, 0.0] for n in outs}
    for B, S, P in ((2, 3, 0), (2, 1, 5)):
        feed, args = run_fused_group_reference_inputs(cfg, len(layers), per_graph, B=B, S=S, P=P, M=16,
                                                      seed=12 + P, kv_dtype=kv_dtype)
        got = dict(zip(outs, sess.run(None, feed)))
        pairs, h = {}, None
        with torch.no_grad():
            for j, (layer, a) in enumerate(zip(layers, args)):
                wh, wk, wv = (t.numpy() for t in layer(*((a[0] if h is None else h),) + tuple(a[1:])))
                h = torch.from_numpy(wh)
                pk, pv, ok, ov = fused_kv_names(j, per_graph)
                k, v = got[ok], got[ov]
                pairs[ok] = (k[:, :, P:P + S].astype(np.float32), wk.transpose(1, 2, 0, 3))
                pairs[ov] = (v[:, :, P:P + S].astype(np.float32), wv.transpose(1, 2, 0, 3))
                # The cached positions before P must be untouched (past and present share the buffer).
                if P and not (np.array_equal(k[:, :, :P], feed[pk][:, :, :P])
                              and np.array_equal(v[:, :, :P], feed[pv][:, :, :P])):
                    worst[ok][0] = float("inf")
        pairs["hidden_out"] = (got["hidden_out"], h.numpy())
        for out, (g, w) in pairs.items():
            a, r = _errors(g, w)
            wm = worst[out]
            wm[0], wm[1], wm[2] = max(wm[0], a), max(wm[1], r), max(wm[2], float(np.abs(w).max()))
    rtol = KV16_RTOL if kv_dtype == "fp16" else RTOL
    return [BlockResult(name, out, a, r, a <= ATOL + rtol * scale) for out, (a, r, scale) in worst.items()]


def verify_chain(folder, gpt, cfg, steps: int = 100, seed: int = 0) -> dict:
    """OrtLoop vs the PyTorch reference loop: batch 2 (left padded), a speaker, shared noise."""
    import torch

    from .ortloop import OrtLoop
    from ..params import InferCodeParams
    from .reference import generate_reference

    rng = np.random.default_rng(seed)
    special = read_manifest(folder).get("special_tokens", {})
    stts, ptts, spk_id = special.get("Stts", 21131), special.get("Ptts", 21132), special.get("spk_emb", 21143)
    prompts = [
        [stts, spk_id] + rng.integers(1000, 20000, 9).tolist() + [ptts],
        [stts, spk_id] + rng.integers(1000, 20000, 4).tolist() + [ptts],
    ]
    speaker = rng.standard_normal((2, cfg.hidden_size)).astype(np.float16).astype(np.float32)
    params = InferCodeParams(max_new_token=steps, manual_seed=seed)
    gen = torch.Generator().manual_seed(seed)
    noise = np.stack([torch.empty(2 * cfg.num_vq, cfg.num_audio_tokens).exponential_(generator=gen).numpy()
                      for _ in range(steps)])
    ref = generate_reference(gpt, cfg, prompts, mode="code", params=params, speaker=speaker,
                             noise=lambda step, N, V: torch.from_numpy(noise[step]))
    loop = OrtLoop(folder, threads=1)
    temps = [params.temperature] * cfg.num_vq if not isinstance(params.temperature, list) else params.temperature
    got = loop.generate(prompts, temperature=temps, repetition_penalty=params.repetition_penalty,
                        top_p=params.top_P, top_k=params.top_K, max_new_token=steps,
                        min_new_token=params.min_new_token, speaker=speaker, noise=noise)
    ref_frames = [[tuple(int(x) for x in f) for f in row] for row in ref.frames]
    identical = ref_frames == got.frames
    first = None
    if not identical:
        for b in range(2):
            for i, (x, y) in enumerate(zip(ref_frames[b], got.frames[b])):
                if x != y:
                    first = {"row": b, "frame": i, "reference": list(x), "onnx": list(y)}
                    break
            if first is None and len(ref_frames[b]) != len(got.frames[b]):
                first = {"row": b, "frames_reference": len(ref_frames[b]), "frames_onnx": len(got.frames[b])}
            if first:
                break
    return {"ok": identical, "identical": identical, "steps": steps, "batch": 2,
            "frames": [len(r) for r in got.frames], "end_step": got.end_step, "first_mismatch": first}


def verify_export(folder, against=None, progress: bool = False, steps: Optional[int] = None, chain: bool = True,
                  save: bool = True) -> VerifyReport:
    """steps: chain steps (default 100 against PyTorch; 200 for the quantization report `against=FP32_DIR`)."""
    if steps is None:
        steps = 200 if against is not None else 100
    t0 = time.perf_counter()
    folder = Path(folder)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    manifest = open_export(folder)  # a folder whose files do not match its manifest is refused, not verified
    if against is not None:
        from .compare import compare_exports

        report = compare_exports(folder, against, steps=steps, progress=progress)
    else:
        gpt, cfg = _torch_modules(manifest)
        blocks = verify_blocks(folder, manifest, gpt, cfg, progress=progress)
        if manifest.get("audio"):
            blocks += verify_audio(folder, manifest)
        ch = verify_chain(folder, gpt, cfg, steps=steps) if chain else {}
        report = VerifyReport(folder, blocks, ch)
    report.seconds = time.perf_counter() - t0
    if save:
        report.save("verify.json")
    return report
