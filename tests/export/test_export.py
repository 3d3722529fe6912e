"""Block-wise export: layout, manifest, atomicity, verification (blocks and chain)."""
import json
import shutil

import numpy as np
import onnx
import pytest

from chattts_ort.errors import ExportError
from chattts_ort.export.exporter import export_model
from chattts_ort.format import read_manifest as load_manifest, sha256_file


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
    from chattts_ort.export.sources import resolve_source

    gpt, cfg, _ = resolve_source("random-tiny")
    weights = sum(p.numel() for p in gpt.layers[0].parameters()) * 4
    size = (tiny_export / m["graphs"]["layers"][0]["file"]).stat().st_size
    assert weights <= size < weights * 1.05 + 200_000


def test_cli_export_refuses_existing_and_verify_fails_nonzero(tiny_export, tmp_path):
    from chattts_ort.cli import main

    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "random-tiny", str(out), "--quiet"]) == 2
    with pytest.raises(ExportError, match="already exists"):
        export_model("random-tiny", out, progress=False)


def test_export_is_atomic(tmp_path, monkeypatch):
    import chattts_ort.export.exporter as ex

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




def test_a_sample_head_of_the_older_form_still_runs(tiny_export, tmp_path):
    """Exports made before per-row sampling (chattts-ort 0.1) carry a sample head that takes one penalty, top_p,
    top_k and EOS gate for all rows: they still load and give the same tokens; several streams, which need
    per-row values, are refused with the reason."""
    import warnings

    import torch

    from chattts_ort import InferCodeParams, Runtime
    from chattts_ort.export.blocks import SAMPLE_IO
    from chattts_ort.export.sampling import SampleHead
    from chattts_ort.format import graph_entry

    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    N, V = 8, 626
    args = (torch.randn(N, V), torch.full((N,), 0.3), torch.tensor(1.05), torch.randint(0, V, (N, 16)),
            torch.tensor(0.7), torch.tensor(20), torch.tensor(V - 1), torch.tensor(False), torch.ones(N, V))
    names_in, names_out, axes = SAMPLE_IO
    axes = {k: v for k, v in axes.items() if k not in ("penalty", "top_p", "top_k", "block_eos")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SampleHead(), args, str(old / "sample.onnx"), dynamo=False, opset_version=17,
                          input_names=names_in, output_names=names_out, dynamic_axes=axes)
    m = json.loads((old / "manifest.json").read_text())
    m["graphs"]["sample"] = graph_entry(old, "sample.onnx")
    assert m["graphs"]["sample"]["inputs"][2]["shape"] == []  # penalty: one value
    (old / "manifest.json").write_text(json.dumps(m))
    p = InferCodeParams(max_new_token=40, min_new_token=10, manual_seed=2)
    a = Runtime.load(tiny_export, threads=1, max_context=128).generate(["hello world", "fast"], params=p)
    b = Runtime.load(old, threads=1, max_context=128).generate(["hello world", "fast"], params=p)
    for row in range(2):
        assert np.array_equal(a.codes[row], b.codes[row])
    if m["layer_form"] == "fused":
        with pytest.raises(ExportError, match="per-row sample head"):
            Runtime.load(old, threads=1, max_streams=2)
