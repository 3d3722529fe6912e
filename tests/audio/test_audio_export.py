"""The audio graphs in the export folder: verified after export against ChatTTS's and vocos's modules, quantized
by plan with the inverse DFT kept exact, and reported block by block against fp32."""
import json

import numpy as np
import pytest

from chattts_ort import QuantizeError, Runtime, InferCodeParams
from chattts_ort.format import AUDIO_BLOCKS, MANIFEST


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


def test_manifest_records_the_audio_path(export):
    a = json.loads((export / MANIFEST).read_text())["audio"]
    assert set(a["graphs"]) == set(AUDIO_BLOCKS)
    assert a["exact_lookahead"] == 52 and a["samples_per_frame"] == 512 and a["sample_rate"] == 24000
    assert a["config"]["dec_idim"] * 2 == json.loads((export / MANIFEST).read_text())["config"]["hidden_size"]


def test_verify_covers_the_audio_blocks(export):
    from chattts_ort.checks.verify import verify_audio
    from chattts_ort.format import open_export

    rows = verify_audio(export, open_export(export))
    assert [r.block for r in rows] == ["decoder", "vocos", "audio_step"]
    for r in rows:
        assert r.ok, (r.block, r.max_abs)
        assert r.max_abs <= 1e-5
    assert "ChatTTS" in rows[0].extra["reference"] or "chattts-ort" in rows[0].extra["reference"]


def test_quantized_audio_keeps_the_idft_exact(export, tmp_path):
    import onnx

    from chattts_ort.checks.compare import compare_exports
    from chattts_ort.export.quantize import quantize_export

    out = tmp_path / "q"
    quantize_export(export, out, plan={"audio": "int8-dynamic"}, force=True, progress=False)
    m = json.loads((out / MANIFEST).read_text())
    assert {k: e["precision"] for k, e in m["audio"]["graphs"].items()} == {k: "int8-dynamic" for k in AUDIO_BLOCKS}
    from chattts_ort.export.quantize import _idft_matmuls

    g = onnx.load(str(out / "audio_step.onnx"))
    assert len(_idft_matmuls(g)) == 1  # the inverse DFT is still an fp32 MatMul over its [1026, 1024] basis
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in g.graph.node)
    rep = compare_exports(out, export, steps=20)
    audio_rows = [b for b in rep.blocks if b["block"] in AUDIO_BLOCKS]
    assert {b["block"] for b in audio_rows} == set(AUDIO_BLOCKS)
    assert all(0 < b["rel_l2"] < 0.5 for b in audio_rows if b["output"] in ("mel", "audio"))
    p = InferCodeParams(max_new_token=40, min_new_token=40, manual_seed=2)
    with Runtime.load(out, threads=1) as rq, Runtime.load(export, threads=1) as rf:
        a, b = rq.synthesize("hello world", params=p)[0], rf.synthesize("hello world", params=p)[0]
    assert a.shape == b.shape and np.corrcoef(a, b)[0, 1] > 0.9


def test_audio_plan_errors(export, tmp_path):
    from chattts_ort.export.quantize import quantize_export

    with pytest.raises(QuantizeError, match="audio block 'decoder' cannot be int4"):
        quantize_export(export, tmp_path / "q", plan={"audio": "int4"}, progress=False)


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.pop("state_size"), "audio.state_size must be an integer"),
    (lambda a: a.update(exact_lookahead=-1), "audio.exact_lookahead"),
    (lambda a: a["graphs"].pop("audio_flush"), "audio.graphs.audio_flush is missing"),
    (lambda a: a["config"].update(dec_idim=7), "dec_idim must be half"),
    (lambda a: a["graphs"]["vocos"].update(file="../vocos.onnx"), "audio.graphs.vocos.file"),
    (lambda a: a["graphs"]["vocos"].update(file="decoder.onnx"), "also the file of decoder"),
])
def test_manifest_audio_section_is_checked(export, edit, match):
    from chattts_ort.errors import ExportError
    from chattts_ort.format import check_manifest

    m = json.loads((export / MANIFEST).read_text())
    edit(m["audio"])
    with pytest.raises(ExportError, match=match):
        check_manifest(m, "manifest.json")
