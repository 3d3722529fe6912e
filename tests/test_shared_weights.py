"""Shared weights: `chattts-ort share-weights` writes each block's weights, pre-packed for this machine, into a data
file that every loading process maps; the export runs identically; processes share the mapped pages
(`chattts-ort memory --processes N`); tampered or misplaced data files are refused."""
import json
import shutil

import numpy as np
import pytest

from chattts_ort import InferCodeParams, Runtime
from chattts_ort.errors import ExportError, QuantizeError
from chattts_ort.format import iter_all_graphs, open_export
from chattts_ort.memory import shared_memory


@pytest.fixture(scope="module")
def int8(_private_cache, tmp_path_factory):
    from chattts_ort.export.exporter import default_export
    from chattts_ort.export.quantize import quantize_export

    out = tmp_path_factory.mktemp("shared") / "int8"
    quantize_export(default_export("tiny", layer_form="fused"), out, plan="int8", progress=False)
    return out


@pytest.fixture(scope="module")
def shared(int8):
    from chattts_ort.export.quantize import share_weights_export

    return share_weights_export(int8, int8.parent / "int8-shared", progress=False)


def _run(folder):
    p = InferCodeParams(max_new_token=50, min_new_token=50, manual_seed=7)
    with Runtime.load(folder, threads=1) as rt:
        return rt.generate("hello world", params=p).codes[0], rt.synthesize("hello world", params=p)[0]


def test_shared_export_runs_identically(int8, shared):
    m = open_export(shared)
    assert m["shared_weights"]["onnxruntime"] and m["shared_weights"]["source_manifest_sha256"]
    with_data = [n for n, e in iter_all_graphs(m) if "data" in e]
    assert "layer_00" in with_data and "audio_step" in with_data and "sample" not in with_data
    for n, e in iter_all_graphs(m):
        if "data" in e:
            assert e["data"]["file"] == e["file"].replace(".onnx", ".data")
            assert (shared / e["data"]["file"]).stat().st_size == e["data"]["bytes"] > e["bytes"]
    (c0, a0), (c1, a1) = _run(int8), _run(shared)
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(a0, a1)


def test_processes_share_the_mapped_weights(int8, shared):
    data = sum(e["data"]["bytes"] for _, e in iter_all_graphs(open_export(shared)) if "data" in e)
    plain, mapped = shared_memory(int8, processes=2), shared_memory(shared, processes=2)
    # The data file holds each weight twice (as stored, and packed); loading maps it, the kernels use the packed
    # forms in place and the stored forms of packed weights are dropped (the tiny model here, measured: ~12 of
    # 38 MB stay mapped, ~21 MB less private memory per process). The audio convolutions are re-laid-out at load
    # (private copies) and the whole-utterance audio graphs are not loaded by the runtime.
    for e in mapped.each:
        assert e["mapped_rss"] >= 0.2 * data, (e, data)  # the packed weights: shared file pages ...
        assert e["mapped_private_dirty"] <= 0.02 * data, e  # ... that no process wrote to
        assert e["shared"] > 0 and e["pss"] < e["rss"]
    for e in plain.each:
        assert e["mapped_rss"] == 0  # a self-contained export keeps no file mapped: its weights are private copies
    for a, b in zip(mapped.each, plain.each):
        assert a["private"] + 0.25 * data < b["private"], (a, b, data)
    assert mapped.to_json()["pss_total"] == mapped.pss_total > 0


def test_tampered_or_missing_data_is_refused(shared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shared, bad)
    data = bad / "layer_00.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ExportError, match="layer_00.data: sha256"):
        Runtime.load(bad)
    data.unlink()
    with pytest.raises(ExportError, match="weight data of 'layer_00'"):
        Runtime.load(bad)


def test_manifest_data_entries_are_checked(shared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shared, bad)
    m = json.loads((bad / "manifest.json").read_text())
    for value, match in (("../../etc/passwd", "plain file name"), ("layer_01.data", "also the file of"),
                         (None, "must be an object")):
        mm = json.loads(json.dumps(m))
        if value is None:
            mm["graphs"]["layers"][0]["data"] = "layer_00.data"
        else:
            mm["graphs"]["layers"][0]["data"]["file"] = value
        (bad / "manifest.json").write_text(json.dumps(mm))
        with pytest.raises(ExportError, match=match):
            Runtime.load(bad)


def test_shared_export_is_not_processed_again(shared, tmp_path):
    from chattts_ort.export.quantize import quantize_export, share_weights_export

    with pytest.raises(QuantizeError, match="already has shared weights"):
        share_weights_export(shared, tmp_path / "again", progress=False)
    with pytest.raises(QuantizeError, match="shared weights"):
        quantize_export(shared, tmp_path / "q", plan="int4", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "q").exists()


def test_cli(int8, tmp_path, capsys):
    from chattts_ort.cli import main

    out = tmp_path / "cli-shared"
    assert main(["share-weights", str(int8), str(out)]) == 0
    assert (out / "layer_00.data").is_file() and "memory" in capsys.readouterr().out
    assert main(["memory", str(out), "--processes", "2"]) == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "2 processes at once PSS" in text and "x one" in text
    assert main(["share-weights", str(out), str(tmp_path / "x")]) == 2
    assert "already has shared weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="processes"):
        shared_memory(int8, processes=0)
