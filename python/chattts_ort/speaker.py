"""ChatTTS speaker embeddings: the spk_emb string form and a seeded random speaker.

A spk_emb string is base16384 text of the raw-LZMA2 (preset 9 | extreme) compression of the speaker's
768 fp16 values. base16384 is implemented here: every 7 bytes (56 bits) become four 14-bit code units, each
written as the character U+4E00 + value; a short last group is zero-padded and followed by one marker
character U+3D00 + (number of bytes in the last group).
"""
from __future__ import annotations

import ast
import functools
import importlib.machinery
import lzma
import re
import warnings
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------------------
# Seeded voices. ChatTTS 0.2.5 samples a speaker as torch.randn(768, dtype=float16) * std + mean (fp16 ops),
# std and mean being its spk_stat (shipped in its config as base16384 of 1536 raw fp16 values: std, then mean).
# The same seed gives the same voice here only if torch.randn is reproduced bit for bit, which is done below
# with numpy. What torch.randn(n, dtype=float16) returns on the CPU for n >= 16 depends on the torch version
# and, from 2.13 on, on the CPU (ATen/native/cpu/DistributionTemplates.h of each release):
#   "legacy"  torch <= 2.11: n uniforms (mt19937 draw & 2047) / 2048, then Box-Muller on each 16 (u1 = 1 - x[j],
#             u2 = x[j + 8], j < 8) with every intermediate a Half: log, sqrt, cos and sin are the float libm
#             functions rounded to Half, theta = (double)2pi * u2 rounded to float then to Half; a tail of
#             n % 16 values is recomputed from 16 more uniforms over the last 16 places.
#   "scalar"  torch 2.12 (any CPU), and later releases on CPUs without AVX2: 16 uniforms (draw & 0xFFFFFF)
#             / 2^24 per block, Box-Muller in float32 with the C library's logf, cosf, sinf, each result
#             rounded once to Half; the tail block draws its own 16 uniforms after the full blocks.
#   "avx2"    torch >= 2.13 on x86 CPUs with AVX2 or AVX-512: as "scalar" but with the Cephes-style AVX
#             approximations of log and sincos (ATen/native/cpu/avx_mathfun.h) as GCC compiles them (each
#             multiply that feeds an add fused into an FMA), theta computed in float32.
# The ChatTTS 0.2.5 release was current with torch 2.11: its seeded voices, as they were heard and shared,
# are "legacy" ones, the default here. On a CUDA device ChatTTS samples with the GPU's Philox generator
# instead: other voices again, not reproduced here.
CHATTTS_SPEAKER_DIM = 768
TORCH_KERNELS = ("legacy", "scalar", "avx2")
CHATTTS_TORCH_KERNEL = "legacy"


def torch_kernel(torch_version: str, cpu_capability: str = "AVX2", dtype=np.float16) -> str:
    """The kernel of TORCH_KERNELS that torch `torch_version` runs for randn(n, dtype=dtype) on a CPU whose
    torch.backends.cpu.get_cpu_capability() is `cpu_capability`. float32 has one algorithm per CPU capability
    in the torch releases read (2.1 to 2.14): "avx2" on AVX2 and AVX512, "scalar" elsewhere. Checked bit for
    bit against the x86-64 Linux wheels of 2.11, 2.12 and 2.13 (GCC builds; a build whose compiler does not
    fuse multiply-adds would differ in the last float32 bit now and then)."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if not m:
        raise ValueError(f"not a torch version: {torch_version!r}")
    version = (int(m.group(1)), int(m.group(2)))
    vector = cpu_capability.upper() in ("AVX2", "AVX512")
    if np.dtype(dtype) == np.float32:
        return "avx2" if vector else "scalar"
    if version <= (2, 11):
        return "legacy"
    return "avx2" if version >= (2, 13) and vector else "scalar"


def torch_seed(seed: int) -> int:
    """The key torch.manual_seed(seed) gives the CPU generator's mt19937: seed read as an unsigned 64-bit
    number (a negative one in two's complement; torch takes -2^63 <= seed < 2^64), its low 32 bits."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, not {type(seed).__name__}")
    seed = int(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed {seed} is outside torch's range [-2^63, 2^64)")
    return seed & 0xFFFFFFFF


def mt19937_u32(seed: int, count: int) -> np.ndarray:
    """The first `count` 32-bit outputs of torch's CPU generator after torch.manual_seed(seed)."""
    # numpy's legacy seeding of an integer is the same init_genrand as torch's; its key, at position 624
    # (a twist before the first output), continues as numpy's MT19937 bit generator.
    key = np.random.RandomState(torch_seed(seed)).get_state(legacy=False)["state"]["key"]
    bits = np.random.MT19937(0)
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return bits.random_raw(count).astype(np.uint32)


_F32 = np.float32
_ZERO = _F32(0.0)


def _half_of_float(x) -> np.ndarray:
    """A float32 result stored as Half (x given in float64 is first rounded to float32, as a float libm
    function's result is)."""
    return np.asarray(x).astype(np.float32).astype(np.float16)


@functools.lru_cache(maxsize=1)
def _legacy_tables():
    """radius, cos, sin of the legacy kernel as functions of the 11-bit uniforms (each a Half)."""
    k = np.arange(2048, dtype=np.float64)
    log_u1 = _half_of_float(np.log(1.0 - k / 2048))  # std::log(Half) is logf rounded to Half
    radius = _half_of_float(np.sqrt(_F32(-2.0) * log_u1.astype(np.float32)))  # -2 * Half is exact
    theta = _half_of_float(2.0 * np.pi * (k / 2048)).astype(np.float64)  # double, to float, to Half
    return radius, _half_of_float(np.cos(theta)), _half_of_float(np.sin(theta))


def _legacy_block(draws: np.ndarray) -> np.ndarray:
    radius, cos, sin = _legacy_tables()
    k = (draws & 2047).astype(np.intp).reshape(-1, 2, 8)
    r = radius[k[:, 0]].astype(np.float32)
    # Half * Half is exact in float and rounded once to Half; * std (1) changes nothing, + mean (+0) turns -0
    # into +0.
    a = (r * cos[k[:, 1]].astype(np.float32)).astype(np.float16).astype(np.float32) + _ZERO
    b = (r * sin[k[:, 1]].astype(np.float32)).astype(np.float16).astype(np.float32) + _ZERO
    return np.concatenate([a, b], axis=1).reshape(-1)


@functools.lru_cache(maxsize=1)
def _libm():
    """logf, cosf, sinf of the C library (what torch's scalar kernel calls), or None where it can't be found."""
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        fns = []
        for fn in ("logf", "cosf", "sinf"):
            f = getattr(lib, fn)
            f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
            fns.append(f)
        return tuple(fns)
    except (OSError, AttributeError, TypeError):
        return None


def _float_fn(x: np.ndarray, libm_fn, np_fn) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if libm_fn is not None:
        return np.array([libm_fn(v) for v in x.ravel().tolist()], np.float32).reshape(x.shape)
    return np_fn(x.astype(np.float64)).astype(np.float32)  # correctly rounded; libms are within 1 ulp


def _scalar_block(draws: np.ndarray) -> np.ndarray:
    k = (draws & 0xFFFFFF).astype(np.float64).reshape(-1, 2, 8)
    logf, cosf, sinf = _libm() or (None, None, None)
    u1 = (1.0 - k[:, 0] * 2.0 ** -24).astype(np.float32)  # exact
    radius = np.sqrt(_F32(-2.0) * _float_fn(u1, logf, np.log))
    theta = (2.0 * np.pi * (k[:, 1] * 2.0 ** -24)).astype(np.float32)  # a double product, to float
    a = radius * _float_fn(theta, cosf, np.cos) + _ZERO
    b = radius * _float_fn(theta, sinf, np.sin) + _ZERO
    return np.concatenate([a, b], axis=1).reshape(-1)


def _fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, exactly rounded: a*b is exact in float64, the sum's error is recovered
    (TwoSum) to settle the one case where rounding the float64 sum to float32 could go the wrong way."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    r = s.astype(np.float32)
    other = np.nextafter(r, np.where(s > r.astype(np.float64), _F32(np.inf), _F32(-np.inf)))
    tie = (r.astype(np.float64) + other.astype(np.float64)) * 0.5 == s
    fix = tie & (err != 0) & ((err > 0) == (other > r))
    return np.where(fix, other, r)


def _c_float(v: float) -> np.float32:
    return _F32(float(v))  # a C double literal stored in a float constant


_SQRT_HALF = _c_float(0.707106781186547524)
_LOG_P = [_c_float(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                 3.3333331174e-1)]
_LOG_Q1, _LOG_Q2 = _c_float(-2.12194440e-4), _c_float(0.693359375)
_DP = [_c_float(-0.78515625), _c_float(-2.4187564849853515625e-4), _c_float(-3.77489497744594108e-8)]
_SIN_P = [_c_float(-1.9515295891e-4), _c_float(8.3321608736e-3), _c_float(-1.6666654611e-1)]
_COS_P = [_c_float(2.443315711809948e-5), _c_float(-1.388731625493765e-3), _c_float(4.166664568298827e-2)]
_FOUR_OVER_PI = _c_float(1.27323954473516)
_TWO_PI_F = _F32(2.0 * np.pi)


def _avx_log(x: np.ndarray) -> np.ndarray:
    """Cephes-style logf for normal positive float32 x: exponent and mantissa in [sqrt(1/2), sqrt(2)), a
    degree-9 polynomial, the exponent's log(2) added back in two parts."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 126).astype(np.float32)
    m = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(np.float32)  # mantissa in [0.5, 1)
    small = m < _SQRT_HALF
    f = (m - _F32(1.0)) + np.where(small, m, _ZERO)
    e = e - np.where(small, _F32(1.0), _ZERO)
    z = f * f
    y = np.full_like(f, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma32(y, f, p)
    y = _fma32(y * f, z, e * _LOG_Q1)
    y = y - z * _F32(0.5)
    return _fma32(e, _LOG_Q2, f + y)


def _avx_sincos(x: np.ndarray):
    """Cephes-style sinf and cosf of float32 x >= 0: octant j from x * 4/pi, x reduced by j * pi/4 in three
    parts, a polynomial for each function on [-pi/4, pi/4] and the octant's signs."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)  # truncation
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    for dp in _DP:
        x = _fma32(y, dp, x)
    sin_sign = ((j & 4).astype(np.uint32) << 29)
    cos_sign = ((~(j - 2) & 4).astype(np.uint32) << 29)
    first = (j & 2) == 0
    z = x * x
    pc = _fma32(_fma32(_COS_P[0], z, _COS_P[1]), z, _COS_P[2]) * z
    pc = _fma32(pc, z, -(z * _F32(0.5))) + _F32(1.0)
    ps = _fma32(_fma32(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2]) * z
    ps = _fma32(ps, x, x)
    # avx_mathfun picks each function's polynomial by masking and adding zeros; the adds are kept for -0.
    sin_a, sin_b = np.where(first, _ZERO, pc), np.where(first, ps, _ZERO)
    cos_a, cos_b = pc - sin_a, ps - sin_b
    s = (sin_a + sin_b).view(np.uint32) ^ sin_sign
    c = (cos_a + cos_b).view(np.uint32) ^ cos_sign
    return s.view(np.float32), c.view(np.float32)


def _avx2_block(draws: np.ndarray) -> np.ndarray:
    k = (draws & 0xFFFFFF).astype(np.float64).reshape(-1, 2, 8)
    u = (k * 2.0 ** -24).astype(np.float32)
    radius = np.sqrt(_F32(-2.0) * _avx_log(_F32(1.0) - u[:, 0]))
    s, c = _avx_sincos(_TWO_PI_F * u[:, 1])
    return np.concatenate([radius * c + _ZERO, radius * s + _ZERO], axis=1).reshape(-1)


_BLOCKS = {"legacy": _legacy_block, "scalar": _scalar_block, "avx2": _avx2_block}


def torch_randn(seed: int, n: int, dtype=np.float16, kernel: str = CHATTTS_TORCH_KERNEL) -> np.ndarray:
    """torch.randn(n, dtype=dtype) on the CPU right after torch.manual_seed(seed), bit for bit, for n >= 16
    (torch takes another path below 16), with `kernel` naming the torch (see TORCH_KERNELS, torch_kernel).
    dtype float16 or float32; float32 has no "legacy" kernel: torch <= 2.11 used "scalar" or "avx2" for it
    as torch_kernel("2.13", capability) says."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"dtype must be float16 or float32, not {dtype}")
    if kernel not in _BLOCKS:
        raise ValueError(f"kernel must be one of {TORCH_KERNELS}, not {kernel!r}")
    if kernel == "legacy" and dtype == np.float32:
        raise ValueError("the legacy kernel is torch's float16 path; float32 uses 'scalar' or 'avx2'")
    n = int(n)
    if n < 16:
        raise ValueError(f"n must be at least 16 (torch uses another algorithm below), not {n}")
    full = n - n % 16
    # float16 since 2.12 draws 16 uniforms per block and the tail's 16 right after the full blocks; the
    # others draw n uniforms first and the tail's 16 after all of them.
    tail_at = full if (dtype == np.float16 and kernel != "legacy") else n
    draws = mt19937_u32(seed, tail_at + 16 if n % 16 else n)
    block = _BLOCKS[kernel]
    out = np.empty(n, np.float32)
    out[:full] = block(draws[:full])
    if n % 16:
        out[n - 16:] = block(draws[tail_at:tail_at + 16])
    return out.astype(dtype)


def torch_randn_fp16(seed: int, n: int, kernel: str = CHATTTS_TORCH_KERNEL) -> np.ndarray:
    """torch.randn(n, dtype=torch.float16) after torch.manual_seed(seed), on the CPU (see torch_randn)."""
    return torch_randn(seed, n, np.float16, kernel)


@functools.lru_cache(maxsize=1)
def speaker_stats():
    """ChatTTS's spk_stat as (std, mean), fp16 [768] each, read from the installed `chattts` package's
    config/config.py (parsed, not imported), or None when the package is not installed or unreadable."""
    # PathFinder looks on sys.path only: neither the package's __init__ (which imports torchaudio) runs, nor
    # does a module already in sys.modules under the name stand in for the installed package.
    try:
        spec = importlib.machinery.PathFinder.find_spec("ChatTTS")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "config" / "config.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and node.target.id == "spk_stat" and node.value is not None):
                try:
                    text = ast.literal_eval(node.value)
                    raw = b14_decode(text)
                except ValueError:
                    return None
                if not isinstance(text, str) or len(raw) < 4 or len(raw) % 4:
                    return None
                stat = np.frombuffer(raw, dtype=np.float16).copy()
                std, mean = stat[: stat.size // 2], stat[stat.size // 2:]
                if not (np.isfinite(std).all() and np.isfinite(mean).all()):
                    return None
                std.flags.writeable = mean.flags.writeable = False
                return std, mean
    return None


def chattts_speaker_values(seed: int, std: np.ndarray, mean: np.ndarray,
                           kernel: str = CHATTTS_TORCH_KERNEL) -> np.ndarray:
    """ChatTTS's torch.manual_seed(seed); randn(dim, dtype=float16).mul_(std).add_(mean): each op in float,
    rounded to fp16."""
    z = torch_randn_fp16(seed, std.size, kernel).astype(np.float32)
    x = (z * std.astype(np.float32)).astype(np.float16).astype(np.float32)
    return (x + mean.astype(np.float32)).astype(np.float16)


# The scale of a ChatTTS speaker: the root mean square of spk_stat's std and mean, sqrt(mean(std^2 + mean^2)),
# is 4.65 (its stds run from 1.6 to 15.7). Without ChatTTS's spk_stat a random speaker is N(0, 4.65^2) per
# dimension: ChatTTS-like in scale, not in direction. The GPT sees only the normalised direction.
RANDOM_SPEAKER_STD = 4.65
_warned_no_stats = False


def _fallback_values(seed: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(dim) * RANDOM_SPEAKER_STD).astype(np.float16)


def random_speaker_values(seed: int = 0, dim: int = CHATTTS_SPEAKER_DIM, stats=None,
                          kernel: str = CHATTTS_TORCH_KERNEL) -> np.ndarray:
    """Seeded random speaker values, fp16 [dim]: ChatTTS's own voice for the seed (chattts_speaker_values)
    when its spk_stat is at hand (`stats` as (std, mean), default speaker_stats()) and has dim values;
    else N(0, RANDOM_SPEAKER_STD^2) per dimension, with a warning (once) when dim is ChatTTS's."""
    global _warned_no_stats
    if stats is None:
        stats = speaker_stats()
    if stats is not None and len(stats[0]) == dim:
        return chattts_speaker_values(seed, np.asarray(stats[0], np.float16), np.asarray(stats[1], np.float16),
                                      kernel)
    if stats is None and dim == CHATTTS_SPEAKER_DIM and not _warned_no_stats:
        _warned_no_stats = True
        warnings.warn("ChatTTS's speaker statistics (spk_stat) are not at hand: seeded voices are random "
                      "speakers of this package, not ChatTTS's voices for the same seeds. To get those, "
                      "install the chattts package without its dependencies: "
                      "pip install --no-deps chattts==0.2.5", RuntimeWarning, stacklevel=3)
    return _fallback_values(seed, dim)


@functools.lru_cache(maxsize=256)
def _random_speaker(seed: int, dim: int, kernel: str) -> str:
    return encode_spk_emb(random_speaker_values(seed, dim, kernel=kernel))


def random_speaker(seed: int = 0, dim: int = CHATTTS_SPEAKER_DIM, stats=None,
                   kernel: str = CHATTTS_TORCH_KERNEL) -> str:
    """A seeded random speaker as a spk_emb string (random_speaker_values, encoded). With ChatTTS's spk_stat
    this is the string of torch.manual_seed(seed); chat.sample_random_speaker() on the CPU with the torch
    `kernel` stands for (default: torch <= 2.11, see TORCH_KERNELS). The LZMA preset ChatTTS uses costs
    ~0.1 s, so strings are cached per (seed, dim, kernel) when stats is the default."""
    if stats is not None:
        return encode_spk_emb(random_speaker_values(seed, dim, stats, kernel))
    return _random_speaker(int(seed), int(dim), kernel)
