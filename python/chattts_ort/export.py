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

from . import __version__
from .config import SPECIAL_TOKENS, GPTConfig
from .errors import ExportError
from .format import (FORMAT, LAYER_FORMS, MANIFEST, OPSET, atomic_folder, iter_graphs, layer_name,  # noqa: F401
                     read_manifest, sha256_file, tag_graph, write_manifest)

load_manifest = read_manifest  # the name older callers use


# ----------------------------------------------------------------------------------------------------------
# Export wrappers: each one is exactly one graph of docs/FORMAT.md.


def _wrappers():
    import torch

    from .model import attention_bias, rope_cos_sin
    from .sampling import SampleHead

    class EmbedBlock(torch.nn.Module):
        def __init__(self, gpt, cfg: GPTConfig):
            super().__init__()
            self.embed = gpt.embed
            self.cfg = cfg

        def forward(self, input_ids, text_mask, speaker, position_ids, key_mask):
            hidden = self.embed(input_ids, text_mask, speaker)
            cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
            bias = attention_bias(key_mask, input_ids.shape[1])
            return hidden, cos, sin, bias

    class LayerBlock(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden, cos, sin, attn_bias, past_key, past_value):
            return self.layer(hidden, cos, sin, attn_bias, past_key, past_value)

    class HeadCodeBlock(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def forward(self, hidden):
            return self.heads.forward_code(hidden)

    class HeadTextBlock(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def forward(self, hidden):
            return self.heads.forward_text(hidden)

    return EmbedBlock, LayerBlock, HeadCodeBlock, HeadTextBlock, SampleHead


# Graph IO names and symbolic shapes, as in docs/FORMAT.md.
EMBED_IO = (
    ["input_ids", "text_mask", "speaker", "position_ids", "key_mask"],
    ["hidden", "cos", "sin", "attn_bias"],
    {"input_ids": {0: "B", 1: "S"}, "text_mask": {0: "B", 1: "S"}, "speaker": {0: "B"},
     "position_ids": {0: "B", 1: "S"}, "key_mask": {0: "B", 1: "L"},
     "hidden": {0: "B", 1: "S"}, "cos": {0: "B", 1: "S"}, "sin": {0: "B", 1: "S"},
     "attn_bias": {0: "B", 2: "S", 3: "L"}},
)
LAYER_IO = (
    ["hidden", "cos", "sin", "attn_bias", "past_key", "past_value"],
    ["hidden_out", "present_key", "present_value"],
    {"hidden": {0: "B", 1: "S"}, "cos": {0: "B", 1: "S"}, "sin": {0: "B", 1: "S"},
     "attn_bias": {0: "B", 2: "S", 3: "L"}, "past_key": {0: "P", 1: "B"}, "past_value": {0: "P", 1: "B"},
     "hidden_out": {0: "B", 1: "S"}, "present_key": {0: "S", 1: "B"}, "present_value": {0: "S", 1: "B"}},
)
HEAD_IO = (
    ["hidden"],
    ["logits", "last_hidden"],
    {"hidden": {0: "B", 1: "S"}, "logits": {0: "B"}, "last_hidden": {0: "B"}},
)
SAMPLE_IO = (
    ["logits", "temperature", "penalty", "history", "top_p", "top_k", "eos_id", "block_eos", "noise"],
    ["next_ids"],
    {"logits": {0: "N", 1: "V"}, "temperature": {0: "N"}, "history": {0: "N"}, "noise": {0: "N", 1: "V"},
     "next_ids": {0: "N"}},
)


def example_inputs(cfg: GPTConfig, block: str, B: int = 2, S: int = 3, P: int = 2, seed: int = 0):
    """Random inputs of the right shapes and dtypes for one block (used to trace and to verify)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    E, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if block == "embed":
        ids = torch.randint(0, cfg.num_audio_tokens, (B, S, 4), generator=g)
        text_mask = torch.zeros(B, S, dtype=torch.bool)
        text_mask[:, : max(1, S - 1)] = True
        ids[0, 0, :] = SPECIAL_TOKENS["spk_emb"]
        ids[:, 1, :] = torch.randint(0, cfg.num_text_tokens, (B, 1), generator=g)
        speaker = torch.randn(B, E, generator=g)
        L = P + S
        key_mask = torch.ones(B, L, dtype=torch.int64)
        key_mask[-1, 0] = 0  # a left-padded row
        pos = torch.arange(P, P + S).unsqueeze(0).repeat(B, 1)
        return (ids, text_mask, speaker, pos, key_mask)
    if block == "layer":
        from .model import attention_bias, rope_cos_sin

        L = P + S
        hidden = torch.randn(B, S, E, generator=g)
        pos = torch.arange(P, P + S).unsqueeze(0).repeat(B, 1)
        cos, sin = rope_cos_sin(pos, D, cfg.rope_theta)
        key_mask = torch.ones(B, L, dtype=torch.int64)
        key_mask[-1, 0] = 0
        bias = attention_bias(key_mask, S)
        pk = torch.randn(P, B, H, D, generator=g)
        pv = torch.randn(P, B, H, D, generator=g)
        return (hidden, cos, sin, bias, pk, pv)
    if block in ("head_code", "head_text"):
        return (torch.randn(B, S, E, generator=g),)
    if block.startswith("sample"):
        V = cfg.num_audio_tokens if block != "sample_text" else cfg.num_text_tokens
        N = B * (cfg.num_vq if V == cfg.num_audio_tokens else 1)
        logits = torch.randn(N, V, generator=g) * 3
        temperature = torch.full((N,), 0.3)
        history = torch.randint(0, V, (N, 16), generator=g)
        history[:, 10:] = -1
        noise = torch.empty(N, V).exponential_(generator=g)
        return (logits, temperature, torch.tensor(1.05), history, torch.tensor(0.7), torch.tensor(20, dtype=torch.int64),
                torch.tensor(V - 1, dtype=torch.int64), torch.tensor(False), noise)
    raise ValueError(f"unknown block {block!r}")


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


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 11: "float64", 3: "int8", 2: "uint8"}


def graph_io(path: os.PathLike) -> dict:
    """Names, dtypes and shapes of a graph's inputs and outputs (read without loading the weights)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    init = {i.name for i in m.graph.initializer}
    return {"inputs": [one(v) for v in m.graph.input if v.name not in init], "outputs": [one(v) for v in m.graph.output]}


def graph_entry(folder: Path, file: str, precision: str = "fp32") -> dict:
    p = folder / file
    entry = {"file": file, "sha256": sha256_file(p), "bytes": p.stat().st_size, "precision": precision}
    entry.update(graph_io(p))
    return entry


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
    from .format import check_output_folder

    check_output_folder(out, force)  # fail before the (slow) model load
    import torch

    from .defaults import resolve_source

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
