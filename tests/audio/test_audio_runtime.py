"""Speech out of the C++ runtime (Runtime.stream_audio / synthesize) on the tiny random export: the stream equals
the whole-utterance decode of the same frames, chunk borders add nothing, smaller lookaheads trade a measured
error, and bad input or an export without audio fails clearly."""
import json
import shutil
import threading

import numpy as np
import pytest

from chattts_ort import ExportError, GenerationError, InferCodeParams, Runtime
from chattts_ort.format import MANIFEST, graph_entry

TEXT = "hello world, this is a test"


@pytest.fixture(scope="module")
def export(_private_cache):
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def rt(export):
    r = Runtime.load(export, threads=1)
    yield r
    r.close()


def params(n=90, seed=7):
    return InferCodeParams(max_new_token=n, min_new_token=n, manual_seed=seed)


def whole_decode(export, hidden: np.ndarray) -> np.ndarray:
    """The export's whole-utterance graphs (decoder, then vocos) on [T, E] hidden states."""
    import onnxruntime as ort

    m = json.loads((export / MANIFEST).read_text())["audio"]["graphs"]
    dec = ort.InferenceSession(str(export / m["decoder"]["file"]), providers=["CPUExecutionProvider"])
    voc = ort.InferenceSession(str(export / m["vocos"]["file"]), providers=["CPUExecutionProvider"])
    mel = dec.run(None, {"hidden": hidden[None].astype(np.float32)})[0]
    return voc.run(None, {"mel": mel})[0][0]


def joined(chunks, row=0):
    chunks = [c for c in chunks if c.row == row]
    assert chunks and chunks[0].offset == 0
    for a, b in zip(chunks, chunks[1:]):  # in order, no gap, no overlap
        assert b.offset == a.offset + len(a.samples)
    return np.concatenate([c.samples for c in chunks])


def test_stream_equals_whole_decode(rt, export):
    gen = rt.generate(TEXT, params=InferCodeParams(max_new_token=90, min_new_token=90, manual_seed=7,
                                                   return_hidden=True))
    want = whole_decode(export, gen.hidden[0])
    assert len(want) == 512 * 90 - 256
    chunks = list(rt.stream_audio(TEXT, params=params(), chunk_frames=5))
    assert len(chunks) > 3 and all(c.sample_rate == 24000 and c.samples.dtype == np.float32 for c in chunks)
    got = joined(chunks)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5  # exact lookahead: the chunk borders add nothing
    wav, sr = rt.synthesize(TEXT, params=params())
    assert sr == 24000 and np.abs(wav - want).max() <= 1e-5
    s = rt.audio_stats()
    assert s["steps"] > 0 and s["flushes"] > 0 and s["samples"] > 0


def test_lookahead_trades_exactness(rt):
    want = rt.synthesize(TEXT, params=params())[0]
    errs = {}
    for L in (4, 24, rt.exact_lookahead):
        got = joined(list(rt.stream_audio(TEXT, params=params(), lookahead=L, chunk_frames=8)))
        assert got.shape == want.shape
        errs[L] = float(np.abs(got - want).max())
    assert errs[rt.exact_lookahead] <= 1e-5
    assert errs[4] > errs[24]  # the error decays with the lookahead
    assert errs[4] > 1e-6  # a real approximation, not the exact path under another name


def test_int16_batch_and_early_stop(rt, export):
    chunks = list(rt.stream_audio([TEXT, "chat tts"], params=params(60), dtype="int16"))
    assert {c.row for c in chunks} == {0, 1} and all(c.samples.dtype == np.int16 for c in chunks)
    gen = rt.generate([TEXT, "chat tts"], params=InferCodeParams(max_new_token=60, min_new_token=60, manual_seed=7,
                                                                return_hidden=True))
    for row in (0, 1):
        want = np.clip(np.rint(whole_decode(export, gen.hidden[row]) * 32767), -32768, 32767)
        got = joined(chunks, row).astype(np.int64)
        assert np.abs(got - want).max() <= 1
    it = rt.stream_audio(TEXT, params=params())
    next(it)
    it.close()  # stops the GPT and the audio work; the runtime is free again
    assert len(rt.synthesize("chat tts", params=params(20))[0]) == 512 * 20 - 256


def test_concurrent_streams_equal_solo(export):
    with Runtime.load(export, threads=1, max_streams=2) as r:
        solo = {t: r.synthesize(t, params=params(50, seed=3))[0] for t in (TEXT, "chat tts")}
        got = {}

        def run(t):
            got[t] = joined(list(r.stream_audio(t, params=params(50, seed=3))))

        th = [threading.Thread(target=run, args=(t,)) for t in solo]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        for t in solo:
            assert np.abs(got[t] - solo[t]).max() <= 1e-5


@pytest.mark.parametrize("kw,match", [({"lookahead": -1}, "lookahead"), ({"lookahead": 53}, "lookahead"),
                                      ({"lookahead": 2.5}, "lookahead"), ({"chunk_frames": 0}, "chunk_frames"),
                                      ({"chunk_frames": 65}, "chunk_frames"), ({"dtype": "int8"}, "dtype")])
def test_bad_arguments(rt, kw, match):
    with pytest.raises(ValueError, match=match):
        rt.stream_audio(TEXT, params=params(), **kw)


def _copy(export, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(export, dst)
    return dst


def test_export_without_audio_serves_codes(export, tmp_path):
    old = _copy(export, tmp_path)
    m = json.loads((old / MANIFEST).read_text())
    for e in m.pop("audio")["graphs"].values():
        (old / e["file"]).unlink()
    m["exporter"]["version"] = "0.2.0"
    (old / MANIFEST).write_text(json.dumps(m))
    with Runtime.load(old, threads=1) as r:
        assert not r.has_audio
        assert len(r.generate(TEXT, params=params(10)).codes[0]) == 10
        with pytest.raises(GenerationError, match="no audio graphs.*0.2.0.*codes only"):
            r.stream_audio(TEXT)
    with pytest.raises(ExportError, match="audio=True.*no audio graphs"):
        Runtime.load(old, threads=1, audio=True)
    with Runtime.load(export, threads=1, audio=False) as r:
        with pytest.raises(GenerationError, match="audio=False"):
            r.synthesize(TEXT)


def test_swapped_audio_graph_is_named(export, tmp_path):
    bad = _copy(export, tmp_path)
    m = json.loads((bad / MANIFEST).read_text())
    g = m["audio"]["graphs"]
    shutil.copyfile(bad / g["audio_flush"]["file"], bad / g["audio_step"]["file"])  # flush where step belongs
    g["audio_step"] = graph_entry(bad, g["audio_step"]["file"])  # a consistent manifest: only the tag tells
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ExportError, match="audio_step.onnx.*'audio_flush' block, not 'audio_step'"):
        Runtime.load(bad, threads=1)


def test_missing_audio_graph_is_named(export, tmp_path):
    bad = _copy(export, tmp_path)
    (bad / "vocos.onnx").unlink()
    with pytest.raises(ExportError, match="vocos.onnx.*'vocos'.*missing"):
        Runtime.load(bad, threads=1)


@pytest.mark.parametrize("kw,match", [({"audio": "yes"}, "audio must be"), ({"audio_threads": 0}, "audio_threads"),
                                      ({"audio_threads": 10**6}, "audio_threads")])
def test_bad_load_options(export, kw, match):
    with pytest.raises(ValueError, match=match):
        Runtime.load(export, threads=1, **kw)


def test_speech_equals_chattts_decoder_and_vocos(rt):
    """End to end: the runtime's speech equals ChatTTS's own Decoder + Vocos (the raw vocoder output) run on the
    same frames' hidden states."""
    import torch

    from chattts_ort.checks.audio_reference import load_reference
    from chattts_ort.export.sources import random_asset_folder

    ref, why = load_reference(random_asset_folder("tiny"), rt.config["hidden_size"])
    if ref is None:
        pytest.skip(why)
    gen = rt.generate(TEXT, params=InferCodeParams(max_new_token=90, min_new_token=90, manual_seed=7,
                                                   return_hidden=True))
    h = torch.from_numpy(gen.hidden[0]).T[None].contiguous()  # ChatTTS's [1, 768, T]
    want = ref.vocos(ref.decoder(h))[0].numpy()
    got = joined(list(rt.stream_audio(TEXT, params=params(), chunk_frames=16)))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
