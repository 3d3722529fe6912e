"""ChatTTS speaker embeddings: the spk_emb string form and a seeded random speaker.

A spk_emb string is base16384 text of the raw-LZMA2 (preset 9 | extreme) compression of the speaker's
768 fp16 values. base16384 is implemented here: every 7 bytes (56 bits) become four 14-bit code units, each
written as the character U+4E00 + value; a short last group is zero-padded and followed by one marker
character U+3D00 + (number of bytes in the last group).
"""
from __future__ import annotations

import lzma

import numpy as np

_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_BASE, _MARK = 0x4E00, 0x3D00


def b14_encode(data: bytes) -> str:
    out = []
    n = len(data)
    for off in range(0, n, 7):
        chunk = data[off:off + 7]
        k = len(chunk)
        v = int.from_bytes(chunk + b"\0" * (7 - k), "big")
        units = [(v >> (42 - 14 * j)) & 0x3FFF for j in range(4)]
        # A group of k bytes needs ceil(8k / 14) code units.
        need = (8 * k + 13) // 14
        out.extend(chr(_BASE + u) for u in units[:need])
        if k < 7:
            out.append(chr(_MARK + k))
    return "".join(out)


def b14_decode(text: str) -> bytes:
    tail = 7
    if text and _MARK < ord(text[-1]) < _MARK + 7:
        tail = ord(text[-1]) - _MARK
        text = text[:-1]
    vals = []
    for ch in text:
        u = ord(ch) - _BASE
        if not 0 <= u < 0x4000:
            raise ValueError(f"not a base16384 character: {ch!r}")
        vals.append(u)
    out = bytearray()
    for off in range(0, len(vals), 4):
        group = vals[off:off + 4]
        last = off + 4 >= len(vals)
        v = 0
        for j in range(4):
            v |= (group[j] if j < len(group) else 0) << (42 - 14 * j)
        b = v.to_bytes(7, "big")
        out += b[:tail] if last else b
    return bytes(out)


def encode_spk_emb(values) -> str:
    arr = np.asarray(values, dtype=np.float16).reshape(-1)
    return b14_encode(lzma.compress(arr.tobytes(), format=lzma.FORMAT_RAW, filters=_FILTERS))


# A real spk_emb string of 768 fp16 values is ~800 characters; anything far longer is not one.
MAX_SPK_EMB_CHARS = 16384


def decode_spk_emb(s: str, dim: int = 768) -> np.ndarray:
    """fp16 [dim] values of a spk_emb string; ValueError if it is corrupt or of the wrong size.

    Decompression stops after dim values plus one byte, so a small string that expands to gigabytes (an LZMA
    bomb) is rejected after reading only that much."""
    if not isinstance(s, str) or not s:
        raise ValueError("spk_emb must be a non-empty string")
    if len(s) > MAX_SPK_EMB_CHARS:
        raise ValueError(f"spk_emb has {len(s)} characters; a speaker of {dim} values has about {dim + dim // 20}")
    want = 2 * dim
    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_FILTERS)
        raw = d.decompress(b14_decode(s), max_length=want + 1)
    except (lzma.LZMAError, ValueError) as e:
        raise ValueError(f"corrupt spk_emb string: {e}") from e
    if len(raw) != want:
        more = " or more" if len(raw) > want else ""
        raise ValueError(f"spk_emb holds {len(raw) // 2}{more} values, expected {dim}")
    arr = np.frombuffer(raw, dtype=np.float16).copy()
    if not np.isfinite(arr).all():
        raise ValueError("spk_emb has non-finite values")
    return arr


def check_speaker_fp16(values: np.ndarray) -> None:
    """ChatTTS normalises a speaker in fp16 (x16 / fp16(||x16||)): a norm that overflows fp16 (or is zero)
    silently gives a zero speaker there. Refuse such values with the reason."""
    with np.errstate(over="ignore"):
        x16 = np.asarray(values, np.float16)
    if not np.isfinite(x16).all():
        raise ValueError("speaker has values that are not finite in fp16 (|x| > 65504)")
    norms = np.sqrt((x16.astype(np.float32) ** 2).sum(-1))
    with np.errstate(over="ignore"):
        overflow = bool((norms.astype(np.float16) == np.inf).any())
    if overflow:
        raise ValueError(f"speaker's norm ({float(norms.max()):.4g}) overflows fp16, where ChatTTS normalises it; "
                         "scale the speaker down")
    if (norms == 0).any():
        raise ValueError("speaker is all zeros")


# ChatTTS's spk_stat (per-dimension std and mean of its speakers, shipped in its config) has stds of 1.6 to
# 15.7, 3.75 on average, and means of magnitude ~1. We do not ship spk_stat; a random speaker is N(0, 3.75^2)
# per dimension: ChatTTS-like in scale, not in direction. The GPT sees only the normalised direction.
RANDOM_SPEAKER_STD = 3.75


def random_speaker_values(seed: int = 0, dim: int = 768) -> np.ndarray:
    """Seeded random speaker values, fp16 [dim] (see RANDOM_SPEAKER_STD)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(dim) * RANDOM_SPEAKER_STD).astype(np.float16)


def random_speaker(seed: int = 0, dim: int = 768) -> str:
    """A seeded random speaker as a spk_emb string (random_speaker_values, encoded)."""
    return encode_spk_emb(random_speaker_values(seed, dim))
