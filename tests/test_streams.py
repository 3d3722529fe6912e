"""Parallel streams: one Runtime (max_streams > 1) serves concurrent streams batched step by step in the core.
What a stream samples must not depend on who else runs."""
import asyncio
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from chattts_ort import InferCodeParams, Runtime
from chattts_ort.errors import GenerationError

TEXTS = ["hello world", "fast audio now", "chat tts from onnx", "a b c d e f g", "the time", "run run run"]


@pytest.fixture(scope="module")
def fused(_private_cache):
    """The tiny export in the fused form (several streams need it; the portable form is refused, below)."""
    from chattts_ort.export.exporter import default_export

    return default_export("tiny", layer_form="fused")


@pytest.fixture(scope="module")
def rt(fused):
    r = Runtime.load(fused, threads=1, max_context=256, max_streams=4)
    yield r
    r.close()


@pytest.fixture(scope="module")
def solo(fused):
    r = Runtime.load(fused, threads=1, max_context=256)
    yield r
    r.close()


def _params(i, n=60, **kw):
    return InferCodeParams(max_new_token=n, min_new_token=kw.pop("min_new", n), manual_seed=kw.pop("seed", 100 + i),
                           temperature=[0.2 + 0.05 * i, 0.3, 0.4, 0.3 + 0.1 * (i % 3)], top_P=0.6 + 0.05 * (i % 5),
                           top_K=10 + 3 * i, repetition_penalty=1.0 + 0.05 * (i % 4), return_hidden=True, **kw)


def test_a_stream_alone_equals_the_single_generation_path(rt, solo):
    p = _params(0)
    a = solo.generate("hello world", params=p)
    b = rt.generate("hello world", params=p)
    assert np.array_equal(a.codes[0], b.codes[0]) and a.codes[0].shape == (60, 4)
    np.testing.assert_array_equal(a.hidden[0], b.hidden[0])


def test_concurrent_streams_equal_their_solo_runs(rt, solo):
    """Six threads, mixed lengths and parameters, more streams than rows (two wait in the FIFO)."""
    n_frames = [60, 25, 80, 40, 60, 10]
    want = {i: solo.generate(TEXTS[i], params=_params(i, n_frames[i])) for i in range(6)}
    got, errors = {}, []

    def work(i):
        try:
            got[i] = rt.generate(TEXTS[i], params=_params(i, n_frames[i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert not errors, errors
    same = total = 0
    for i in range(6):
        a, b = want[i].codes[0], got[i].codes[0]
        assert a.shape == b.shape == (n_frames[i], 4)
        same += int((a == b).all(axis=1).sum())
        total += len(a)
        np.testing.assert_allclose(want[i].hidden[0], got[i].hidden[0], atol=1e-4)
    print(f"identical frames: {same}/{total}")
    assert same / total >= 0.99
    stats = rt._scheduler.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0 and stats["prefills"] >= 6


def test_eos_ends_one_row_and_others_go_on(rt, solo):
    # min_new 0 lets EOS happen; each stream's stop reason and length equal its solo run.
    ps = [_params(i, 150, min_new=0, seed=124 + i) for i in range(4)]  # seeds whose streams end by EOS
    want = [solo.generate(TEXTS[i], params=ps[i]).codes[0] for i in range(4)]
    got = {}
    ts = [threading.Thread(target=lambda i=i: got.__setitem__(i, rt.generate(TEXTS[i], params=ps[i]).codes[0]))
          for i in range(4)]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert [len(w) for w in want] == [len(got[i]) for i in range(4)]
    assert any(len(w) < 150 for w in want), "no stream ended by EOS: pick other seeds"


def test_breaks_and_consumer_exceptions_free_the_row(rt, solo):
    def breaker():
        for f in rt.stream("hello world", params=_params(1, 200)):
            if f.step == 3:
                break

    def raiser():
        with pytest.raises(KeyError):
            for f in rt.stream("fast audio now", params=_params(2, 200)):
                if f.step == 5:
                    raise KeyError("consumer failed")

    other = {}
    ts = [threading.Thread(target=breaker), threading.Thread(target=raiser),
          threading.Thread(target=lambda: other.setdefault("g", rt.generate(TEXTS[3], params=_params(3, 70))))]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert np.array_equal(other["g"].codes[0], solo.generate(TEXTS[3], params=_params(3, 70)).codes[0])
    deadline = time.time() + 5
    while rt._scheduler.stats()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert rt._scheduler.stats()["active"] == 0


def test_a_consumer_that_stops_reading_does_not_stall_the_others(fused, solo):
    r = Runtime.load(fused, threads=1, max_context=256, max_streams=2, queue_frames=4)
    slow = r.stream("hello world", params=_params(0, 80))
    first = next(slow)  # then it stops reading: its queue fills and its row pauses
    time.sleep(0.2)
    t0 = time.perf_counter()
    fast = r.generate("fast audio now", params=_params(1, 80))
    assert time.perf_counter() - t0 < 10
    rest = [first] + list(slow)  # the paused stream resumes where it was, as if nothing happened
    assert np.array_equal(np.stack([f.codes for f in rest]), solo.generate("hello world", params=_params(0, 80)).codes[0])
    assert np.array_equal(fast.codes[0], solo.generate("fast audio now", params=_params(1, 80)).codes[0])
    r.close()


def test_waiting_for_a_row_times_out_with_a_clear_error(fused):
    r = Runtime.load(fused, threads=1, max_context=256, max_streams=2, queue_frames=2)
    held = [r.stream(TEXTS[i], params=_params(i, 100)) for i in range(2)]
    for h in held:
        next(h)  # both rows busy (paused: nobody reads)
    t0 = time.perf_counter()
    with pytest.raises(GenerationError, match="waited 0.3 s for a free stream"):
        r.generate("hello", params=InferCodeParams(max_new_token=5, queue_timeout=0.3))
    assert 0.25 < time.perf_counter() - t0 < 5
    for h in held:
        h.close()
    assert r.generate("hello", params=InferCodeParams(max_new_token=5, min_new_token=5)).codes[0].shape == (5, 4)
    r.close()


def test_close_ends_live_streams_in_their_consumers(fused):
    r = Runtime.load(fused, threads=1, max_context=1000, max_streams=3)
    errors, started = [], threading.Barrier(4)

    def work(i):
        try:
            for j, _ in enumerate(r.stream(TEXTS[i], params=_params(i, 900))):
                if j == 2:
                    started.wait(30)
        except GenerationError as e:
            errors.append(str(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    [t.start() for t in ts]
    started.wait(30)
    r.close()
    [t.join(30) for t in ts]
    assert len(errors) == 3 and all("closed" in e for e in errors), errors


def test_astream_for_asyncio(rt, solo):
    async def collect(i):
        return [f.codes async for f in rt.astream(TEXTS[i], params=_params(i, 30))]

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(3)))

    got = asyncio.run(main())
    for i in range(3):
        assert np.array_equal(np.stack(got[i]), solo.generate(TEXTS[i], params=_params(i, 30)).codes[0])


_SIGINT = r"""
import os, signal, sys, threading
from chattts_ort import InferCodeParams, Runtime
rt = Runtime.load(sys.argv[1], threads=1, max_context=1000, max_streams=2)
other = {}
t = threading.Thread(target=lambda: other.setdefault("n", len(rt.generate("fast audio now",
                     params=InferCodeParams(max_new_token=400, min_new_token=400)).codes[0])))
t.start()
try:
    for f in rt.stream("hello world", params=InferCodeParams(max_new_token=900, min_new_token=900)):
        if f.step == 20:
            os.kill(os.getpid(), signal.SIGINT)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", flush=True)
t.join()
print("other", other["n"], flush=True)
"""


def test_ctrl_c_in_one_consumer_cancels_only_its_row(fused):
    r = subprocess.run([sys.executable, "-c", _SIGINT, str(fused)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "interrupted" in r.stdout and "other 400" in r.stdout, r.stdout


def test_thousands_of_joins_and_leaves(fused):
    """2000 short streams from 8 threads (a fifth broken off early): no crash, no leak."""
    import psutil

    r = Runtime.load(fused, threads=1, max_context=128, max_streams=4)
    proc = psutil.Process()
    counts, rss = [], []

    def work(t):
        n = 0
        for i in range(250):
            p = InferCodeParams(max_new_token=3 + (i % 5), min_new_token=3 + (i % 5), manual_seed=i)
            for f in r.stream(TEXTS[(t + i) % len(TEXTS)], params=p):
                if i % 5 == 0 and f.step == 1:
                    break
                n += 1
        counts.append(n)

    for wave in range(2):
        ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        [t.start() for t in ts]
        [t.join(300) for t in ts]
        rss.append(proc.memory_info().rss)
    stats = r._scheduler.stats()
    assert len(counts) == 8 and stats["prefills"] == 2000 and stats["active"] == 0
    assert rss[1] - rss[0] < 20e6, f"RSS grew {(rss[1] - rss[0]) / 1e6:.1f} MB between two waves of 1000 streams"
    r.close()


def test_bad_use(fused):
    with pytest.raises(ValueError, match="max_streams"):
        Runtime.load(fused, max_streams=0)
    from chattts_ort.export.exporter import default_export

    portable = default_export("tiny", layer_form="portable")
    with pytest.raises(ValueError, match="fused"):
        Runtime.load(portable, max_streams=2)
    with pytest.raises(ValueError, match="queue_timeout"):
        InferCodeParams(queue_timeout=-1).validate()


def test_batch_invariant_streams_equal_their_solo_runs(fused):
    """batch_invariant=True runs every decode step over at least two rows (ONNX Runtime's 4-bit MatMulNBits
    computes a single row on another path); streams still equal their solo runs, and a lone stream too."""
    r = Runtime.load(fused, threads=1, max_context=256, max_streams=3, batch_invariant=True)
    alone = [r.generate(TEXTS[i], params=_params(i, 50)).codes[0] for i in range(3)]
    got = {}
    ts = [threading.Thread(target=lambda i=i: got.__setitem__(i, r.generate(TEXTS[i], params=_params(i, 50)).codes[0]))
          for i in range(3)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert all(np.array_equal(alone[i], got[i]) for i in range(3))
    r.close()
