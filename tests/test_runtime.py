"""The runtime's behaviour: streams, breaks, reproducibility, lifecycle, bad input. No torch here (the parity
with PyTorch is in tests/checks/test_runtime_parity.py)."""
import gc
import threading

import numpy as np
import pytest

from chattts_ort import InferCodeParams, RefineTextParams, Runtime
from chattts_ort.errors import ExportError
from chattts_ort.speaker import encode_spk_emb

TEXTS = ["hello world, this is chat tts speaking from onnx", "fast audio"]


@pytest.fixture(scope="module")
def rt(tiny_export):
    return Runtime.load(tiny_export, threads=1, max_context=512, max_batch=2)


def test_seeded_generation_is_reproducible(rt):
    p = InferCodeParams(max_new_token=30, min_new_token=30, manual_seed=123)
    a = rt.generate("hello", params=p).codes[0]
    b = rt.generate("hello", params=p).codes[0]
    c = rt.generate("hello", params=InferCodeParams(max_new_token=30, min_new_token=30, manual_seed=124)).codes[0]
    assert a.shape == (30, 4) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_generations_do_not_leak_into_each_other(rt, tiny_export):
    # Decode steps reuse the bindings of the first decode step; a new generation (other batch size, other
    # head, supplied noise) must bind afresh. The same request must give the same codes as on a fresh runtime.
    p = InferCodeParams(max_new_token=25, min_new_token=25, manual_seed=5)
    fresh = Runtime.load(tiny_export, threads=1, max_context=512, max_batch=2).generate("hello there", params=p)
    rt.generate(TEXTS, params=InferCodeParams(max_new_token=7, min_new_token=7, manual_seed=9))
    rt.refine_text("hi", params=RefineTextParams(max_new_token=5))
    rt.generate("x", params=InferCodeParams(max_new_token=6, min_new_token=6), noise=np.random.default_rng(2).exponential(size=(6, 4, 626)).astype(np.float32))
    again = rt.generate("hello there", params=p)
    assert np.array_equal(fresh.codes[0], again.codes[0]) and fresh.codes[0].shape == (25, 4)


def test_stream_frames_and_early_break(rt):
    frames = []
    for f in rt.stream("hello world", params=InferCodeParams(max_new_token=100, min_new_token=100, manual_seed=1)):
        frames.append(f)
        if len(frames) == 5:
            break
    assert [f.step for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].codes.shape == (4,) and frames[0].codes.dtype == np.int64
    # After the break the runtime is free again (the C++ loop was stopped and reset).
    assert rt.generate("hi", params=InferCodeParams(max_new_token=3, min_new_token=3)).codes[0].shape == (3, 4)


def test_generator_garbage_collected_frees_runtime(rt):
    it = rt.stream("hello", params=InferCodeParams(max_new_token=50, min_new_token=50))
    next(it)
    del it
    gc.collect()
    assert rt.generate("hi", params=InferCodeParams(max_new_token=2, min_new_token=2)).codes[0].shape == (2, 4)


def test_exception_in_consumer_stops(rt):
    with pytest.raises(KeyError):
        for f in rt.stream("hello", params=InferCodeParams(max_new_token=50, min_new_token=50)):
            raise KeyError("consumer failed")
    assert rt.generate("hi", params=InferCodeParams(max_new_token=2, min_new_token=2)).codes[0].shape == (2, 4)


def test_one_stream_at_a_time(rt):
    it = rt.stream("hello", params=InferCodeParams(max_new_token=20, min_new_token=20))
    next(it)
    with pytest.raises(RuntimeError, match="already generating"):
        rt.generate("hi", params=InferCodeParams(max_new_token=2))
    it.close()


def test_two_runtimes_in_two_threads(tiny_export):
    out, errors = {}, []

    def work(i):
        try:
            r = Runtime.load(tiny_export, threads=1, max_context=256)
            out[i] = r.generate("hello", params=InferCodeParams(max_new_token=40, min_new_token=40, manual_seed=9)).codes[0]
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert not errors and np.array_equal(out[0], out[1]) and out[0].shape == (40, 4)


def test_speaker_string_and_array_agree(rt):
    x = np.random.default_rng(0).standard_normal(64).astype(np.float16)
    p = InferCodeParams(max_new_token=20, min_new_token=20, manual_seed=4, return_hidden=True)
    a = rt.generate("hi", params=p, speaker=encode_spk_emb(x))
    b = rt.generate("hi", params=p, speaker=x)
    c = rt.generate("hi", params=p)
    assert np.array_equal(a.codes[0], b.codes[0]) and np.array_equal(a.hidden[0], b.hidden[0])
    # The speaker reaches the model (in this random model its effect is small, so compare hidden states).
    assert np.abs(a.hidden[0][0] - c.hidden[0][0]).max() > 1e-4


def test_context_full_stops_cleanly(tiny_export):
    r = Runtime.load(tiny_export, threads=1, max_context=24)
    gen = r.generate("hello", params=InferCodeParams(max_new_token=100, min_new_token=100))
    assert gen.stop_reason == "context_full" and 0 < len(gen.codes[0]) < 24


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(text=""), ValueError, "empty"),
    (dict(text=[]), ValueError, "no text"),
    (dict(text=3), TypeError, "str"),
    (dict(text="hi", params=InferCodeParams(temperature=0)), ValueError, "temperature"),
    (dict(text="hi", params=InferCodeParams(top_P=2)), ValueError, "top_P"),
    (dict(text="hi", params=InferCodeParams(top_K=0)), ValueError, "top_K"),
    (dict(text="hi", params=InferCodeParams(repetition_penalty=-1)), ValueError, "repetition_penalty"),
    (dict(text="hi", params=InferCodeParams(max_new_token=0)), ValueError, "max_new_token"),
    (dict(text="hi", speaker=np.zeros(5)), ValueError, "speaker"),
    (dict(text="hi", speaker="not a speaker"), ValueError, "spk_emb"),
    (dict(text="hi", noise=np.ones((3, 4, 626), np.float32)), ValueError, "noise"),
    (dict(text="hi " * 600), ValueError, "max_context"),
    (dict(text="\U0001F600 2026"), ValueError, "empty after normalisation"),
])
def test_bad_input(rt, kwargs, exc, match):
    kwargs = dict(kwargs)
    text = kwargs.pop("text")
    with pytest.raises(exc, match=match):
        list(rt.stream(text, **kwargs))
    # and the runtime still works
    assert rt.generate("hi", params=InferCodeParams(max_new_token=2, min_new_token=2)).codes[0].shape == (2, 4)


def test_bad_export_folders(tiny_export, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError):
        Runtime.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    (bad / "layer_01.onnx").unlink()
    with pytest.raises(ExportError, match="layer_01.onnx.*missing"):
        Runtime.load(bad)
    shutil.copyfile(tiny_export / "layer_00.onnx", bad / "layer_01.onnx")
    with pytest.raises(ExportError, match="layer_01.onnx"):
        Runtime.load(bad)  # size or sha256 differs from the manifest
    shutil.copyfile(tiny_export / "layer_01.onnx", bad / "layer_01.onnx")
    with open(bad / "head_code.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ExportError, match="sha256"):
        Runtime.load(bad)
    with pytest.raises(RuntimeError, match="head_code.onnx"):
        Runtime.load(bad, verify=False)  # corrupt bytes: the graph itself fails to load, or IO mismatch


def test_cuda_without_cuda_is_clear(tiny_export):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA"):
        Runtime.load(tiny_export, device="cuda")
    with pytest.raises(ValueError, match="device"):
        Runtime.load(tiny_export, device="tpu")


def test_profile_reports_blocks(rt):
    rt.profile(True)
    rt.generate("hello", params=InferCodeParams(max_new_token=10, min_new_token=10))
    p = rt.profile()
    rt.profile(False)
    assert p["steps"] == 10 and p["layers"] > 0 and p["sample"] > 0 and p["embed"] > 0


def test_demo_cli(tiny_export, capsys):
    from chattts_ort.cli import main

    assert main(["demo", "hello world", "--model", str(tiny_export), "--frames", "20", "--min-frames", "20",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "20 frames" in out and "real-time factor" in out and "time to first frame" in out


def test_spin_policy(tiny_export):
    """Spinning is chosen once per process (the thread pool is process-wide): explicit values are checked, and
    the automatic choice reads how busy the other processes keep the CPUs."""
    from chattts_ort.runtime import cpu_busy_fraction

    busy = cpu_busy_fraction(0.05)
    assert busy is None or 0.0 <= busy <= 1.0
    with pytest.raises(ValueError, match="spin"):
        Runtime.load(tiny_export, threads=1, spin="yes")
    r = Runtime.load(tiny_export, threads=1, spin=False)
    assert isinstance(r.spinning, bool)  # the first Runtime of the process fixed it (spin=False if it was this one)
    assert r.generate("hi", params=InferCodeParams(max_new_token=3, min_new_token=3)).codes[0].shape == (3, 4)
    r.close()


_SPIN_PROBE = r"""
import sys
from chattts_ort import Runtime
rt = Runtime.load(sys.argv[1], threads=1, spin=sys.argv[2] == "on")
print(rt.spinning)
"""


@pytest.mark.parametrize("want", ["on", "off"])
def test_spin_choice_reaches_the_thread_pool(tiny_export, want):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SPIN_PROBE, str(tiny_export), want], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == ("True" if want == "on" else "False")
