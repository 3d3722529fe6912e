"""verify: each block against PyTorch, and the chain's token identity with the PyTorch reference loop."""
import json
import shutil

import numpy as np
import onnx
import pytest

from chattts_ort.checks.verify import verify_export
from chattts_ort.errors import ExportError
from chattts_ort.export.exporter import export_model
from chattts_ort.format import graph_entry, read_manifest as load_manifest


def test_verify_passes_and_is_saved(tiny_export):
    rep = verify_export(tiny_export, steps=100)
    print(rep.table())
    assert rep.ok, rep.failed
    assert rep.chain["identical"] and rep.chain["steps"] == 100
    saved = json.loads((tiny_export / "verify.json").read_text())
    assert saved["ok"] and len(saved["blocks"]) >= 5 * 2


def test_verify_names_a_broken_block(tiny_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    m = onnx.load(str(bad / "layer_01.onnx"))
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr += np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype) * 0.01
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(bad / "layer_01.onnx"))
    # An exporter bug writes a self-consistent folder (manifest hashes match) with wrong numbers in one block.
    man = json.loads((bad / "manifest.json").read_text())
    man["graphs"]["layers"][1] = graph_entry(bad, "layer_01.onnx")
    (bad / "manifest.json").write_text(json.dumps(man))
    rep = verify_export(bad, steps=20)
    assert not rep.ok and "layer_01" in rep.failed and "layer_00" not in rep.failed


@pytest.mark.slow
def test_full_shape_export_and_verify(tmp_path):
    import time

    t0 = time.perf_counter()
    rep = export_model("random", tmp_path / "full", progress=False)
    took = time.perf_counter() - t0
    print(f"full-shape export: {rep.seconds:.1f} s, {rep.total_bytes / 1e6:.1f} MB graphs, "
          f"{rep.weight_bytes / 1e6:.1f} MB weights, peak RSS {rep.peak_rss_mb:.0f} MB")
    assert took < 120
    assert rep.audio_weight_bytes > 1e8  # ChatTTS's Decoder and Vocos (39 M parameters)
    assert rep.total_bytes < rep.weight_bytes + 3 * rep.audio_weight_bytes + 20e6
    v = verify_export(tmp_path / "full", steps=100)
    print(v.table())
    assert v.ok, v.failed


def test_fp16_kv_cache(tmp_path):
    """The fused form with an fp16 KV cache: verified within fp16 tolerance; the C++ runtime equals the Python
    ORT loop over the same graphs token for token (both run the same fp16 attention)."""
    from chattts_ort import InferCodeParams, Runtime
    from chattts_ort.checks.ortloop import OrtLoop

    out = tmp_path / "kv16"
    export_model("random-tiny", out, progress=False, kv_dtype="fp16")
    m = load_manifest(out)
    assert m["kv_dtype"] == "fp16" and m["graphs"]["layers"][0]["inputs"][1]["dtype"] == "float16"
    rep = verify_export(out, steps=60)
    assert rep.ok, rep.failed
    rt = Runtime.load(out, threads=1, max_context=256)
    rng = np.random.default_rng(0)
    noise = rng.exponential(size=(60, 4, 626)).astype(np.float32)
    prompt = [[21131, 21144, 21173, 5000, 6000, 21132]]
    got = [tuple(f.codes) for f in rt.stream_tokens(prompt, params=InferCodeParams(max_new_token=60), noise=noise)]
    ref = OrtLoop(out).generate(prompt, max_new_token=60, noise=noise)
    assert got == ref.frames[0]
    with pytest.raises(ExportError, match="fp16"):
        export_model("random-tiny", tmp_path / "p16", progress=False, layer_form="portable", kv_dtype="fp16")

