"""export --layers-per-graph N: N consecutive decoder layers in one fused graph, recorded in the manifest and
run, verified, quantized and compared like one layer per graph. A 5-layer tiny model makes a partial last graph
(N = 2: layers 0-1, 2-3, 4)."""
import dataclasses
import json
import shutil

import numpy as np
import pytest

from chattts_ort import InferCodeParams, Runtime
from chattts_ort.errors import ExportError
from chattts_ort.format import fused_kv_names, layer_groups, read_manifest

LAYERS = 5


@pytest.fixture(scope="module")
def exports(_private_cache, tmp_path_factory):
    from chattts_ort.config import GPTConfig
    from chattts_ort.export.assets import write_random_asset_folder
    from chattts_ort.export.exporter import export_model

    root = tmp_path_factory.mktemp("lpg")
    src = write_random_asset_folder(root / "asset", cfg=dataclasses.replace(GPTConfig.tiny(), num_layers=LAYERS),
                                    seed=3, audio=False)
    out = {}
    for n in (1, 2, LAYERS):
        out[n] = export_model(str(src), root / f"n{n}", progress=False, layers_per_graph=n).out_dir
    return out


def test_manifest_and_graph_io(exports):
    assert layer_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    for n, folder in exports.items():
        m = read_manifest(folder)
        assert m["layers_per_graph"] == n and len(m["graphs"]["layers"]) == len(layer_groups(LAYERS, n))
        for group, e in zip(layer_groups(LAYERS, n), m["graphs"]["layers"]):
            names = [i["name"] for i in e["inputs"]]
            kv = [x for j in range(len(group)) for x in fused_kv_names(j, n)[:2]]
            assert names == ["hidden"] + kv + ["seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
    # the partial last graph still names its one layer _0
    last = read_manifest(exports[2])["graphs"]["layers"][-1]
    assert [o["name"] for o in last["outputs"]] == ["hidden_out", "present_key_0", "present_value_0"]


def _codes(folder, **load):
    p = InferCodeParams(max_new_token=40, min_new_token=40, manual_seed=11, return_hidden=True)
    with Runtime.load(folder, threads=1, **load) as rt:
        gen = rt.generate(["hello world", "a longer prompt for the second row"], params=p)
        frames = list(rt.stream("hello world", params=p))
        return gen.codes, np.stack([f.codes for f in frames]), np.stack([f.hidden for f in frames])


def test_runtime_is_identical_at_every_granularity(exports):
    ref_batch, ref_stream, ref_hidden = _codes(exports[1])
    for n in (2, LAYERS):
        batch, stream, hidden = _codes(exports[n])
        for a, b in zip(batch, ref_batch):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(stream, ref_stream)
        np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5)  # one graph may fuse across layers differently


def test_concurrent_streams_at_every_granularity(exports):
    import threading

    p = InferCodeParams(max_new_token=30, min_new_token=30, manual_seed=5)
    results = {}
    for n, folder in exports.items():
        with Runtime.load(folder, threads=1, max_streams=2, batch_invariant=True) as rt:
            got = {}

            def run(i):
                got[i] = np.stack([f.codes for f in rt.stream(f"text number {i}", params=p)])
            ts = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            results[n] = got
    for n in (2, LAYERS):
        for i in range(3):
            np.testing.assert_array_equal(results[n][i], results[1][i])


def test_verify_quantize_and_compare(exports, tmp_path):
    from chattts_ort.checks.compare import compare_exports
    from chattts_ort.checks.verify import verify_export
    from chattts_ort.errors import QuantizeError
    from chattts_ort.export.quantize import quantize_export

    rep = verify_export(exports[2], progress=False, steps=20)
    assert rep.ok, rep.failed
    rows = {(r.block, r.output) for r in rep.blocks}
    assert ("layer_02", "present_key_0") in rows and ("layer_00", "present_value_1") in rows
    q = tmp_path / "q"
    quantize_export(exports[2], q, plan="int8", progress=False)
    assert read_manifest(q)["layers_per_graph"] == 2
    cmp = compare_exports(q, exports[2], steps=20)
    assert {"layer_00", "layer_01", "layer_02"} <= {b["block"] for b in cmp.blocks}
    assert cmp.chain["agreement"] > 0.5
    with pytest.raises(QuantizeError, match="layers per graph"):
        compare_exports(q, exports[1], steps=5)


def test_refusals(exports, tmp_path):
    from chattts_ort.export.exporter import export_model

    with pytest.raises(ExportError, match="fused layer form"):
        export_model("random-tiny", tmp_path / "p", layer_form="portable", layers_per_graph=2, progress=False)
    with pytest.raises(ExportError, match="more than the model"):
        export_model("random-tiny", tmp_path / "x", layers_per_graph=3, progress=False)
    with pytest.raises(ExportError, match="positive integer"):
        export_model("random-tiny", tmp_path / "y", layers_per_graph=0, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(exports[2], bad)
    m = json.loads((bad / "manifest.json").read_text())
    for value, match in ((1, "makes 5"), (6, "layers_per_graph must be"), ("2", "layers_per_graph must be")):
        m["layers_per_graph"] = value
        (bad / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ExportError, match=match):
            Runtime.load(bad)


def test_cli(exports, tmp_path, capsys):
    from chattts_ort.cli import main

    out = tmp_path / "cli"
    assert main(["export", "random-tiny", str(out), "--layers-per-graph", "2", "--quiet"]) == 0
    m = read_manifest(out)
    assert m["layers_per_graph"] == 2 and len(m["graphs"]["layers"]) == 1
