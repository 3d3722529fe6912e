"""Block-wise export: layout, manifest, atomicity, verification (blocks and chain)."""
import json
import shutil

import numpy as np
import onnx
import pytest

from chattts_ort.export import graph_entry, ExportError, export_model, load_manifest, sha256_file
from chattts_ort.verify import verify_export


def test_manifest_and_graphs(tiny_export):
    m = load_manifest(tiny_export)
    g = m["graphs"]
    assert len(g["layers"]) == m["config"]["num_layers"] == 2
    fused = m["layer_form"] == "fused"
    assert m["kv_layout"] == ("batch_head_seq_dim" if fused else "seq_batch_head_dim")
    for entry in [g["embed"], *g["layers"], g["head_code"], g["head_text"], g["sample"]]:
        p = tiny_export / entry["file"]
        assert sha256_file(p) == entry["sha256"] and p.stat().st_size == entry["bytes"]
        assert entry["precision"] == "fp32"
    names = [i["name"] for i in g["layers"][0]["inputs"]]
    if fused:
        assert names == ["hidden", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
        assert g["layers"][0]["inputs"][1]["shape"][2] == "M"  # the whole max-context buffer
        ops = {n.op_type for n in onnx.load(str(tiny_export / "layer_00.onnx")).graph.node}
        assert "GroupQueryAttention" in ops
    else:
        assert names == ["hidden", "cos", "sin", "attn_bias", "past_key", "past_value"]
        assert g["layers"][0]["inputs"][4]["shape"][0] == "P"  # dynamic past length
    assert [o["name"] for o in g["layers"][0]["outputs"]] == ["hidden_out", "present_key", "present_value"]
    assert [o["name"] for o in g["sample"]["outputs"]] == ["next_ids"]
    assert (tiny_export / "tokenizer.json").is_file()


def test_weights_stored_once(tiny_export):
    m = load_manifest(tiny_export)
    from chattts_ort.defaults import resolve_source

    gpt, cfg, _ = resolve_source("random-tiny")
    weights = sum(p.numel() for p in gpt.layers[0].parameters()) * 4
    size = (tiny_export / m["graphs"]["layers"][0]["file"]).stat().st_size
    assert weights <= size < weights * 1.05 + 200_000


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


def test_cli_export_refuses_existing_and_verify_fails_nonzero(tiny_export, tmp_path):
    from chattts_ort.cli import main

    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "random-tiny", str(out), "--quiet"]) == 2
    with pytest.raises(ExportError, match="already exists"):
        export_model("random-tiny", out, progress=False)


def test_export_is_atomic(tmp_path, monkeypatch):
    import chattts_ort.export as ex

    real = ex._export_graph
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure in the middle of the export")
        return real(*a, **k)

    monkeypatch.setattr(ex, "_export_graph", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model("random-tiny", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_layer_form(tmp_path):
    with pytest.raises(ExportError, match="layer_form"):
        export_model("random-tiny", tmp_path / "out", progress=False, layer_form="magic")
    assert not (tmp_path / "out").exists()


def test_bad_sources(tmp_path):
    from chattts_ort.errors import AssetError

    with pytest.raises(AssetError, match="not found"):
        export_model(tmp_path / "no-such-asset", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="manifest.json"):
        load_manifest(tmp_path)


@pytest.mark.slow
def test_full_shape_export_and_verify(tmp_path):
    import time

    t0 = time.perf_counter()
    rep = export_model("random", tmp_path / "full", progress=False)
    took = time.perf_counter() - t0
    print(f"full-shape export: {rep.seconds:.1f} s, {rep.total_bytes / 1e6:.1f} MB graphs, "
          f"{rep.weight_bytes / 1e6:.1f} MB weights, peak RSS {rep.peak_rss_mb:.0f} MB")
    assert took < 120
    assert rep.total_bytes < rep.weight_bytes + 5e6
    v = verify_export(tmp_path / "full", steps=100)
    print(v.table())
    assert v.ok, v.failed


def test_fp16_kv_cache(tmp_path):
    """The fused form with an fp16 KV cache: verified within fp16 tolerance; the C++ runtime equals the Python
    ORT loop over the same graphs token for token (both run the same fp16 attention)."""
    from chattts_ort import InferCodeParams, Runtime
    from chattts_ort.ortloop import OrtLoop

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
