"""Seeded voices: chattts_ort.speaker reproduces torch.randn (CPU) bit for bit without torch, and with it
ChatTTS 0.2.5's sample_random_speaker() string for a seed."""
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from chattts_ort import speaker as spk
from chattts_ort.speaker import (decode_spk_emb, random_speaker, random_speaker_values, speaker_stats, torch_kernel,
                                 torch_randn, torch_randn_fp16, torch_seed)

# Seeds at the edges of what torch.manual_seed takes: 32-bit wrap-around, 64-bit, negative (two's complement).
EDGE_SEEDS = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**32 + 5, 2**53 + 3, 2**63 - 1, 2**63,
              2**63 + 7, 2**64 - 1, -1, -5, -(2**31), -(2**63), 123456789012345, 18446744069414584321]
SEEDS = EDGE_SEEDS + list(range(3, 2000))
SIZES = (16, 17, 31, 47, 1000)


def _torch():
    return pytest.importorskip("torch", reason="torch not installed (the reference for the emulation)")


def _installed_kernels(torch):
    cap = torch.backends.cpu.get_cpu_capability()
    return cap, torch_kernel(torch.__version__, cap), torch_kernel(torch.__version__, cap, np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_torch_seed_mapping():
    assert torch_seed(0) == 0 and torch_seed(2**32 - 1) == 2**32 - 1
    assert torch_seed(2**32) == 0 and torch_seed(2**32 + 7) == 7 and torch_seed(2**64 - 1) == 2**32 - 1
    assert torch_seed(-1) == 2**32 - 1 and torch_seed(-(2**63)) == 0
    assert torch_seed(np.int64(5)) == 5
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            torch_seed(bad)
    for bad in (1.0, "1", True, None):
        with pytest.raises(TypeError):
            torch_seed(bad)


def test_torch_seed_range_matches_torch():
    torch = _torch()
    for ok in (2**64 - 1, -(2**63)):
        torch.manual_seed(ok)
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises((RuntimeError, ValueError, OverflowError)):
            torch.manual_seed(bad)


def test_torch_kernel_versions():
    assert torch_kernel("2.1.0") == torch_kernel("2.11.0+cu130", "AVX512") == "legacy"
    assert torch_kernel("2.12.0", "AVX512") == torch_kernel("2.12.1", "DEFAULT") == "scalar"
    assert torch_kernel("2.13.0+cpu", "AVX2") == torch_kernel("2.14.0", "AVX512") == "avx2"
    assert torch_kernel("2.13.0", "DEFAULT") == torch_kernel("2.15.0", "SVE256") == "scalar"
    assert torch_kernel("2.9.1", "AVX2", np.float32) == "avx2"
    assert torch_kernel("2.9.1", "DEFAULT", "float32") == "scalar"
    with pytest.raises(ValueError):
        torch_kernel("nightly")


def test_argument_checks():
    with pytest.raises(ValueError, match="at least 16"):
        torch_randn_fp16(0, 15)
    with pytest.raises(ValueError, match="kernel"):
        torch_randn_fp16(0, 768, kernel="cuda")
    with pytest.raises(ValueError, match="legacy"):
        torch_randn(0, 768, np.float32, "legacy")
    with pytest.raises(ValueError, match="dtype"):
        torch_randn(0, 768, np.float64, "scalar")


def test_randn_fp16_bit_identical_to_installed_torch():
    """2,000 seeds of 768 values (ChatTTS's speaker size), and edge seeds at sizes with and without a tail."""
    torch = _torch()
    cap, k16, _ = _installed_kernels(torch)
    bad = []
    cases = [(s, 768) for s in SEEDS] + [(s, n) for s in EDGE_SEEDS for n in SIZES]
    for seed, n in cases:
        torch.manual_seed(seed)
        ref = torch.randn(n, dtype=torch.float16).numpy()
        if not _same_bits(torch_randn_fp16(seed, n, k16), ref):
            bad.append((seed, n))
    assert not bad, f"torch {torch.__version__} ({cap}, kernel {k16}): {len(bad)} of {len(cases)} differ: {bad[:5]}"


def test_randn_fp32_bit_identical_to_installed_torch():
    torch = _torch()
    cap, _, k32 = _installed_kernels(torch)
    bad = []
    cases = [(s, 768) for s in SEEDS[:400]] + [(s, n) for s in EDGE_SEEDS for n in SIZES]
    for seed, n in cases:
        torch.manual_seed(seed)
        ref = torch.randn(n, dtype=torch.float32).numpy()
        if not _same_bits(torch_randn(seed, n, np.float32, k32), ref):
            bad.append((seed, n))
    assert not bad, f"torch {torch.__version__} ({cap}, kernel {k32}): {len(bad)} of {len(cases)} differ: {bad[:5]}"


_OTHER_CAPABILITY = r"""
import json, sys, torch
out = {"version": torch.__version__, "cap": torch.backends.cpu.get_cpu_capability(), "f16": [], "f32": []}
for seed, n in json.loads(sys.argv[1]):
    torch.manual_seed(seed); out["f16"].append(torch.randn(n, dtype=torch.float16).numpy().tobytes().hex())
    torch.manual_seed(seed); out["f32"].append(torch.randn(n, dtype=torch.float32).numpy().tobytes().hex())
print(json.dumps(out))
"""


def test_randn_bit_identical_under_default_cpu_capability():
    """torch without its vector kernels (ATEN_CPU_CAPABILITY=default, as on a CPU without AVX2): the "scalar"
    kernel from 2.12 on, or "legacy" before."""
    torch = _torch()
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this torch already runs its DEFAULT kernels (the tests above cover them)")
    cases = [[s, 768] for s in EDGE_SEEDS + list(range(3, 100))] + [[s, n] for s in EDGE_SEEDS[:6] for n in SIZES]
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    run = subprocess.run([sys.executable, "-c", _OTHER_CAPABILITY, json.dumps(cases)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["cap"] == "DEFAULT", out["cap"]
    k16, k32 = torch_kernel(out["version"], "DEFAULT"), torch_kernel(out["version"], "DEFAULT", np.float32)
    for (seed, n), h16, h32 in zip(cases, out["f16"], out["f32"]):
        assert torch_randn_fp16(seed, n, k16).tobytes().hex() == h16, (seed, n, k16)
        assert torch_randn(seed, n, np.float32, k32).tobytes().hex() == h32, (seed, n, k32)


# torch.randn(n, dtype=torch.float16) of torch 2.11.0 (x86-64 wheel; its DEFAULT, AVX2 and AVX512 kernels alike)
# after torch.manual_seed(seed), for these cases, concatenated: the legacy kernel, which this torch no longer has.
LEGACY_CASES = [(s, 768) for s in range(2000)] + [(s, n) for s in (0, 1, 2**31, 2**32 - 1, 2**32, 2**63 + 7,
                                                                   2**64 - 1, -1) for n in (16, 17, 1000)]
LEGACY_SHA256 = "fb55468a31dbccff03f0ec692046724594c4f8c1f3ea73b081bf17d83325a804"
LEGACY_SEED0_HEAD = [0xBB36, 0x37B4, 0x3CCB, 0x3B40, 0x3A66, 0xB414, 0xBF8D, 0xB1DE]  # -0.9014, 0.4814, 1.198, ...


def test_legacy_kernel_matches_torch_2_11():
    assert torch_randn_fp16(0, 768, "legacy").view(np.uint16)[:8].tolist() == LEGACY_SEED0_HEAD
    h = hashlib.sha256()
    for seed, n in LEGACY_CASES:
        h.update(torch_randn_fp16(seed, n, "legacy").tobytes())
    assert h.hexdigest() == LEGACY_SHA256


def test_legacy_is_the_default():
    assert spk.CHATTTS_TORCH_KERNEL == "legacy"
    assert _same_bits(torch_randn_fp16(9, 768), torch_randn_fp16(9, 768, "legacy"))


def _chattts_dir():
    spec = importlib.machinery.PathFinder.find_spec("ChatTTS")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the chattts package is not installed (pip install --no-deps chattts==0.2.5)")
    return Path(list(spec.submodule_search_locations)[0])


def _spk_stat_text(root: Path) -> str:
    import ast

    for node in ast.walk(ast.parse((root / "config" / "config.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "spk_stat":
            return ast.literal_eval(node.value)
    pytest.fail("no spk_stat in ChatTTS's config.py")


def _load_chattts_speaker_class(root: Path):
    """ChatTTS/model/speaker.py without the package's __init__ (which imports torchaudio): stub packages for
    ChatTTS and ChatTTS.model in sys.modules while the file is executed, removed afterwards."""
    names = ("ChatTTS", "ChatTTS.model", "ChatTTS.model.speaker")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for name, path in (("ChatTTS", root), ("ChatTTS.model", root / "model")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
        spec = importlib.util.spec_from_file_location("ChatTTS.model.speaker", root / "model" / "speaker.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ChatTTS.model.speaker"] = mod
        spec.loader.exec_module(mod)
        return mod.Speaker
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def test_speaker_stats_are_chattts_spk_stat():
    root = _chattts_dir()
    stats = speaker_stats()
    assert stats is not None
    std, mean = stats
    assert std.dtype == mean.dtype == np.float16 and std.shape == mean.shape == (768,)
    raw = np.frombuffer(spk.b14_decode(_spk_stat_text(root)), np.float16)
    assert _same_bits(np.concatenate([std, mean]), raw)
    assert float(std.min()) > 0


def test_random_speaker_is_chattts_sample_random_speaker():
    """ChatTTS's own Speaker(768, spk_stat).sample_random() after torch.manual_seed(seed), on this torch, for 200
    seeds: its string holds our values bit for bit, and for 30 seeds random_speaker's whole string is its string
    (the encoding being a function of the values; LZMA preset 9 | extreme costs ~35 ms a string)."""
    torch = _torch()
    pytest.importorskip("pybase16384", reason="pybase16384 not installed (ChatTTS's speaker.py imports it)")
    root = _chattts_dir()
    assert speaker_stats() is not None  # read before the stub packages exist (it ignores them anyway)
    Speaker = _load_chattts_speaker_class(root)
    chat_spk = Speaker(768, _spk_stat_text(root), torch.device("cpu"))
    _, k16, _ = _installed_kernels(torch)
    seeds = EDGE_SEEDS + list(range(3, 183))
    bad = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        ref = chat_spk.sample_random()
        if not _same_bits(decode_spk_emb(ref), random_speaker_values(seed, kernel=k16)):
            bad.append(seed)
        elif i < 30 and random_speaker(seed, 768, kernel=k16) != ref:
            bad.append(seed)
    assert not bad, f"{len(bad)} of {len(seeds)} seeds differ: {bad[:5]}"


def test_encoding_is_chattts_encoding():
    """encode_spk_emb is ChatTTS's Speaker._encode: raw LZMA2 (preset 9 | extreme) then pybase16384."""
    b14 = pytest.importorskip("pybase16384", reason="pybase16384 not installed")
    import lzma

    for seed in (0, 1, 2**40):
        v = torch_randn_fp16(seed, 768) * np.float16(4)
        packed = lzma.compress(v.tobytes(), format=lzma.FORMAT_RAW,
                               filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        assert spk.encode_spk_emb(v) == b14.encode_to_string(packed)


def test_random_speaker_values_with_given_stats():
    """The ChatTTS recipe with any (std, mean): randn in fp16, times std rounded to fp16, plus mean rounded."""
    rng = np.random.default_rng(0)
    std = (rng.random(768) * 5 + 1).astype(np.float16)
    mean = rng.standard_normal(768).astype(np.float16)
    z = torch_randn_fp16(11, 768).astype(np.float32)
    want = ((z * std.astype(np.float32)).astype(np.float16).astype(np.float32) + mean.astype(np.float32))
    got = random_speaker_values(11, 768, stats=(std, mean))
    assert _same_bits(got, want.astype(np.float16))
    assert decode_spk_emb(random_speaker(11, 768, stats=(std, mean))).tobytes() == got.tobytes()


def test_fallback_without_chattts_warns_once(monkeypatch):
    monkeypatch.setattr(spk, "speaker_stats", lambda: None)
    monkeypatch.setattr(spk, "_warned_no_stats", False)
    spk._random_speaker.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"pip install --no-deps chattts==0\.2\.5"):
            v = random_speaker_values(4)
        want = (np.random.default_rng(4).standard_normal(768) * spk.RANDOM_SPEAKER_STD).astype(np.float16)
        assert _same_bits(v, want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            random_speaker_values(5)  # once only
            assert decode_spk_emb(random_speaker(6), 768).shape == (768,)
    finally:
        spk._random_speaker.cache_clear()


def test_other_dims_use_the_fallback_silently(monkeypatch):
    """The tiny test model (hidden 64) can't take ChatTTS's 768-value speakers: N(0, RANDOM_SPEAKER_STD^2)
    values, with or without spk_stat, and no warning."""
    stats = (np.ones(768, np.float16), np.zeros(768, np.float16))
    want = (np.random.default_rng(3).standard_normal(64) * spk.RANDOM_SPEAKER_STD).astype(np.float16)
    monkeypatch.setattr(spk, "_warned_no_stats", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same_bits(random_speaker_values(3, 64, stats=stats), want)
        monkeypatch.setattr(spk, "speaker_stats", lambda: None)
        assert _same_bits(random_speaker_values(3, 64), want)
        assert decode_spk_emb(random_speaker(3, 64), 64).tobytes() == want.tobytes()


def test_random_speaker_is_cached_and_fast():
    import time

    random_speaker(424242)
    t = time.perf_counter()
    for _ in range(100):
        random_speaker(424242)
    assert (time.perf_counter() - t) / 100 < 1e-3
    t = time.perf_counter()
    torch_randn_fp16(424243, 768)
    assert time.perf_counter() - t < 0.05
