"""Block-wise ONNX export of ChatTTS's GPT (docs/FORMAT.md is the contract).

One graph per block: the embedding (with the rotary tables and the attention bias that every layer shares),
each decoder layer on its own (one graph for prefill and decode; weights stored once), the code and text
heads, and the sample head. The folder is written to a temporary sibling and renamed into place, so a failed
export leaves nothing behind.
"""
from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..config import SPECIAL_TOKENS
from ..errors import ExportError
from ..defaults import default_export_dir
from ..format import (AUDIO_BLOCKS, AUDIO_IO, FORMAT, LAYER_FORMS, MANIFEST, OPSET, atomic_folder,
                      check_output_folder, graph_entry, layer_groups, layer_name, tag_graph, write_manifest)
from ..version import __version__
from .blocks import EMBED_IO, HEAD_IO, LAYER_IO, _wrappers, example_inputs
from .sample_graph import build_sample_graph


def _export_graph(module, args, path: Path, io):
    """torch.onnx export of one block; returns the loaded ModelProto (the caller tags and saves it)."""
    import onnx
    import torch

    names_in, names_out, axes = io
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET,
            input_names=names_in, output_names=names_out, dynamic_axes=axes, do_constant_folding=True,
        )
    return onnx.load(str(path))


def _traced(make):
    """An export job for a traced block: make() -> (module, example args, io)."""
    def build(path: Path):
        module, args, io = make()
        return _export_graph(module, args, path, io)
    return build


@dataclass
class ExportReport:
    out_dir: Path
    seconds: float
    peak_rss_mb: float
    total_bytes: int
    weight_bytes: int
    audio: str = ""  # "" when the audio graphs were exported, else why not
    # Decoder + Vocos weights (fp32). The folder holds them three times: in the whole-utterance graphs, in the
    # streaming step and in the flush (each graph file is self-contained).
    audio_weight_bytes: int = 0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def export_model(src, out, *, force: bool = False, progress: bool = True, layer_form: str = "fused",
                 kv_dtype: str = "fp32", layers_per_graph: int = 1) -> ExportReport:
    """Export SRC (a ChatTTS asset folder, or "random"/"random-tiny" for the seeded default) to OUT.

    layer_form: "fused" (GroupQueryAttention over an in-place [B, H, M, D] KV buffer; the default) or
    "portable" (standard ONNX ops only, KV [P, B, H, D] views). OUT must not exist unless force=True, and
    force replaces only an earlier export (or an empty folder). The folder appears only when complete
    (format.atomic_folder). Verification is a separate step (checks.verify; the CLI runs it with --verify).
    layers_per_graph: decoder layers in each layer graph (1: one graph per layer; num_layers: one graph for
    all), fused form only; fewer graphs mean fewer ONNX Runtime Runs per step (docs/FORMAT.md).
    """
    if layer_form not in LAYER_FORMS:
        raise ExportError(f"unknown layer_form {layer_form!r} (choose from {', '.join(LAYER_FORMS)})")
    if kv_dtype not in ("fp32", "fp16") or (kv_dtype == "fp16" and layer_form != "fused"):
        raise ExportError(f"kv_dtype {kv_dtype!r}: fp32, or fp16 with the fused layer form")
    if isinstance(layers_per_graph, bool) or not isinstance(layers_per_graph, int) or layers_per_graph < 1:
        raise ExportError(f"layers_per_graph must be a positive integer, got {layers_per_graph!r}")
    if layers_per_graph > 1 and layer_form != "fused":
        raise ExportError("layers_per_graph > 1 needs the fused layer form")
    check_output_folder(out, force)  # fail before the (slow) model load
    import torch

    from .sources import resolve_source, source_folder

    out = Path(out)
    t0 = time.perf_counter()
    gpt, cfg, tokenizer_json = resolve_source(src)
    gpt.eval()
    if layers_per_graph > cfg.num_layers:
        raise ExportError(f"layers_per_graph {layers_per_graph} is more than the model's {cfg.num_layers} layers")
    groups = layer_groups(cfg.num_layers, layers_per_graph)
    audio_src, audio_note = _audio_source(source_folder(src), cfg.hidden_size)
    EmbedBlock, LayerBlock, HeadCodeBlock, HeadTextBlock, _ = _wrappers()

    with atomic_folder(out, force) as tmp:
        # Each job: (block, build) where build(path) returns the block's ModelProto, traced with torch.onnx or
        # written node by node; modules and example inputs are made when the job runs.
        jobs = [("embed", _traced(lambda: (EmbedBlock(gpt, cfg), example_inputs(cfg, "embed"), EMBED_IO)))]
        if layer_form == "fused":  # graph i holds the layers of groups[i]; written directly from the weights
            from .fused import build_fused_layers

            for i, group in enumerate(groups):
                jobs.append((layer_name(i), lambda path, i=i, group=group: build_fused_layers(
                    [gpt.layers[j] for j in group], cfg, name=layer_name(i), kv_dtype=kv_dtype,
                    layers_per_graph=layers_per_graph)))
        else:
            for i, layer in enumerate(gpt.layers):
                jobs.append((layer_name(i), _traced(
                    lambda layer=layer: (LayerBlock(layer), example_inputs(cfg, "layer"), LAYER_IO))))
        jobs.append(("head_code", _traced(
            lambda: (HeadCodeBlock(gpt.heads), example_inputs(cfg, "head_code"), HEAD_IO))))
        jobs.append(("head_text", _traced(
            lambda: (HeadTextBlock(gpt.heads), example_inputs(cfg, "head_text"), HEAD_IO))))
        jobs.append(("sample", lambda path: build_sample_graph()))
        if audio_src is not None:
            jobs += [(block, _traced(make)) for block, make in _audio_jobs(audio_src)]

        bar = _progress(len(jobs), progress, "export")
        with torch.no_grad():
            for block, build in jobs:
                if bar is not None:
                    bar.set_postfix_str(block)
                path = tmp / f"{block}.onnx"
                model = build(path)
                tag_graph(model, block)
                _save(model, path)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        manifest = {
            "format": FORMAT,
            "exporter": {"name": "chattts-ort", "version": __version__, "torch": torch.__version__,
                         "onnx": _onnx_version(), "opset": OPSET},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(src),
            "config": cfg.to_dict(),
            "special_tokens": dict(SPECIAL_TOKENS),
            "kv_layout": "batch_head_seq_dim" if layer_form == "fused" else "seq_batch_head_dim",
            "layer_form": layer_form,
            "layers_per_graph": layers_per_graph,
            "kv_dtype": kv_dtype,
            "tokenizer": "tokenizer.json",
            "graphs": {
                "embed": graph_entry(tmp, "embed.onnx"),
                "layers": [graph_entry(tmp, f"{layer_name(i)}.onnx") for i in range(len(groups))],
                "head_code": graph_entry(tmp, "head_code.onnx"),
                "head_text": graph_entry(tmp, "head_text.onnx"),
                "sample": graph_entry(tmp, "sample.onnx"),
            },
        }
        if audio_src is not None:
            manifest["audio"] = _audio_manifest(tmp, audio_src)
        write_manifest(tmp, manifest)
    total = sum(p.stat().st_size for p in out.iterdir())
    weights = sum(p.numel() for p in gpt.parameters()) * 4
    audio_weights = 0 if audio_src is None else sum(
        p.numel() for m in (audio_src.decoder, audio_src.vocos) for p in m.parameters()) * 4
    return ExportReport(out, time.perf_counter() - t0, _peak_rss_mb(), total, weights, audio_note, audio_weights)


def _audio_source(folder: Path, gpt_hidden: int):
    """(StreamingAudio over the folder's Decoder and Vocos, "") or (None, why there is no audio path)."""
    from .audio import DECODER_FILE, VOCOS_FILE, StreamingAudio, load_audio

    missing = [f for f in (DECODER_FILE, VOCOS_FILE) if not (Path(folder) / f).is_file()]
    if missing:
        return None, (f"{folder} has no {' or '.join(missing)}: the export serves audio codes only "
                      "(no speech)")
    dec, voc, _ = load_audio(folder, gpt_hidden)
    return StreamingAudio(dec, voc).eval(), ""


def _audio_jobs(s) -> list:
    """The four audio graphs (docs/AUDIO.md): whole-utterance Decoder and Vocos, streaming step and flush."""
    import torch

    from .audio import _FlushGraph, _StepGraph

    E, c = 2 * s.cfg.dec_idim, s.cfg

    def io(block, axes):
        ins, outs = AUDIO_IO[block]
        return list(ins), list(outs), axes

    B = {0: "batch"}
    return [
        ("decoder", lambda: (s.decoder, (torch.randn(1, 5, E),),
                             io("decoder", {"hidden": {0: "batch", 1: "frames"}, "mel": {0: "batch", 2: "mel"}}))),
        ("vocos", lambda: (s.vocos, (torch.randn(1, c.n_mels, 10),),
                           io("vocos", {"mel": {0: "batch", 2: "mel"}, "audio": {0: "batch", 1: "samples"}}))),
        ("audio_step", lambda: (_StepGraph(s), (torch.randn(1, 3, E), s.init_state(1), torch.tensor([0])),
                                io("audio_step", {"hidden": {0: "batch", 1: "frames"}, "state": B,
                                                  "frames_done": B, "audio": {0: "batch", 1: "samples"},
                                                  "state_out": B, "first_sample": B}))),
        ("audio_flush", lambda: (_FlushGraph(s), (s.init_state(1), torch.tensor([3])),
                                 io("audio_flush", {"state": B, "frames_done": B, "audio": B, "first_sample": B}))),
    ]


def _audio_manifest(tmp: Path, s) -> dict:
    c = s.cfg
    return {
        "config": c.to_dict(),
        "state_size": s.state_size,
        "flush_samples": s.flush_samples,
        "exact_lookahead": c.exact_lookahead,
        "samples_per_frame": c.samples_per_frame,
        "hop": c.hop,
        "sample_rate": c.sample_rate,
        "graphs": {k: graph_entry(tmp, f"{k}.onnx") for k in AUDIO_BLOCKS},
    }


def _save(model, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="graph", leave=False)


def default_export(kind: str = "full", progress: bool = False, layer_form: str = "fused") -> Path:
    """The export folder of the random default model (exported on first use, then reused)."""
    folder = default_export_dir(kind, layer_form)
    if not (folder / MANIFEST).is_file():
        if progress:
            print(f"first use: exporting the random {kind}-shape model to {folder} ...", flush=True)
        export_model("random" if kind == "full" else "random-tiny", folder, force=True, progress=progress,
                     layer_form=layer_form)
    return folder
