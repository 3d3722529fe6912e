"""The "fused" decoder-layer graph: one LLaMA layer built around ONNX Runtime's GroupQueryAttention.

Why a second layer form: the portable layer (standard ONNX ops) reads its past K/V as a [P, B, H, D] view and
must concatenate and transpose it inside the graph every step, which costs memory traffic that grows with the
context. GroupQueryAttention (com.microsoft) instead works on a KV buffer laid out [B, H, M, D] for the whole
max context M, with past and present bound to the *same* buffer: it appends the new positions in place and
reads each head's keys as one contiguous slab. Rotary embedding happens inside the op (rotate_half form, cos/sin
caches [M, D/2] as inputs), and per-row lengths (`seqlens_k`) replace the attention mask, so batches are
right-padded in this form. The same form is what CUDA graphs need (fixed shapes and addresses).

The graph is written directly with onnx.helper from a `model.DecoderLayer`'s weights (QKV and gate/up
projections packed into one MatMul each); `verify` checks it against the PyTorch layer.

IO (see docs/FORMAT.md): hidden [B,S,E], past_key / past_value [B,H,M,D], seqlens_k int32 [B] (row length
including the new positions, minus one), total_sequence_length int32 [], cos_cache / sin_cache [M, D/2]
-> hidden_out [B,S,E], present_key / present_value [B,H,M,D] (bind them to the past buffers).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FUSED_INPUTS = ["hidden", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
FUSED_OUTPUTS = ["hidden_out", "present_key", "present_value"]


def rope_cache(max_positions: int, head_dim: int, theta: float):
    """cos/sin caches [M, D/2] in float32, computed the way PyTorch/transformers compute rotary tables
    (fp32 inverse frequencies, one fp32 product per position, then cos/sin)."""
    ex = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), ex, dtype=np.float32)).astype(np.float32)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv[None, :]
    return np.cos(freqs.astype(np.float64)).astype(np.float32), np.sin(freqs.astype(np.float64)).astype(np.float32)


def build_fused_layer(layer, cfg, name: str = "layer", kv_dtype: str = "fp32") -> onnx.ModelProto:
    """An onnx.ModelProto of `layer` (a model.DecoderLayer) in the fused form.

    kv_dtype "fp16": the KV buffers (and the rotary caches) are fp16 and attention runs in fp16 inside
    GroupQueryAttention; q/k/v are cast to fp16 before it and its output back to fp32. Halves the cache's memory
    traffic, which dominates long contexts; not bit-faithful to fp32 (see the README)."""
    if kv_dtype not in ("fp32", "fp16"):
        raise ValueError(f"kv_dtype must be fp32 or fp16, got {kv_dtype!r}")
    half = kv_dtype == "fp16"
    E, H, D, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    sd = {k: v.detach().cpu().float().numpy() for k, v in layer.state_dict().items()}
    nodes, inits = [], []

    def weight(n, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), n))
        return n

    eps = float(cfg.rms_norm_eps)
    # RMSNorm as ONNX Runtime's own kernels (one op each instead of seven elementwise ones): the input norm,
    # then the residual add fused with the post-attention norm (its 4th output is the sum, h1).
    nodes.append(helper.make_node("SimplifiedLayerNormalization",
                                  ["hidden", weight("input_layernorm.weight", sd["input_layernorm.weight"])],
                                  ["attn_in"], axis=-1, epsilon=eps, stash_type=1))
    w_qkv = np.concatenate([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]], 0).T  # [E, 3E]
    nodes.append(helper.make_node("MatMul", ["attn_in", weight("qkv_proj.weight", w_qkv)], ["qkv"]))
    if half:
        nodes.append(helper.make_node("Cast", ["qkv"], ["qkv16"], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        ["qkv16" if half else "qkv", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length",
         "cos_cache", "sin_cache"],
        ["attn16" if half else "attn", "present_key", "present_value"], domain="com.microsoft",
        num_heads=H, kv_num_heads=H, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(D))))
    if half:
        nodes.append(helper.make_node("Cast", ["attn16"], ["attn"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", ["attn", weight("o_proj.weight", sd["o_proj.weight"].T)], ["attn_out"]))
    nodes.append(helper.make_node(
        "SkipSimplifiedLayerNormalization",
        ["attn_out", "hidden", weight("post_attention_layernorm.weight", sd["post_attention_layernorm.weight"])],
        ["mlp_in", "", "", "h1"], domain="com.microsoft", epsilon=eps))
    w_gu = np.concatenate([sd["gate_proj.weight"], sd["up_proj.weight"]], 0).T  # [E, 2F]
    nodes.append(helper.make_node("MatMul", ["mlp_in", weight("gate_up_proj.weight", w_gu)], ["gate_up"]))
    inits.append(numpy_helper.from_array(np.array([F, F], np.int64), "split_sizes"))
    nodes.append(helper.make_node("Split", ["gate_up", "split_sizes"], ["gate", "up"], axis=-1))
    nodes.append(helper.make_node("Sigmoid", ["gate"], ["gate_sig"]))
    nodes.append(helper.make_node("Mul", ["gate", "gate_sig"], ["gate_act"]))
    nodes.append(helper.make_node("Mul", ["gate_act", "up"], ["mlp_act"]))
    nodes.append(helper.make_node("MatMul", ["mlp_act", weight("down_proj.weight", sd["down_proj.weight"].T)], ["mlp_out"]))
    nodes.append(helper.make_node("Add", ["h1", "mlp_out"], ["hidden_out"]))

    f = TensorProto.FLOAT
    kv = TensorProto.FLOAT16 if half else f
    inputs = [
        helper.make_tensor_value_info("hidden", f, ["B", "S", E]),
        helper.make_tensor_value_info("past_key", kv, ["B", H, "M", D]),
        helper.make_tensor_value_info("past_value", kv, ["B", H, "M", D]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos_cache", kv, ["M", D // 2]),
        helper.make_tensor_value_info("sin_cache", kv, ["M", D // 2]),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden_out", f, ["B", "S", E]),
        helper.make_tensor_value_info("present_key", kv, ["B", H, "M", D]),
        helper.make_tensor_value_info("present_value", kv, ["B", H, "M", D]),
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="chattts-ort")
    model.ir_version = 8
    return model


def run_fused_reference_inputs(cfg, B=2, S=3, P=5, M=16, seed=0, kv_dtype="fp32"):
    """Inputs for checking a fused layer against the PyTorch layer: every row has P cached positions.

    Returns (fused feed dict, torch args for model.DecoderLayer) describing the same computation."""
    import torch

    from .model import attention_bias, rope_cos_sin

    g = torch.Generator().manual_seed(seed)
    E, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    hidden = torch.randn(B, S, E, generator=g)
    pk = torch.randn(P, B, H, D, generator=g)
    pv = torch.randn(P, B, H, D, generator=g)
    pos = torch.arange(P, P + S).unsqueeze(0).repeat(B, 1)
    cos, sin = rope_cos_sin(pos, D, cfg.rope_theta)
    bias = attention_bias(torch.ones(B, P + S, dtype=torch.int64), S)
    kbuf = np.zeros((B, H, M, D), np.float32)
    vbuf = np.zeros((B, H, M, D), np.float32)
    kbuf[:, :, :P] = pk.permute(1, 2, 0, 3).numpy()
    vbuf[:, :, :P] = pv.permute(1, 2, 0, 3).numpy()
    cc, sc = rope_cache(M, D, cfg.rope_theta)
    if kv_dtype == "fp16":
        kbuf, vbuf, cc, sc = (a.astype(np.float16) for a in (kbuf, vbuf, cc, sc))
    feed = {"hidden": hidden.numpy(), "past_key": kbuf, "past_value": vbuf,
            "seqlens_k": np.full(B, P + S - 1, np.int32), "total_sequence_length": np.array(P + S, np.int32),
            "cos_cache": cc, "sin_cache": sc}
    return feed, (hidden, cos, sin, bias, pk, pv)
