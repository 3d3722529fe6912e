"""The sample head written node by node (onnx.helper): the same arithmetic as sampling.SampleHead, in fewer nodes.

Why by hand: tracing SampleHead with torch.onnx gives ~100 nodes, most of them shape plumbing (Shape, Gather,
Reshape, ConstantOfShape, Constant) around ~35 that compute. On a decode step every node is a kernel launch of
a few microseconds on tensors of 4 x 626, so the plumbing cost more than the arithmetic (0.3 ms of a ~7 ms int4
step). This graph keeps exactly the computing ops of the traced one, in the same order and with the same operand
types, so its tokens are the traced graph's (and PyTorch's) bit for bit; `checks/verify.py` compares it with
SampleHead on random inputs, and tests/checks compare whole runs against ChatTTS's own sampling.

Differences from the traced graph, none of which changes a value:
- the vocabulary index [V] and V are computed once (Shape -> Squeeze -> Range) and shared;
- the top-p drop mask is scattered into any [N, V] bool tensor instead of a fresh zero one (the sort order is a
  permutation of 0..V-1 per row, so ScatterElements overwrites every entry);
- the top-p "keep the last 3" tail is one Less against V - 3 instead of GreaterOrEqual + Not;
- -inf masks use one scalar constant broadcast by Where instead of a ConstantOfShape per mask.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..format import OPSET, SAMPLE_INPUTS, SAMPLE_OUTPUTS



def build_sample_graph(name: str = "sample") -> onnx.ModelProto:
    """The sample head of docs/FORMAT.md (per-row parameters) as an onnx.ModelProto."""
    f32, i64, b = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    nodes, inits = [], []

    def const(n, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    ax1 = const("axes_1", np.array([1], np.int64))
    ax2 = const("axes_2", np.array([2], np.int64))
    zero = const("zero_f", np.array(0.0, np.float32))
    one = const("one_f", np.array(1.0, np.float32))
    ninf = const("neg_inf", np.array(-np.inf, np.float32))
    three = const("three_i", np.array(3, np.int64))
    izero = const("zero_i", np.array(0, np.int64))
    ione = const("one_i", np.array(1, np.int64))

    # V and the vocabulary index, shared by the penalty, the top-p tail, top-k and the EOS gate.
    v1 = node("Shape", ["logits"], ["V_1"], start=1, end=2)             # [1]
    v = node("Squeeze", [v1], ["V"])                                      # []
    vocab = node("Range", [izero, v, ione], ["vocab"])                    # [V]

    # Temperature.
    x = node("Div", ["logits", node("Unsqueeze", ["temperature", ax1], ["temp_col"])], ["x_t"])
    # Repetition penalty over the history window: alpha = penalty ** count.
    eq = node("Equal", [node("Unsqueeze", ["history", ax2], ["hist_col"]), vocab], ["hist_eq"])   # [N,16,V]
    counts = node("ReduceSum", [node("Cast", [eq], ["hist_eq_f"], to=f32), ax1], ["counts"], keepdims=0)
    alpha = node("Pow", [node("Unsqueeze", ["penalty", ax1], ["pen_col"]), counts], ["alpha"])
    neg = node("Less", [x, zero], ["x_neg"])
    x = node("Where", [neg, node("Mul", [x, alpha], ["x_mul"]), node("Div", [x, alpha], ["x_div"])], ["x_pen"])
    # Top-p on the ascending order (TopK of all V, smallest first, as the traced sort).
    sorted_x, order = "sorted_x", "order"
    node("TopK", [x, v1], [sorted_x, order], axis=1, largest=0, sorted=1)
    cum = node("CumSum", [node("Softmax", [sorted_x], ["sorted_p"], axis=1), const("axis_1", np.array(1, np.int64))],
               ["cum_p"])
    thr = node("Sub", [one, node("Unsqueeze", ["top_p", ax1], ["top_p_col"])], ["top_p_thr"])
    body = node("Less", [vocab, node("Sub", [v, three], ["V_3"])], ["not_tail"])                 # keep the top 3
    drop_sorted = node("And", [node("LessOrEqual", [cum, thr], ["cum_le"]), body], ["drop_sorted"])
    drop = node("ScatterElements", [neg, order, drop_sorted], ["drop"], axis=1)
    x = node("Where", [drop, ninf, x], ["x_top_p"])
    # Top-k: k = min(max(top_k, 3), V); the k-th largest is sorted_x[V - k] unless top-p dropped it.
    k = node("Clip", [node("Unsqueeze", ["top_k", ax1], ["top_k_col"]), three, v], ["k"])
    idx = node("Sub", [v, k], ["kth_idx"])
    kth = node("Where", [node("GatherElements", [drop_sorted, idx], ["kth_dropped"], axis=1), ninf,
                         node("GatherElements", [sorted_x, idx], ["kth_val"], axis=1)], ["kth"])
    x = node("Where", [node("Less", [x, kth], ["below_kth"]), ninf, x], ["x_top_k"])
    # EOS gate per row, then the draw: argmax(softmax(x) / noise).
    eos = node("And", [node("Equal", [vocab, "eos_id"], ["is_eos"]),
                       node("Unsqueeze", ["block_eos", ax1], ["block_col"])], ["eos_mask"])
    x = node("Where", [eos, ninf, x], ["x_final"])
    p = node("Softmax", [x], ["p"], axis=1)
    node("ArgMax", [node("Div", [p, "noise"], ["p_over_q"])], ["next_ids"], axis=1, keepdims=0)

    N, V = "N", "V"
    shapes = {"logits": (f32, [N, V]), "temperature": (f32, [N]), "penalty": (f32, [N]), "history": (i64, [N, 16]),
              "top_p": (f32, [N]), "top_k": (i64, [N]), "eos_id": (i64, []), "block_eos": (b, [N]),
              "noise": (f32, [N, V]), "next_ids": (i64, [N])}
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, *shapes[n]) for n in SAMPLE_INPUTS],
        [helper.make_tensor_value_info(n, *shapes[n]) for n in SAMPLE_OUTPUTS],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="chattts-ort")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
