"""A short workload for the ASan/UBSan build of the core (run by tools/sanitize.sh, not by hand).

Exercises every path of the core once or more: prefill and decode in both layer forms, batches with left or
right padding, supplied noise, greedy, text mode, early breaks, bad inputs refused inside the core, a batch
that grows the KV cache and the release of that growth, a refused allocation, non-finite checks, close while a
stream runs in another thread, and many short generations in a row.
"""
import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _load_core(so: str):
    """Put the sanitized build in place of the installed chattts_ort._core, before anything imports it."""
    import chattts_ort

    spec = importlib.util.spec_from_file_location("chattts_ort._core", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["chattts_ort._core"] = mod
    chattts_ort._core = mod
    return mod


core_module = _load_core(sys.argv[2])

from chattts_ort import InferCodeParams, RefineTextParams, Runtime  # noqa: E402
from chattts_ort._native import core  # noqa: E402
from chattts_ort.errors import GenerationError  # noqa: E402


def run(folder: Path) -> int:
    steps = 0
    rt = Runtime.load(folder, threads=2, max_context=256, max_batch=2)
    p = InferCodeParams(max_new_token=60, min_new_token=30, manual_seed=1, return_hidden=True)
    g = rt.generate(["hello world, this is a longer prompt", "fast"], params=p)
    steps += g.steps
    noise = np.random.default_rng(0).exponential(size=(40, 8, 626)).astype(np.float32)
    g = rt.generate(["hello", "world again"], params=InferCodeParams(max_new_token=40), noise=noise)
    steps += g.steps
    steps += rt.generate("hello", params=InferCodeParams(max_new_token=30, greedy=True)).steps
    rt.refine_text("hello world", params=RefineTextParams(max_new_token=20, manual_seed=2))
    for i, _ in enumerate(rt.stream("early break", params=InferCodeParams(max_new_token=100))):
        if i == 5:
            break
    g = rt.generate(["a"] * 9, params=InferCodeParams(max_new_token=10, min_new_token=10))  # KV grows to 9 rows
    steps += g.steps
    rt.release_memory()
    for _ in range(30):
        steps += rt.generate("short", params=InferCodeParams(max_new_token=5, min_new_token=5)).steps
    try:
        list(rt.stream("hello", speaker=np.full(64, 1e4)))
    except ValueError:
        pass
    r2 = Runtime.load(folder, threads=2, max_context=1000)
    errors = []

    def consume():
        try:
            for _ in r2.stream("hello world", params=InferCodeParams(max_new_token=900, min_new_token=900)):
                pass
        except GenerationError as e:
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)
    r2.close()
    t.join()
    assert errors, "close did not end the stream"
    rt.close()

    # Parallel streams (fused form): concurrent rows, long prompts growing the prefill buffers between decode
    # steps, early breaks, a paused consumer, cancel at exit, close while streaming.
    if rt.manifest["layer_form"] == "fused":
        r3 = Runtime.load(folder, threads=2, max_context=300, max_streams=3, queue_frames=4)
        outs = []

        def worker(i):
            text = "你好世界。" * (1 + 8 * i)  # one token a character: up to ~210-token prompts
            for j, f in enumerate(r3.stream(text, params=InferCodeParams(max_new_token=40 + 10 * i, manual_seed=i))):
                if i == 4 and j == 3:
                    break
            outs.append(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        paused = r3.stream("paused consumer", params=InferCodeParams(max_new_token=50))
        next(paused)
        [t.join() for t in threads]
        assert len(outs) == 6, outs
        steps += r3._scheduler.stats()["steps"]
        paused.close()
        live = r3.stream("closed while streaming", params=InferCodeParams(max_new_token=200, min_new_token=200))
        next(live)
        r3.close()
        try:
            list(live)
            raise AssertionError("a stream outlived close()")
        except GenerationError:
            pass

    # The audio engine: streams at the exact and a short lookahead, a batch, an early break, concurrent streams,
    # close while a stream speaks, and its own refusals.
    if rt.manifest.get("audio"):
        ra = Runtime.load(folder, threads=2, max_context=300, max_streams=2 if rt.manifest["layer_form"] == "fused" else 1)
        pa = InferCodeParams(max_new_token=70, min_new_token=70, manual_seed=3)
        n = sum(len(ch.samples) for ch in ra.stream_audio("hello audio", params=pa))
        assert n == 512 * 70 - 256, n
        n = sum(len(ch.samples) for ch in ra.stream_audio(["a batch", "of two"], params=pa, lookahead=8, chunk_frames=3))
        assert n == 2 * (512 * 70 - 256), n
        for i, _ in enumerate(ra.stream_audio("early break", params=pa, lookahead=0, chunk_frames=1)):
            if i == 2:
                break
        if ra.max_streams > 1:
            got = []
            ts = [threading.Thread(target=lambda i=i: got.append(ra.synthesize("concurrent %d" % i, params=pa)[0].size))
                  for i in range(2)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            assert got == [512 * 70 - 256] * 2, got
        eng = ra._audio
        for bad in ((-1, 4), (53, 4), (8, 0), (8, 10**6)):
            try:
                eng.open(*bad)
                raise AssertionError(f"the audio engine accepted {bad}")
            except RuntimeError:
                pass
        sid = eng.open(52, 4)
        for bad in (np.full((2, 64), np.nan, np.float32),):
            try:
                eng.push(sid, bad)
                raise AssertionError("non-finite frames were accepted")
            except RuntimeError:
                pass
        eng.push(sid, np.zeros((5, 64), np.float32))
        eng.finish(sid)
        try:
            eng.push(sid, np.zeros((1, 64), np.float32))
            raise AssertionError("frames after finish were accepted")
        except RuntimeError:
            pass
        eng.cancel(sid)
        live = ra.stream_audio("closed while speaking", params=InferCodeParams(max_new_token=200, min_new_token=200))
        next(live)
        ra.close()
        try:
            list(live)
            raise AssertionError("an audio stream outlived close()")
        except GenerationError:
            pass

    # The core's own refusals (below the Python checks).
    c = core()
    spec = c.ModelSpec()
    m = rt.manifest
    spec.embed = str(folder / m["graphs"]["embed"]["file"])
    spec.layers = [str(folder / e["file"]) for e in m["graphs"]["layers"]]
    spec.head_code = str(folder / m["graphs"]["head_code"]["file"])
    spec.head_text = str(folder / m["graphs"]["head_text"]["file"])
    spec.sample = str(folder / m["graphs"]["sample"]["file"])
    spec.hidden, spec.heads, spec.head_dim = 64, 4, 16
    spec.layer_form, spec.max_context = m["layer_form"], 64
    spec.num_layers, spec.layers_per_graph = m["config"]["num_layers"], m.get("layers_per_graph", 1)
    model = c.Model(spec)
    for rows in (2**60, 2**40):
        try:
            c.State(model, rows)
            raise AssertionError("a State of 2**40 rows was allocated")
        except RuntimeError as e:
            assert "overflows" in str(e) or "cannot allocate" in str(e), e
    st = c.State(model, 1)
    gs = c.GenerationSpec()
    gs.prompt_ids, gs.prompt_lens, gs.temperature = [21131, 5, 21132], [3], [0.3] * 4
    for bad in ({"prompt_lens": [4]}, {"prompt_lens": [64]}, {"prompt_ids": [21131, -1, 21132]},
                {"temperature": [0.3]}, {"eos_id": 626}):
        b = c.GenerationSpec()
        b.prompt_ids, b.prompt_lens, b.temperature = gs.prompt_ids, gs.prompt_lens, gs.temperature
        for k, v in bad.items():
            setattr(b, k, v)
        try:
            st.start(b)
            raise AssertionError(f"the core accepted {bad}")
        except RuntimeError:
            pass
    st.start(gs)
    while not st.step().done:
        steps += 1
    return steps


def main() -> int:
    root = Path(sys.argv[1])
    from chattts_ort._native import core

    assert core() is core_module, "the sanitized core is not the one in use"
    print(f"core under test: {core_module.__file__}", flush=True)
    total = 0
    t0 = time.perf_counter()
    for form in ("fused", "portable", "fused-2-per-graph"):
        total += run(root / form)
    print(f"sanitize workload: {total} decode steps over both layer forms and a 2-layers-per-graph export in "
          f"{time.perf_counter() - t0:.1f} s, no report", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
