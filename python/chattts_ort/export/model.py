"""ChatTTS's GPT in plain, export-friendly PyTorch (written for this project; no transformers import).

The block boundaries are the ONNX graphs of docs/FORMAT.md: `Embed` (+ `rope_cos_sin`, `attention_bias`),
`DecoderLayer`, `Heads`; `ChatTTSGPT` holds them. KV tensors use the runtime's layout [P, B, H, D]
(sequence outermost), and a layer returns only the K/V of its new positions.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SPECIAL_TOKENS, GPTConfig

SPK_EMB_ID = SPECIAL_TOKENS["spk_emb"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables [B, S, D] in the rotate_half form (the first and second halves share frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_bias(key_mask: torch.Tensor, S: int) -> torch.Tensor:
    """[B, 1, S, L] additive bias: 0 where key j is visible to query i (j <= P + i, key_mask[b, j] = 1),
    float32 min elsewhere (not -inf, so a fully masked padded query gives no NaN)."""
    L = key_mask.shape[1]
    P = L - S
    q_idx = torch.arange(S, dtype=torch.int64).unsqueeze(1) + P  # [S, 1]
    k_idx = torch.arange(L, dtype=torch.int64).unsqueeze(0)      # [1, L]
    causal = k_idx <= q_idx                                       # [S, L]
    visible = causal.unsqueeze(0) & (key_mask.unsqueeze(1) > 0)   # [B, S, L]
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(visible, zero, neg).unsqueeze(1)


class DecoderLayer(nn.Module):
    """One LLaMA decoder layer. forward(...) -> (hidden, present_key, present_value), presents [S, B, H, D]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        E, F_ = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(E, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(E, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(E, E, bias=False)
        self.k_proj = nn.Linear(E, E, bias=False)
        self.v_proj = nn.Linear(E, E, bias=False)
        self.o_proj = nn.Linear(E, E, bias=False)
        self.gate_proj = nn.Linear(E, F_, bias=False)
        self.up_proj = nn.Linear(E, F_, bias=False)
        self.down_proj = nn.Linear(F_, E, bias=False)

    def forward(self, hidden, cos, sin, attn_bias, past_key, past_value):
        B, S, E = hidden.shape
        H, D = self.num_heads, self.head_dim
        x = self.input_layernorm(hidden)
        q = self.q_proj(x).view(B, S, H, D)
        k = self.k_proj(x).view(B, S, H, D)
        v = self.v_proj(x).view(B, S, H, D)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, S, 1, D]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        present_key = k.transpose(0, 1)    # [S, B, H, D]
        present_value = v.transpose(0, 1)
        keys = torch.cat((past_key, present_key), dim=0)      # [L, B, H, D]
        values = torch.cat((past_value, present_value), dim=0)
        scores = torch.matmul(q.permute(0, 2, 1, 3), keys.permute(1, 2, 3, 0)) * (1.0 / math.sqrt(D))
        probs = torch.softmax(scores + attn_bias, dim=-1)      # [B, H, S, L]
        attn = torch.matmul(probs, values.permute(1, 2, 0, 3))  # [B, H, S, D]
        attn = attn.permute(0, 2, 1, 3).reshape(B, S, E)
        hidden = hidden + self.o_proj(attn)
        x = self.post_attention_layernorm(hidden)
        hidden = hidden + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return hidden, present_key, present_value


def normalize_speaker(x: torch.Tensor) -> torch.Tensor:
    """ChatTTS's speaker normalisation: F.normalize on the fp16 values (x16 / fp16(||x16||)), then fp32.

    Written with fp32 arithmetic rounded to fp16 where ChatTTS rounds, so it exports to ONNX and runs on
    ONNX Runtime's CPU provider (few fp16 kernels there): the norm is accumulated in fp32 and rounded to fp16
    (torch's CPU half norm does the same), and one fp32 division of two fp16 values rounded to fp16 is the
    correctly rounded fp16 quotient.
    """
    x16 = x.to(torch.float16).to(torch.float32)
    norm = torch.sqrt((x16 * x16).sum(-1, keepdim=True)).to(torch.float16).to(torch.float32)
    norm = torch.clamp(norm, min=1e-12)
    return (x16 / norm).to(torch.float16).to(torch.float32)


class Embed(nn.Module):
    """Text rows: emb_text(ids[..., 0]); audio rows: sum_i emb_code[i](ids[..., i]); [spk_emb] rows: speaker."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_vq = cfg.num_vq
        self.num_text_tokens, self.num_audio_tokens = cfg.num_text_tokens, cfg.num_audio_tokens
        self.emb_text = nn.Embedding(cfg.num_text_tokens, cfg.hidden_size)
        self.emb_code = nn.ModuleList(nn.Embedding(cfg.num_audio_tokens, cfg.hidden_size) for _ in range(cfg.num_vq))

    def forward(self, input_ids, text_mask, speaker: Optional[torch.Tensor] = None, spk_emb_id: int = SPK_EMB_ID):
        # Ids of the other kind are replaced by 0 before the lookups, so nothing indexes out of range.
        tm = text_mask.unsqueeze(-1)  # [B, S, 1]
        zero = torch.zeros_like(input_ids)
        text_ids = torch.where(text_mask, input_ids[..., 0], zero[..., 0])
        code_ids = torch.where(tm, zero, input_ids)
        text = self.emb_text(text_ids)
        code = self.emb_code[0](code_ids[..., 0])
        for i in range(1, self.num_vq):
            code = code + self.emb_code[i](code_ids[..., i])
        hidden = torch.where(tm, text, code)
        if speaker is not None:
            spk = normalize_speaker(speaker).unsqueeze(1)                  # [B, 1, E]
            is_spk = ((input_ids[..., 0] == spk_emb_id) & text_mask).unsqueeze(-1)
            hidden = torch.where(is_spk, spk, hidden)
        return hidden


class Heads(nn.Module):
    """Final RMSNorm, the text head and the code heads (weight norm baked into plain weights)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head_text = nn.Linear(cfg.hidden_size, cfg.num_text_tokens, bias=False)
        self.head_code = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.num_audio_tokens, bias=False) for _ in range(cfg.num_vq))

    def last_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden[:, -1, :])

    def forward_code(self, hidden):
        h = self.last_hidden(hidden)
        logits = torch.stack([head(h) for head in self.head_code], dim=1)  # [B, num_vq, V]
        return logits, h

    def forward_text(self, hidden):
        h = self.last_hidden(hidden)
        return self.head_text(h), h


class ChatTTSGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.heads = Heads(cfg)

    def forward_layers(self, hidden, cos, sin, attn_bias, past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None):
        """Run every layer; returns (hidden, cache) with the FULL cache per layer ([P+S, B, H, D] K and V)."""
        B = hidden.shape[0]
        H, D = self.cfg.num_heads, self.cfg.head_dim
        new_past = []
        for i, layer in enumerate(self.layers):
            if past is None:
                pk = hidden.new_zeros(0, B, H, D)
                pv = hidden.new_zeros(0, B, H, D)
            else:
                pk, pv = past[i]
            hidden, k, v = layer(hidden, cos, sin, attn_bias, pk, pv)
            new_past.append((torch.cat((pk, k), 0), torch.cat((pv, v), 0)))
        return hidden, new_past


def bake_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch weight_norm with dim=0: W[i] = g[i] * v[i] / ||v[i]||."""
    v = v.float()
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    return g.float().reshape(norm.shape) * v / norm
