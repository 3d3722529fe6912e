"""The C++ core's first surface: ONNX Runtime loaded at run time, sessions with IO binding."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from chattts_ort import _native


def _save(model, path):
    onnx.save(model, str(path))
    return str(path)


def _add_mul_graph(tmp_path):
    # y = (a + b) * 2 ; z = ReduceSum(a) : dynamic first axis.
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["s", "two"], ["y"])]
    g = helper.make_graph(nodes, "addmul", [a, b], [y], initializer=[two])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return _save(m, tmp_path / "addmul.onnx")


def test_runtime_loads_from_wheel():
    info = _native.runtime_info()
    import onnxruntime
    assert info["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in info["providers"]
    assert info["library"].startswith(os.path.dirname(onnxruntime.__file__))


def test_session_io_binding_writes_into_caller_buffers(tmp_path):
    c = _native.core()
    s = c.Session(_add_mul_graph(tmp_path), "cpu", 1)
    assert [i[0] for i in s.inputs] == ["a", "b"]
    assert s.inputs[0][1] == "float32" and s.inputs[0][2] == [-1, 3]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal((4, 3)).astype(np.float32)
    # Bind the output to a view into a larger buffer: ORT must write in place, at that offset.
    big = np.full((10, 3), -7.0, np.float32)
    out = big[2:6]
    s.run({"a": a, "b": b}, {"y": out})
    np.testing.assert_allclose(big[2:6], (a + b) * 2, rtol=1e-6)
    assert (big[:2] == -7).all() and (big[6:] == -7).all()


def test_session_errors_are_python_exceptions(tmp_path):
    c = _native.core()
    with pytest.raises(RuntimeError, match="missing.onnx"):
        c.Session(str(tmp_path / "missing.onnx"), "cpu", 1)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(RuntimeError, match="bad.onnx"):
        c.Session(str(bad), "cpu", 1)
    s = c.Session(_add_mul_graph(tmp_path), "cpu", 1)
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(KeyError, match="nope"):
        s.run({"nope": a}, {"y": a.copy()})
    with pytest.raises(TypeError, match="float32"):
        s.run({"a": a.astype(np.float64), "b": a}, {"y": a.copy()})
    with pytest.raises(ValueError, match="contiguous"):
        s.run({"a": np.zeros((3, 2), np.float32).T, "b": a}, {"y": a.copy()})
    with pytest.raises(RuntimeError, match="addmul.onnx"):
        s.run({"a": a, "b": np.zeros((3, 3), np.float32)}, {"y": a.copy()})  # shape mismatch inside ORT


def test_cuda_request_without_cuda_is_clear(tmp_path):
    c = _native.core()
    if "CUDAExecutionProvider" in c.available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        c.Session(_add_mul_graph(tmp_path), "cuda", 1)


def test_missing_library_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATTTS_ORT_LIBRARY", str(tmp_path / "libonnxruntime.so.404"))
    with pytest.raises(_native.RuntimeLibraryError, match="does not exist"):
        _native.find_onnxruntime_library()


def test_wrong_library_is_clear(tmp_path):
    # A shared library that is not ONNX Runtime: loading must fail with a message, not a crash.
    import subprocess, sys
    code = (
        "from chattts_ort import _core\n"
        "import ctypes.util, glob\n"
        "lib = glob.glob('/lib/x86_64-linux-gnu/libz.so*') or glob.glob('/usr/lib/x86_64-linux-gnu/libz.so*')\n"
        "try:\n    _core.init_runtime(lib[0])\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "OrtGetApiBase" in out.stdout
