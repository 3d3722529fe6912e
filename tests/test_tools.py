"""tools/gpu_wheel_parts.py: the libraries of a wheel survive pack -> parts -> unpack byte for byte."""
import importlib.util
import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_wheel_parts", REPO / "tools" / "gpu_wheel_parts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pack_unpack_round_trip(tmp_path, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "PART_BYTES", 50_000)
    libs = {"libonnxruntime.so.9.9.9": os.urandom(180_000), "libonnxruntime_providers_cuda.so": os.urandom(90_000),
            "libonnxruntime_providers_shared.so": b"x" * 1000}
    wheel = tmp_path / "onnxruntime_gpu-9.9.9-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in libs.items():
            z.writestr(f"onnxruntime/capi/{name}", data)
        z.writestr("onnxruntime/__init__.py", "")
    meta = tool.pack_libraries(wheel, tmp_path / "parts")
    assert len(meta["parts"]) >= 5 and sorted(meta["libraries"]) == sorted(libs)
    got = tool.unpack(tmp_path / "parts", tmp_path / "out")
    assert got == sorted(libs)
    for name, data in libs.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    (tmp_path / "parts" / "part-001").write_bytes(b"damaged")
    with pytest.raises(SystemExit, match="part-001"):
        tool.unpack(tmp_path / "parts", tmp_path / "out2")
    assert "part-000" in tool.commands(tmp_path / "parts")
