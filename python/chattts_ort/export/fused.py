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
    return build_fused_layers([layer], cfg, name, kv_dtype)


def build_fused_layers(layers, cfg, name: str = "layers", kv_dtype: str = "fp32",
                       layers_per_graph: int = None) -> onnx.ModelProto:
    """One fused-form graph of consecutive decoder layers (export --layers-per-graph): hidden flows through
    them inside the graph, and layer j of the group has its own KV pair, past_key_j / past_value_j ->
    present_key_j / present_value_j (format.fused_kv_names; in an export of one layer per graph the plain names,
    so such a graph is exactly the one-layer graph). seqlens_k, total_sequence_length and the rotary caches are
    shared. layers_per_graph: the export's (default len(layers))."""
    if kv_dtype not in ("fp32", "fp16"):
        raise ValueError(f"kv_dtype must be fp32 or fp16, got {kv_dtype!r}")
    from ..format import fused_kv_names

    half = kv_dtype == "fp16"
    E, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    n = len(layers)
    per_graph = n if layers_per_graph is None else layers_per_graph
    nodes, inits = [], []
    f = TensorProto.FLOAT
    kv = TensorProto.FLOAT16 if half else f
    inputs = [helper.make_tensor_value_info("hidden", f, ["B", "S", E])]
    outputs = [helper.make_tensor_value_info("hidden_out", f, ["B", "S", E])]
    for j, layer in enumerate(layers):
        pk, pv, ok, ov = fused_kv_names(j, per_graph)
        pre = "" if per_graph == 1 else f"l{j}_"
        h_in = "hidden" if j == 0 else f"l{j - 1}_hidden_out"
        h_out = "hidden_out" if j == n - 1 else f"{pre}hidden_out"
        _fused_layer_nodes(layer, cfg, half, pre, h_in, h_out, (pk, pv, ok, ov), nodes, inits)
        inputs += [helper.make_tensor_value_info(pk, kv, ["B", H, "M", D]),
                   helper.make_tensor_value_info(pv, kv, ["B", H, "M", D])]
        outputs += [helper.make_tensor_value_info(ok, kv, ["B", H, "M", D]),
                    helper.make_tensor_value_info(ov, kv, ["B", H, "M", D])]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos_cache", kv, ["M", D // 2]),
        helper.make_tensor_value_info("sin_cache", kv, ["M", D // 2]),
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="chattts-ort")
    model.ir_version = 8
    return model


def _fused_layer_nodes(layer, cfg, half: bool, pre: str, h_in: str, h_out: str, kv_names, nodes, inits) -> None:
    """Append one layer's nodes and weights; every internal name starts with `pre`."""
    E, H, D, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    pk, pv, ok, ov = kv_names
    sd = {k: v.detach().cpu().float().numpy() for k, v in layer.state_dict().items()}

    def weight(n, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), pre + n))
        return pre + n

    def t(n):  # an internal tensor name
        return pre + n

    eps = float(cfg.rms_norm_eps)
    # RMSNorm as ONNX Runtime's own kernels (one op each instead of seven elementwise ones): the input norm,
    # then the residual add fused with the post-attention norm (its 4th output is the sum, h1).
    nodes.append(helper.make_node("SimplifiedLayerNormalization",
                                  [h_in, weight("input_layernorm.weight", sd["input_layernorm.weight"])],
                                  [t("attn_in")], axis=-1, epsilon=eps, stash_type=1))
    w_qkv = np.concatenate([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]], 0).T  # [E, 3E]
    nodes.append(helper.make_node("MatMul", [t("attn_in"), weight("qkv_proj.weight", w_qkv)], [t("qkv")]))
    if half:
        nodes.append(helper.make_node("Cast", [t("qkv")], [t("qkv16")], to=TensorProto.FLOAT16))
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        [t("qkv16") if half else t("qkv"), "", "", pk, pv, "seqlens_k", "total_sequence_length",
         "cos_cache", "sin_cache"],
        [t("attn16") if half else t("attn"), ok, ov], domain="com.microsoft",
        num_heads=H, kv_num_heads=H, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(D))))
    if half:
        nodes.append(helper.make_node("Cast", [t("attn16")], [t("attn")], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", [t("attn"), weight("o_proj.weight", sd["o_proj.weight"].T)],
                                  [t("attn_out")]))
    nodes.append(helper.make_node(
        "SkipSimplifiedLayerNormalization",
        [t("attn_out"), h_in, weight("post_attention_layernorm.weight", sd["post_attention_layernorm.weight"])],
        [t("mlp_in"), "", "", t("h1")], domain="com.microsoft", epsilon=eps))
    w_gu = np.concatenate([sd["gate_proj.weight"], sd["up_proj.weight"]], 0).T  # [E, 2F]
    nodes.append(helper.make_node("MatMul", [t("mlp_in"), weight("gate_up_proj.weight", w_gu)], [t("gate_up")]))
    inits.append(numpy_helper.from_array(np.array([F, F], np.int64), t("split_sizes")))
    nodes.append(helper.make_node("Split", [t("gate_up"), t("split_sizes")], [t("gate"), t("up")], axis=-1))
    nodes.append(helper.make_node("Sigmoid", [t("gate")], [t("gate_sig")]))
    nodes.append(helper.make_node("Mul", [t("gate"), t("gate_sig")], [t("gate_act")]))
    nodes.append(helper.make_node("Mul", [t("gate_act"), t("up")], [t("mlp_act")]))
    nodes.append(helper.make_node("MatMul", [t("mlp_act"), weight("down_proj.weight", sd["down_proj.weight"].T)],
                                  [t("mlp_out")]))
    nodes.append(helper.make_node("Add", [t("h1"), t("mlp_out")], [h_out]))


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


def run_fused_group_reference_inputs(cfg, n_layers: int, layers_per_graph: int, B=2, S=3, P=5, M=16, seed=0,
                                     kv_dtype="fp32"):
    """Inputs for checking a fused graph of n_layers layers (an export of layers_per_graph per graph): every layer
    has its own P cached positions. Returns (feed dict, [torch args of each layer]); layer j > 0 takes the
    previous layer's output as its hidden (the caller chains it), the args carry the group's input hidden."""
    from ..format import fused_kv_names

    feed, args = None, []
    for j in range(n_layers):
        f_j, a_j = run_fused_reference_inputs(cfg, B=B, S=S, P=P, M=M, seed=seed + 7919 * j, kv_dtype=kv_dtype)
        if feed is None:
            feed = {k: v for k, v in f_j.items() if k not in ("past_key", "past_value")}
            hidden = a_j[0]
        pk, pv, _, _ = fused_kv_names(j, layers_per_graph)
        feed[pk], feed[pv] = f_j["past_key"], f_j["past_value"]
        args.append((hidden,) + tuple(a_j[1:]))
    return feed, args
