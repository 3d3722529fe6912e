"""spk_emb strings: base16384 + raw LZMA of fp16, as ChatTTS writes them."""
import os

import numpy as np
import pytest

from chattts_ort.speaker import b14_decode, b14_encode, decode_spk_emb, encode_spk_emb, random_speaker


def test_round_trip():
    x = np.random.default_rng(0).standard_normal(768).astype(np.float16)
    s = encode_spk_emb(x)
    assert all(0x3D00 <= ord(c) < 0x8E00 for c in s)
    np.testing.assert_array_equal(decode_spk_emb(s), x)
    assert decode_spk_emb(random_speaker(5)).shape == (768,)
    assert random_speaker(5) == random_speaker(5) != random_speaker(6)


def test_base16384_matches_pybase16384():
    b14 = pytest.importorskip("pybase16384", reason="pybase16384 not installed")
    for n in list(range(0, 30)) + [999, 1536]:
        d = os.urandom(n)
        assert b14_encode(d) == b14.encode_to_string(d)
        assert b14_decode(b14.encode_to_string(d)) == d


def test_base16384_round_trip_all_tail_lengths():
    for n in range(0, 50):
        d = os.urandom(n)
        assert b14_decode(b14_encode(d)) == d


def test_corrupt_and_wrong_size():
    with pytest.raises(ValueError, match="corrupt"):
        decode_spk_emb("hello")
    with pytest.raises(ValueError, match="non-empty"):
        decode_spk_emb("")
    with pytest.raises(ValueError, match="expected 768"):
        decode_spk_emb(encode_spk_emb(np.zeros(10, np.float16)))


def test_random_speaker_values_scale():
    from chattts_ort.speaker import RANDOM_SPEAKER_STD, random_speaker_values

    v = random_speaker_values(3)
    assert v.dtype == np.float16 and v.shape == (768,)
    assert abs(float(v.astype(np.float32).std()) / RANDOM_SPEAKER_STD - 1) < 0.1
    np.testing.assert_array_equal(decode_spk_emb(random_speaker(3)), v)
