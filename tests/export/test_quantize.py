"""Per-block quantization of the tiny model: plans, manifests, the error report, bad input."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from chattts_ort import InferCodeParams, Runtime
from chattts_ort.errors import ExportError
from chattts_ort.checks.compare import compare_exports
from chattts_ort.export.quantize import QuantizeError, optimize_export, quantize_export, resolve_plan
from chattts_ort.format import iter_graphs, read_manifest as load_manifest


@pytest.fixture(scope="module")
def fp32(tiny_export):
    return tiny_export


@pytest.mark.parametrize("plan,expect", [
    ("fp16", {"embed": "fp16", "layer_00": "fp16", "head_code": "fp16", "sample": "fp32"}),
    ("int8", {"embed": "fp32", "layer_00": "int8", "layer_01": "int8", "head_code": "int8", "sample": "fp32"}),
    ("int8-layers", {"layer_00": "int8", "head_code": "fp32"}),
    ("int8-dynamic", {"layer_01": "int8-dynamic", "head_text": "fp32"}),
    ("int4", {"layer_00": "int4", "head_code": "int8"}),
    ("int4-layers", {"layer_00": "int4", "head_code": "fp32", "head_text": "fp32"}),
    ("int4-edges", {"layer_00": "int8", "layer_01": "int8"}),  # 2 layers: both are edges
    ('{"layers": "int4", "layer_01": "int8", "head_code": "int8"}', {"layer_00": "int4", "layer_01": "int8", "head_code": "int8"}),
])
def test_plans_write_runnable_exports(fp32, tmp_path, plan, expect):
    out = tmp_path / "q"
    rep = quantize_export(fp32, out, plan=plan, progress=False)
    m = load_manifest(out)
    prec = {n: e["precision"] for n, e in [("embed", m["graphs"]["embed"]), ("head_code", m["graphs"]["head_code"]),
                                           ("head_text", m["graphs"]["head_text"]), ("sample", m["graphs"]["sample"])]}
    prec.update({f"layer_{i:02d}": e["precision"] for i, e in enumerate(m["graphs"]["layers"])})
    for k, v in expect.items():
        assert prec[k] == v, (k, prec)
    assert m["quantization"]["plan"] == plan
    if "int" in plan or "fp16" in plan:
        assert rep.bytes_out < rep.bytes_in
    for e in m["graphs"]["layers"]:
        ort.InferenceSession(str(out / e["file"]), providers=["CPUExecutionProvider"])
    # The C++ runtime runs every plan.
    codes = Runtime.load(out, threads=1, max_context=128).generate(
        "hello", params=InferCodeParams(max_new_token=8, min_new_token=8, manual_seed=0)).codes[0]
    assert codes.shape == (8, 4)


def test_optimized_export_runs_the_same(fp32, tmp_path):
    out = optimize_export(fp32, tmp_path / "opt", progress=False)
    assert load_manifest(out)["optimized"] == "ort-extended"
    p = InferCodeParams(max_new_token=10, min_new_token=10, manual_seed=3)
    a = Runtime.load(fp32, threads=1, max_context=128).generate("hello", params=p).codes[0]
    b = Runtime.load(out, threads=1, max_context=128).generate("hello", params=p).codes[0]
    assert np.array_equal(a, b)


def test_bad_plans_and_inputs(fp32, tmp_path):
    m = load_manifest(fp32)
    with pytest.raises(QuantizeError, match="unknown plan"):
        resolve_plan("int3", m)
    with pytest.raises(QuantizeError, match="layer_07"):
        resolve_plan({"layer_07": "int8"}, m)
    with pytest.raises(QuantizeError, match="unknown precision"):
        resolve_plan({"layers": "int2"}, m)
    with pytest.raises(QuantizeError, match="embed"):
        resolve_plan({"embed": "int4"}, m)
    with pytest.raises(QuantizeError, match="JSON"):
        resolve_plan("{not json", m)
    quantize_export(fp32, tmp_path / "q", plan="int8", progress=False)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_export(tmp_path / "q", tmp_path / "qq", plan="int4", progress=False)
    with pytest.raises(ExportError, match="already exists"):
        quantize_export(fp32, tmp_path / "q", plan="int8", progress=False)
    assert not (tmp_path / "qq").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # nothing half-written


def test_plan_option_optimize(fp32, tmp_path):
    import onnx

    out = tmp_path / "q"
    quantize_export(fp32, out, plan='{"layers": "int8", "optimize": true}', progress=False)
    m = load_manifest(out)
    assert m["optimized"] == "ort-extended" and m["graphs"]["layers"][0]["precision"] == "int8"
    ops = {n.op_type for n in onnx.load(str(out / m["graphs"]["layers"][0]["file"])).graph.node}
    assert "MatMulNBits" in ops
    ref = load_manifest(fp32)
    for (_, a), (_, b) in zip(iter_graphs(ref), iter_graphs(m)):
        assert [i["name"] for i in a["inputs"]] == [i["name"] for i in b["inputs"]]
        assert [o["name"] for o in a["outputs"]] == [o["name"] for o in b["outputs"]]
    rep = compare_exports(out, fp32, steps=10)
    assert rep.chain["steps"] == 10 and all(np.isfinite(b["rel_l2"]) for b in rep.blocks)
    with pytest.raises(QuantizeError, match="optimize"):
        resolve_plan({"layers": "int8", "optimize": "yes"}, ref)
    with pytest.raises(QuantizeError, match="already optimised"):
        optimize_export(out, tmp_path / "again", progress=False)




def test_a_matmul_the_quantizer_cannot_rewrite_is_an_error(tmp_path):
    """onnxruntime's MatMulNBitsQuantizer silently leaves a MatMul whose weight is a Constant node (not an
    initializer) in fp32; quantize_block says so instead of writing a block that is not what the plan asked."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from chattts_ort.export.quantize import quantize_block

    rng = np.random.default_rng(0)

    def model(second_as_constant: bool):
        w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1")
        w2 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w2")
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["y"], name="first"),
                 helper.make_node("MatMul", ["y", "w2"], ["z"], name="second")]
        if second_as_constant:
            nodes.insert(0, helper.make_node("Constant", [], ["w2"], value=w2))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32])],
                              initializer=[w1] if second_as_constant else [w1, w2])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    onnx.save(model(False), str(tmp_path / "a.onnx"))
    quantize_block(tmp_path / "a.onnx", tmp_path / "b.onnx", "int8")
    assert [n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node] == ["MatMulNBits"] * 2
    onnx.save(model(True), str(tmp_path / "c.onnx"))
    with pytest.raises(QuantizeError, match="rewrote 1 of the 2 weight MatMuls"):
        quantize_block(tmp_path / "c.onnx", tmp_path / "d.onnx", "int8")
