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
from ..format import (FORMAT, LAYER_FORMS, MANIFEST, OPSET, atomic_folder, check_output_folder, graph_entry,
                      layer_name, tag_graph, write_manifest)
from ..version import __version__
from .blocks import EMBED_IO, HEAD_IO, LAYER_IO, SAMPLE_IO, _wrappers, example_inputs


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


@dataclass
class ExportReport:
    out_dir: Path
    seconds: float
    peak_rss_mb: float
    total_bytes: int
    weight_bytes: int


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def export_model(src, out, *, force: bool = False, progress: bool = True, layer_form: str = "fused",
                 kv_dtype: str = "fp32") -> ExportReport:
    """Export SRC (a ChatTTS asset folder, or "random"/"random-tiny" for the seeded default) to OUT.

    layer_form: "fused" (GroupQueryAttention over an in-place [B, H, M, D] KV buffer; the default) or
    "portable" (standard ONNX ops only, KV [P, B, H, D] views). OUT must not exist unless force=True, and
    force replaces only an earlier export (or an empty folder). The folder appears only when complete
    (format.atomic_folder). Verification is a separate step (checks.verify; the CLI runs it with --verify).
    """
    if layer_form not in LAYER_FORMS:
        raise ExportError(f"unknown layer_form {layer_form!r} (choose from {', '.join(LAYER_FORMS)})")
    if kv_dtype not in ("fp32", "fp16") or (kv_dtype == "fp16" and layer_form != "fused"):
        raise ExportError(f"kv_dtype {kv_dtype!r}: fp32, or fp16 with the fused layer form")
    check_output_folder(out, force)  # fail before the (slow) model load
    import torch

    from .sources import resolve_source

    out = Path(out)
    t0 = time.perf_counter()
    gpt, cfg, tokenizer_json = resolve_source(src)
    gpt.eval()
    EmbedBlock, LayerBlock, HeadCodeBlock, HeadTextBlock, SampleHead = _wrappers()

    with atomic_folder(out, force) as tmp:
        jobs = [("embed", lambda: (EmbedBlock(gpt, cfg), example_inputs(cfg, "embed"), EMBED_IO))]
        for i, layer in enumerate(gpt.layers):
            if layer_form == "fused":
                jobs.append((layer_name(i), lambda layer=layer: (layer, None, None)))
            else:
                jobs.append((layer_name(i),
                             lambda layer=layer: (LayerBlock(layer), example_inputs(cfg, "layer"), LAYER_IO)))
        jobs.append(("head_code", lambda: (HeadCodeBlock(gpt.heads), example_inputs(cfg, "head_code"), HEAD_IO)))
        jobs.append(("head_text", lambda: (HeadTextBlock(gpt.heads), example_inputs(cfg, "head_text"), HEAD_IO)))
        jobs.append(("sample", lambda: (SampleHead(), example_inputs(cfg, "sample"), SAMPLE_IO)))

        bar = _progress(len(jobs), progress, "export")
        with torch.no_grad():
            for block, make in jobs:
                if bar is not None:
                    bar.set_postfix_str(block)
                module, args, io = make()
                path = tmp / f"{block}.onnx"
                if io is None:  # a fused layer: written directly from the weights
                    from .fused import build_fused_layer

                    model = build_fused_layer(module, cfg, name=block, kv_dtype=kv_dtype)
                else:
                    model = _export_graph(module, args, path, io)
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
            "kv_dtype": kv_dtype,
            "tokenizer": "tokenizer.json",
            "graphs": {
                "embed": graph_entry(tmp, "embed.onnx"),
                "layers": [graph_entry(tmp, f"{layer_name(i)}.onnx") for i in range(cfg.num_layers)],
                "head_code": graph_entry(tmp, "head_code.onnx"),
                "head_text": graph_entry(tmp, "head_text.onnx"),
                "sample": graph_entry(tmp, "sample.onnx"),
            },
        }
        write_manifest(tmp, manifest)
    total = sum(p.stat().st_size for p in out.iterdir())
    weights = sum(p.numel() for p in gpt.parameters()) * 4
    return ExportReport(out, time.perf_counter() - t0, _peak_rss_mb(), total, weights)


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
