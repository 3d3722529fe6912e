"""Property-based fuzzing of what a user hands the runtime: parameters, texts, speakers and manifests.

The property, every time: a clear exception (ValueError / TypeError / ChatTTSOrtError) or valid frames
(codes inside the vocabulary, finite hidden states); never a crash, a hang, or a non-finite value. Set
CHATTTS_ORT_FUZZ_REPORT=path to write the counts of what was tried (the README's reliability section).
"""
import atexit
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chattts_ort import InferCodeParams, Runtime
from chattts_ort.errors import ChatTTSOrtError, GenerationError
from chattts_ort.format import MANIFEST
from chattts_ort.speaker import encode_spk_emb

EXAMPLES = int(os.environ.get("CHATTTS_ORT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLEAN = (ValueError, TypeError, FileNotFoundError, ChatTTSOrtError)
COUNTS: Counter = Counter()


def _write_report():
    path = os.environ.get("CHATTTS_ORT_FUZZ_REPORT")
    if path and COUNTS:
        Path(path).write_text(json.dumps(dict(sorted(COUNTS.items())), indent=2))


atexit.register(_write_report)


@pytest.fixture(scope="module")
def rt(tiny_export):
    r = Runtime.load(tiny_export, threads=1, max_context=64, max_batch=2)
    yield r
    r.close()


def _frames_ok(frames, V=626, k=4):
    for f in frames:
        codes = np.asarray(f.codes)
        assert codes.shape == ((k,) if k > 1 else ()) and (codes >= 0).all() and (codes < V - 1).all(), codes
        if f.hidden is not None:
            assert np.isfinite(f.hidden).all(), "non-finite hidden state handed out"


def _try(kind: str, fn):
    """Run fn; a clean exception or valid frames pass, anything else fails the property."""
    COUNTS[f"{kind}: tried"] += 1
    try:
        frames = fn()
    except GenerationError:
        # the engine refused to hand out non-finite values: clean, but only acceptable if named
        COUNTS[f"{kind}: clean error"] += 1
        return
    except CLEAN:
        COUNTS[f"{kind}: clean error"] += 1
        return
    _frames_ok(frames)
    COUNTS[f"{kind}: valid frames"] += 1


hostile_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([np.float32(0.3), np.float64(1e-40), np.int64(7), np.uint64(2**63), True, None, "0.3", [0.3],
                     0, -1, 1e-30, 1e30, 2**64, np.nan]),
)
# Valid values of every field; each example then spoils up to two fields with hostile ones, so both sides of
# the property (clean error / valid frames) are exercised.
valid_fields = {
    "temperature": st.one_of(st.floats(min_value=1e-4, max_value=100.0),
                             st.lists(st.floats(min_value=0.01, max_value=3.0), min_size=4, max_size=4)),
    "top_P": st.floats(min_value=0.01, max_value=1.0),
    "top_K": st.integers(min_value=1, max_value=700),
    "repetition_penalty": st.floats(min_value=0.1, max_value=10.0),
    "max_new_token": st.integers(min_value=1, max_value=80),
    "min_new_token": st.integers(min_value=0, max_value=1),
    "manual_seed": st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    "greedy": st.booleans(),
}


@FUZZ
@given(fields=st.fixed_dictionaries(valid_fields),
       spoil=st.dictionaries(st.sampled_from(sorted(valid_fields)), hostile_numbers, max_size=2))
def test_fuzz_params(rt, fields, spoil):
    def go():
        p = InferCodeParams(**{**fields, **spoil}, return_hidden=True)
        return list(rt.stream("hello world", params=p))
    _try("params", go)


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.text(alphabet="abc ,.[]_0123456789\x00\u4e00", max_size=40),
                      st.lists(st.text(alphabet="hello wrd", max_size=12), max_size=3),
                      st.sampled_from(["[Stts]", "[uv_break]", "hello [laugh] world", "\u200b", "a" * 500])))
def test_fuzz_texts(rt, text):
    _try("texts", lambda: list(rt.stream(text, params=InferCodeParams(max_new_token=4, return_hidden=True))))


speaker_values = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=70),
    st.lists(st.floats(min_value=-50, max_value=50), min_size=64, max_size=64),
    st.lists(st.floats(min_value=-5, max_value=5), min_size=64, max_size=64),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda v: [v] * 64),
)


@FUZZ
@given(values=speaker_values, as_string=st.booleans(), cut=st.integers(0, 40), junk=st.text(max_size=8))
def test_fuzz_speakers(rt, values, as_string, cut, junk):
    def go():
        spk = values
        if as_string:
            with np.errstate(over="ignore"):
                spk = encode_spk_emb(np.asarray(values, np.float32) if values else [0.0])
            if cut % 3 == 0:
                spk = spk[: max(1, len(spk) - cut)] + junk  # truncated and garbled strings too
        return list(rt.stream("hello", speaker=spk, params=InferCodeParams(max_new_token=3, return_hidden=True)))
    _try("speakers", go)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=True), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(pick=st.integers(0, 10**6), value=json_values, delete=st.booleans())
def test_fuzz_manifests(tiny_export, tmp_path_factory, pick, value, delete):
    folder = tmp_path_factory.mktemp("m")
    for p in tiny_export.iterdir():
        if p.suffix in (".onnx", ".json") and p.name != "verify.json":
            os.link(p, folder / p.name)  # graphs shared (read-only use), manifest rewritten below
    (folder / MANIFEST).unlink()
    m = json.loads((tiny_export / MANIFEST).read_text())
    paths = [p for p in _paths(m) if p]
    path = paths[pick % len(paths)]
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    (folder / MANIFEST).write_text(json.dumps(m))

    def go():
        with Runtime.load(folder, threads=1, max_context=32) as r:
            return list(r.stream("hello", params=InferCodeParams(max_new_token=3, return_hidden=True)))
    try:
        _try("manifests", go)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
