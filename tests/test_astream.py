"""Runtime.astream_audio: speech for asyncio servers, where a request waiting for a row, or a stream waiting for its
next chunk, holds no thread (the crowds issue: waiters used to sit in asyncio's few worker threads, ahead of live
streams' next chunks)."""
import asyncio
import threading
import time

import numpy as np
import pytest

from chattts_ort import GenerationError, InferCodeParams, Runtime


@pytest.fixture(scope="module")
def rt(tiny_export):
    if "-portable-" in tiny_export.name:
        pytest.skip("many streams need the fused layer form")
    r = Runtime.load(tiny_export, threads=1, max_context=256, max_streams=2)
    yield r
    r.close()


def P(seed, n=40, **kw):
    return InferCodeParams(max_new_token=n, min_new_token=n, manual_seed=seed, **kw)


async def collect(agen):
    parts = []
    async for ch in agen:
        parts.append(ch.samples)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def test_equals_stream_audio(rt):
    for dtype in ("float32", "int16"):
        want = np.concatenate([c.samples for c in rt.stream_audio("你好，欢迎。", params=P(3), dtype=dtype)])
        got = asyncio.run(collect(rt.astream_audio("你好，欢迎。", params=P(3), dtype=dtype)))
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_waiting_requests_hold_no_thread(rt):
    """20 requests on 2 rows: all complete, each equal to its solo run, with no more threads than at the start
    plus the few the front-end's worker calls use."""
    n = 20
    want = {i: asyncio.run(collect(rt.astream_audio("今天天气不错。", params=P(i, 20)))) for i in (0, 7, 19)}
    peak = [threading.active_count()]

    async def watch(stop):
        while not stop.is_set():
            peak[0] = max(peak[0], threading.active_count())
            await asyncio.sleep(0.01)

    async def main():
        stop = asyncio.Event()
        w = asyncio.create_task(watch(stop))
        out = await asyncio.gather(*[collect(rt.astream_audio("今天天气不错。", params=P(i, 20))) for i in range(n)])
        stop.set()
        await w
        return out

    before = threading.active_count()
    got = asyncio.run(main())
    for i, w in want.items():
        assert np.array_equal(got[i], w)
    assert all(len(g) > 0 for g in got)
    # asyncio's default executor may start up to min(32, CPUs + 4) workers for the front-end calls; the 18
    # waiting requests must not each hold one.
    assert peak[0] - before <= 6, (before, peak[0])
    assert rt._scheduler.stats()["active"] == 0 and rt._scheduler.stats()["waiting"] == 0


def test_queue_timeout_counts_from_the_call_and_cancel_frees_the_place(tiny_export):
    if "-portable-" in tiny_export.name:
        pytest.skip("many streams need the fused layer form")
    # 8 queued frames per stream: a consumer that stops reading holds its row
    rt = Runtime.load(tiny_export, threads=1, max_context=256, max_streams=2, queue_frames=8)

    async def main():
        # two streams that hold both rows: each has given its first chunk and its consumer reads no more
        long = [rt.astream_audio("长的。", params=P(50 + i, 200)) for i in range(2)]
        for agen in long:
            await agen.__anext__()
        t0 = time.perf_counter()
        with pytest.raises(GenerationError, match="free stream"):
            await collect(rt.astream_audio("等一下。", params=P(1, 10, queue_timeout=0.3)))
        waited = time.perf_counter() - t0
        # a waiter that is cancelled leaves the queue at once
        waiter = asyncio.create_task(collect(rt.astream_audio("等一下。", params=P(2, 10))))
        await asyncio.sleep(0.1)
        assert rt._scheduler.stats()["waiting"] == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert rt._scheduler.stats()["waiting"] == 0
        for agen in long:
            await agen.aclose()
        return waited

    waited = asyncio.run(main())
    assert 0.25 <= waited < 1.5, waited
    assert rt._scheduler.stats()["active"] == 0
    rt.close()


def test_astream_codes_equal_stream(rt):
    async def frames():
        return [f async for f in rt.astream(["你好。", "hello there"], params=P(9, 30))]

    want = rt.generate(["你好。", "hello there"], params=P(9, 30))
    got = asyncio.run(frames())
    for row in range(2):
        codes = np.array([f.codes for f in got if f.row == row])
        assert np.array_equal(codes, want.codes[row])


def test_close_ends_live_streams_with_generation_error(tiny_export):
    if "-portable-" in tiny_export.name:
        pytest.skip("many streams need the fused layer form")
    r = Runtime.load(tiny_export, threads=1, max_context=256, max_streams=2, queue_frames=4)
    live = r.stream("一直说。", params=P(1, 200))
    next(live)

    async def main():
        agen = r.astream("一直说。", params=P(2, 200))
        await agen.__anext__()
        r.close()
        with pytest.raises(GenerationError):
            async for _ in agen:
                pass

    asyncio.run(main())
    with pytest.raises(GenerationError):
        list(live)
