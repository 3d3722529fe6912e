"""ChatTTS's audio path in PyTorch, as chattts-ort exports it: the Decoder (GPT hidden states -> 100-bin mel)
and the Vocos vocoder (mel -> 24 kHz samples), each as a whole-sequence module, plus a stateful streaming form
of the two together (docs/AUDIO.md explains the arithmetic).

Parameter names are those of ChatTTS 0.2.5's asset files (Decoder.safetensors: ChatTTS's DVAE without encoder
and quantizer; Vocos.safetensors: vocos 0.1.0's Vocos), so real asset folders load unchanged. The modules are
our own: the chattts and vocos packages are references for the checks, not dependencies of the export.

Two departures from the originals, both exact up to float rounding:
- torch.istft does not export to ONNX (complex tensors): the inverse real DFT is a MatMul with a fixed basis
  (the Hann window folded in), followed by overlap-add with Pad and Add, divided by the summed squared window
  (torch.istft's envelope).
- Streaming: every conv keeps the last 2 x reach frames of its input as a cache, so a chunk of new GPT frames
  yields the samples that no later frame can change. Positions before the first frame are zero, as the
  convs' own padding is; the flush pads each conv's input with its reach of zeros, as the end of the sequence
  is padded. Each graph tells the caller the sample index of its first output sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AudioConfig
from ..errors import AssetError


class ConvNeXt(nn.Module):
    """Depthwise conv, LayerNorm, MLP with GELU, layer scale, residual (ChatTTS's and Vocos's block).
    `scale_name`: 'weight' in ChatTTS's Decoder, 'gamma' in Vocos."""

    def __init__(self, dim: int, inner: int, kernel: int, dilation: int, scale_name: str):
        super().__init__()
        self.reach = (kernel // 2) * dilation
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=self.reach, dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, inner)
        self.pwconv2 = nn.Linear(inner, dim)
        self.scale_name = scale_name
        self.register_parameter(scale_name, nn.Parameter(torch.full((dim,), 1e-6)))

    def mlp(self, y: torch.Tensor) -> torch.Tensor:  # [B, C, T] (dwconv output) -> [B, C, T]
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y.transpose(1, 2)))))
        return (y * getattr(self, self.scale_name)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.dwconv(x))


class _DecoderStack(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.conv_in = nn.Sequential(nn.Conv1d(c.dec_idim, c.dec_bn, 3, 1, 1), nn.GELU(),
                                     nn.Conv1d(c.dec_bn, c.dec_hidden, 3, 1, 1))
        self.decoder_block = nn.ModuleList(
            [ConvNeXt(c.dec_hidden, 4 * c.dec_hidden, c.dec_kernel, c.dec_dilation, "weight")
             for _ in range(c.dec_layers)])
        self.conv_out = nn.Conv1d(c.dec_hidden, c.dec_idim, 1, bias=False)


class DecoderNet(nn.Module):
    """GPT hidden states [B, T, 2*idim] -> mel [B, n_mels, 2T] (ChatTTS's DVAE decode without quantizer)."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.cfg = c
        self.register_buffer("coef", torch.ones(1, c.n_mels, 1))
        self.decoder = _DecoderStack(c)
        self.out_conv = nn.Conv1d(c.dec_idim, c.n_mels, 3, 1, 1, bias=False)

    @staticmethod
    def interleave(hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, 2C] -> [B, C, 2T]: frame t's first C channels are mel frame 2t, the rest 2t+1."""
        B, T, E = hidden.shape
        return hidden.reshape(B, T * 2, E // 2).transpose(1, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        y = d.conv_in(self.interleave(hidden))
        for blk in d.decoder_block:
            y = blk(y)
        return self.out_conv(d.conv_out(y)) * self.coef


class _Backbone(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.embed = nn.Conv1d(c.n_mels, c.voc_dim, c.voc_kernel, padding=c.voc_kernel // 2)
        self.norm = nn.LayerNorm(c.voc_dim, eps=1e-6)
        self.convnext = nn.ModuleList(
            [ConvNeXt(c.voc_dim, c.voc_intermediate, c.voc_kernel, 1, "gamma") for _ in range(c.voc_layers)])
        self.final_layer_norm = nn.LayerNorm(c.voc_dim, eps=1e-6)


class _ISTFT(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.register_buffer("window", torch.hann_window(c.n_fft))


class _Head(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        self.out = nn.Linear(c.voc_dim, c.n_fft + 2)
        self.istft = _ISTFT(c)


def idft_basis(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """[n_fft + 2, n_fft]: [Re X, Im X] (n_fft/2 + 1 bins each) @ basis = window * irfft(X, n_fft), the inverse
    real DFT as torch.fft.irfft computes it (the imaginary parts of the DC and Nyquist bins ignored)."""
    half = n_fft // 2
    k = torch.arange(half + 1, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * k * n / n_fft
    weight = torch.full((half + 1, 1), 2.0, dtype=torch.float64)
    weight[0] = weight[half] = 1.0
    re = weight * torch.cos(ang) / n_fft
    im = -weight * torch.sin(ang) / n_fft
    im[0] = 0.0
    im[half] = 0.0
    return (torch.cat([re, im], 0) * window.double()[None, :]).float()


def overlap_add(frames: torch.Tensor, valid: torch.Tensor, wsq: torch.Tensor, tail_sig: torch.Tensor,
                tail_env: torch.Tensor, hop: int):
    """Overlap-add windowed frames [B, n, n_fft] (hop = n_fft / 4) onto the partial sums of earlier frames.

    valid [B, n]: 1 for frames that exist (frames outside the utterance add neither signal nor window).
    tail_*: [B, 3 * hop], the sums of the 3 hops that earlier frames reach into. Returns (signal [B, n * hop] of
    the hops no later frame touches, divided by the summed squared window; the new tails)."""
    B, n, N = frames.shape
    q = N // hop  # 4
    blocks = frames.reshape(B, n, q, hop)
    wblocks = wsq.reshape(1, 1, q, hop) * valid.reshape(B, n, 1, 1)
    sig = 0
    env = 0
    for j in range(q):  # frame m's j-th hop lands on output hop m + j
        sig = sig + F.pad(blocks[:, :, j], (0, 0, j, q - 1 - j))
        env = env + F.pad(wblocks[:, :, j], (0, 0, j, q - 1 - j))
    sig = sig + F.pad(tail_sig.reshape(B, q - 1, hop), (0, 0, 0, n))
    env = env + F.pad(tail_env.reshape(B, q - 1, hop), (0, 0, 0, n))
    done_sig = sig[:, :n].reshape(B, n * hop)
    done_env = env[:, :n].reshape(B, n * hop)
    out = torch.where(done_env > 1e-11, done_sig / done_env.clamp_min(1e-11), torch.zeros_like(done_sig))
    return out, sig[:, n:].reshape(B, (q - 1) * hop), env[:, n:].reshape(B, (q - 1) * hop)


class VocosNet(nn.Module):
    """Mel [B, n_mels, M] -> samples [B, hop * (M - 1)] (vocos 0.1.0's Vocos.decode: VocosBackbone, ISTFTHead
    with center padding)."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.cfg = c
        self.backbone = _Backbone(c)
        self.head = _Head(c)
        # A constant of the graph (computed here, not traced: the trigonometry would run at every call).
        self.register_buffer("basis", idft_basis(c.n_fft, self.head.istft.window), persistent=False)

    def sync_basis(self) -> "VocosNet":
        """Recompute the inverse-DFT basis from the window now loaded (call after load_state_dict)."""
        self.basis = idft_basis(self.cfg.n_fft, self.head.istft.window)
        return self

    def features(self, mel: torch.Tensor) -> torch.Tensor:  # [B, n_mels, M] -> [B, voc_dim, M]
        b = self.backbone
        x = b.norm(b.embed(mel).transpose(1, 2)).transpose(1, 2)
        for blk in b.convnext:
            x = blk(x)
        return x

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features [B, voc_dim, n] -> windowed time frames [B, n, n_fft]."""
        c = self.cfg
        y = self.head.out(self.backbone.final_layer_norm(x.transpose(1, 2)))
        half = c.n_fft // 2 + 1
        mag = torch.clamp(torch.exp(y[..., :half]), max=1e2)
        p = y[..., half:]
        spec = torch.cat([mag * torch.cos(p), mag * torch.sin(p)], -1)
        return spec @ self.basis

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        fr = self.frames(self.features(mel))
        B, M, _ = fr.shape
        zeros = fr.new_zeros(B, c.n_fft - c.hop)
        sig, ts, te = overlap_add(fr, fr.new_ones(B, M), self.head.istft.window ** 2, zeros, zeros, c.hop)
        last = torch.where(te > 1e-11, ts / te.clamp_min(1e-11), torch.zeros_like(ts))
        full = torch.cat([sig, last], 1)  # padded signal of M + 3 hops; center=True drops n_fft / 2 each end
        return full[:, c.n_fft // 2: c.n_fft // 2 + c.hop * (M - 1)]


# ----------------------------------------------------------------------------------------------------------
# Streaming.


@dataclass
class _Conv:
    channels: int
    reach: int


class StreamingAudio(nn.Module):
    """Decoder + Vocos fed a chunk of GPT frames at a time (docs/AUDIO.md).

    step(hidden [B, n, E], state [B, S], frames_done [B]) -> (samples [B, n * 2 hop], state', first [B])
    flush(state [B, S], frames_done [B]) -> (samples [B, flush_samples], first [B])
    `first` is the index in the utterance's audio of the first returned sample (it is negative at the start,
    and the flush runs past the end: the caller keeps indices in [0, AudioConfig.samples(frames))).
    """

    def __init__(self, decoder: DecoderNet, vocos: VocosNet):
        super().__init__()
        self.decoder, self.vocos = decoder, vocos
        c = self.cfg = decoder.cfg
        d, b = decoder.decoder, vocos.backbone
        convs = [_Conv(c.dec_idim, 1), _Conv(c.dec_bn, 1)]
        convs += [_Conv(c.dec_hidden, blk.reach) for blk in d.decoder_block]
        convs += [_Conv(c.dec_idim, 1), _Conv(c.n_mels, c.voc_kernel // 2)]
        convs += [_Conv(c.voc_dim, blk.reach) for blk in b.convnext]
        self.convs = convs
        self.tail = c.n_fft - c.hop
        self.state_size = sum(cv.channels * 2 * cv.reach for cv in convs) + 2 * self.tail
        self.reach = sum(cv.reach for cv in convs)  # mel frames of delay through the stack
        assert self.reach == c.decoder_reach + c.vocos_reach
        self.flush_frames = self.reach  # vocos frames the flush produces
        self.flush_samples = (self.reach + c.n_fft // c.hop - 1) * c.hop
        self.register_buffer("wsq", vocos.head.istft.window ** 2, persistent=False)

    # -- the pieces --------------------------------------------------------------------------------------
    def _caches(self, state: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        B = state.shape[0]
        out, off = [], 0
        for cv in self.convs:
            n = cv.channels * 2 * cv.reach
            out.append(state[:, off:off + n].reshape(B, cv.channels, 2 * cv.reach))
            off += n
        return out, state[:, off:off + self.tail], state[:, off + self.tail:off + 2 * self.tail]

    @staticmethod
    def _mask(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Zero the columns of x [B, C, n] whose position (start [B] + column) is negative."""
        pos = start.reshape(-1, 1, 1) + torch.arange(x.shape[-1], device=x.device).reshape(1, 1, -1)
        return x * (pos >= 0).to(x.dtype)

    def _feed(self, i: int, x: torch.Tensor, start: torch.Tensor, caches, new_caches, flush: bool):
        """Conv i's input window: cache + masked new columns (+ reach zeros at the end when flushing)."""
        cv = self.convs[i]
        seq = torch.cat([caches[i], self._mask(x, start)], -1) if x is not None else caches[i]
        if new_caches is not None:
            new_caches.append(seq[..., seq.shape[-1] - 2 * cv.reach:])
        if flush:
            seq = F.pad(seq, (0, cv.reach))
        return seq, start - cv.reach

    def _run(self, x, start, caches, new_caches, flush: bool):
        """The stack on new columns x [B, C, n] at mel position `start` (x None: a flush with no new frames).
        Returns (vocos features [B, voc_dim, n'], position of the first)."""
        dec, voc = self.decoder.decoder, self.vocos.backbone
        i = 0

        def conv(mod, x, start):
            nonlocal i
            seq, start = self._feed(i, x, start, caches, new_caches, flush)
            i += 1
            return F.conv1d(seq, mod.weight, mod.bias, dilation=mod.dilation, groups=mod.groups), seq, start

        def block(blk, x, start):
            nonlocal i
            seq, start = self._feed(i, x, start, caches, new_caches, flush)
            i += 1
            c = blk.dwconv
            y = F.conv1d(seq, c.weight, c.bias, dilation=c.dilation, groups=c.groups)
            r = blk.reach
            return seq[..., r:r + y.shape[-1]] + blk.mlp(y), start

        y, _, start = conv(dec.conv_in[0], x, start)
        y, _, start = conv(dec.conv_in[2], F.gelu(y), start)
        for blk in dec.decoder_block:
            y, start = block(blk, y, start)
        y = dec.conv_out(y)
        y, _, start = conv(self.decoder.out_conv, y, start)
        y = y * self.decoder.coef
        y, _, start = conv(voc.embed, y, start)
        y = voc.norm(y.transpose(1, 2)).transpose(1, 2)
        for blk in voc.convnext:
            y, start = block(blk, y, start)
        return y, start

    def _audio(self, feats, start, tail_sig, tail_env):
        c = self.cfg
        fr = self.vocos.frames(feats)
        pos = start.reshape(-1, 1) + torch.arange(fr.shape[1], device=fr.device).reshape(1, -1)
        valid = (pos >= 0).to(fr.dtype)
        sig, ts, te = overlap_add(fr * valid.unsqueeze(-1), valid, self.wsq, tail_sig, tail_env, c.hop)
        first = start * c.hop - c.n_fft // 2
        return sig, ts, te, first

    # -- the graphs ---------------------------------------------------------------------------------------
    def step(self, hidden: torch.Tensor, state: torch.Tensor, frames_done: torch.Tensor):
        caches, tail_sig, tail_env = self._caches(state)
        new_caches: List[torch.Tensor] = []
        x = DecoderNet.interleave(hidden)
        feats, start = self._run(x, frames_done * self.cfg.mel_per_frame, caches, new_caches, flush=False)
        sig, ts, te, first = self._audio(feats, start, tail_sig, tail_env)
        B = state.shape[0]
        new_state = torch.cat([t.reshape(B, -1) for t in new_caches] + [ts, te], 1)
        return sig, new_state, first

    def flush(self, state: torch.Tensor, frames_done: torch.Tensor):
        caches, tail_sig, tail_env = self._caches(state)
        feats, start = self._run(None, frames_done * self.cfg.mel_per_frame, caches, None, flush=True)
        sig, ts, te, first = self._audio(feats, start, tail_sig, tail_env)
        last = torch.where(te > 1e-11, ts / te.clamp_min(1e-11), torch.zeros_like(ts))  # no frame comes after
        return torch.cat([sig, last], 1), first

    def init_state(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.state_size)


class _StepGraph(nn.Module):
    def __init__(self, s: StreamingAudio):
        super().__init__()
        self.s = s

    def forward(self, hidden, state, frames_done):
        return self.s.step(hidden, state, frames_done)


class _FlushGraph(nn.Module):
    def __init__(self, s: StreamingAudio):
        super().__init__()
        self.s = s

    def forward(self, state, frames_done):
        return self.s.flush(state, frames_done)


def stream_decode(s: StreamingAudio, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    """The whole utterance [1, T, E] decoded chunk by chunk through step() and flush() (the reference for the
    streamed graphs and the tests): samples [1, samples(T)]."""
    T = hidden.shape[1]
    state = s.init_state(1)
    out = torch.zeros(1, s.cfg.samples(T))
    done = 0

    def put(sig, first):
        a, b = int(first), int(first) + sig.shape[1]
        lo, hi = max(a, 0), min(b, out.shape[1])
        if hi > lo:
            out[:, lo:hi] = sig[:, lo - a:hi - a]

    while done < T:
        n = min(chunk, T - done)
        sig, state, first = s.step(hidden[:, done:done + n], state, torch.tensor([done]))
        put(sig, first[0])
        done += n
    sig, first = s.flush(state, torch.tensor([T]))
    put(sig, first[0])
    return out


# ----------------------------------------------------------------------------------------------------------
# Asset files.

DECODER_FILE, VOCOS_FILE = "Decoder.safetensors", "Vocos.safetensors"
# Vocos.safetensors also holds the feature extractor's buffers (a MelSpectrogram for encoding audio); decoding
# never uses them.
_VOCOS_UNUSED = ("feature_extractor.",)


def audio_config_of(folder, gpt_hidden: int) -> AudioConfig:
    """The AudioConfig of an asset folder, read off the shapes in its Decoder and Vocos files."""
    from safetensors import safe_open

    folder = Path(folder)
    shapes = {}
    for f in (DECODER_FILE, VOCOS_FILE):
        p = folder / f
        if not p.is_file():
            raise AssetError(f"{p}: missing (ChatTTS's audio path needs {DECODER_FILE} and {VOCOS_FILE})")
        try:
            with safe_open(str(p), "pt") as h:
                for k in h.keys():
                    shapes[(f, k)] = tuple(h.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises several types for corrupt files
            raise AssetError(f"{p}: cannot read safetensors ({e})") from e

    def shape(f, k):
        if (f, k) not in shapes:
            raise AssetError(f"{folder / f}: tensor {k!r} is missing")
        return shapes[(f, k)]

    bn, idim, _ = shape(DECODER_FILE, "decoder.conv_in.0.weight")
    hidden = shape(DECODER_FILE, "decoder.conv_in.2.weight")[0]
    n_mels = shape(DECODER_FILE, "out_conv.weight")[0]
    dec_layers = len({k[1].split(".")[2] for k in shapes if k[0] == DECODER_FILE
                      and k[1].startswith("decoder.decoder_block.")})
    voc_dim, _, voc_kernel = shape(VOCOS_FILE, "backbone.embed.weight")
    inter = shape(VOCOS_FILE, "backbone.convnext.0.pwconv1.weight")[0]
    voc_layers = len({k[1].split(".")[2] for k in shapes if k[0] == VOCOS_FILE
                      and k[1].startswith("backbone.convnext.")})
    n_fft = shape(VOCOS_FILE, "head.out.weight")[0] - 2
    dec_kernel = shape(DECODER_FILE, "decoder.decoder_block.0.dwconv.weight")[2]
    if 2 * idim != gpt_hidden:
        raise AssetError(f"{folder / DECODER_FILE}: input of {idim} channels per mel frame does not fit the GPT's "
                         f"hidden size {gpt_hidden} (two mel frames per GPT frame)")
    return AudioConfig(dec_idim=idim, dec_bn=bn, dec_hidden=hidden, dec_layers=dec_layers, dec_kernel=dec_kernel,
                       n_mels=n_mels, voc_dim=voc_dim, voc_intermediate=inter, voc_layers=voc_layers,
                       voc_kernel=voc_kernel, n_fft=n_fft, hop=n_fft // 4)


def _load_into(module: nn.Module, path: Path, ignore=()) -> None:
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise AssetError(f"{path}: cannot read safetensors ({e})") from e
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore))}
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise AssetError(f"{path}: tensors do not match ChatTTS's layout (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise AssetError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        if not torch.isfinite(v.float()).all():
            raise AssetError(f"{path}: tensor {k!r} has non-finite values")
    module.load_state_dict({k: v.float() for k, v in sd.items()})


def load_audio(folder, gpt_hidden: int) -> Tuple[DecoderNet, VocosNet, AudioConfig]:
    """The Decoder and Vocos of an asset folder (eval mode, fp32)."""
    folder = Path(folder)
    c = audio_config_of(folder, gpt_hidden)
    dec, voc = DecoderNet(c), VocosNet(c)
    _load_into(dec, folder / DECODER_FILE)
    _load_into(voc, folder / VOCOS_FILE, ignore=_VOCOS_UNUSED)
    if not torch.allclose(voc.head.istft.window, torch.hann_window(c.n_fft), atol=1e-6):
        raise AssetError(f"{folder / VOCOS_FILE}: head.istft.window is not a periodic Hann window of {c.n_fft}")
    return dec.eval(), voc.sync_basis().eval(), c


def random_audio_state_dicts(c: AudioConfig, seed: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """Seeded random weights for the Decoder and Vocos, keyed as ChatTTS's asset files. PyTorch's default
    initialisation, with layer scales and norms away from their trivial values (so no block is a no-op in a
    test) and the vocoder's log-magnitude set for speech-like amplitudes (peaks near 0.5, well below the 1e2 clip)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dec, voc = DecoderNet(c), VocosNet(c)
    with torch.no_grad():
        for m in (dec, voc):
            for name, p in m.named_parameters():
                if name.endswith((".weight", ".gamma")) and p.dim() == 1 and ".norm" not in name \
                        and "layer_norm" not in name:
                    p.copy_(0.1 + 0.2 * torch.rand(p.shape, generator=g))  # layer scale
                elif ".norm" in name or "layer_norm" in name:
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        dec.coef.copy_(0.5 + torch.rand(dec.coef.shape, generator=g))
        half = c.n_fft // 2 + 1
        voc.head.out.weight.mul_(0.5)
        voc.head.out.bias[:half] = 1.5 + 0.5 * torch.randn(half, generator=g)
    vsd = voc.state_dict()
    vsd["feature_extractor.mel_spec.spectrogram.window"] = torch.hann_window(c.n_fft)
    vsd["feature_extractor.mel_spec.mel_scale.fb"] = torch.zeros(c.n_fft // 2 + 1, c.n_mels)
    return {DECODER_FILE: dec.state_dict(), VOCOS_FILE: vsd}


def write_random_audio(folder, c: AudioConfig, seed: int = 0) -> None:
    """Add random Decoder and Vocos files to an asset folder (each written to a sibling, then renamed)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    for name, sd in random_audio_state_dicts(c, seed).items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
