"""The export-side blocks: one torch module per graph of docs/FORMAT.md, the symbolic axes of each graph's IO,
and random example inputs of the right shapes (to trace and to verify). The IO names come from format.py."""
from __future__ import annotations

from ..config import SPECIAL_TOKENS, GPTConfig
from ..format import (EMBED_INPUTS, EMBED_OUTPUTS, HEAD_INPUTS, HEAD_OUTPUTS, LAYER_INPUTS, LAYER_OUTPUTS,
                      SAMPLE_INPUTS, SAMPLE_OUTPUTS)


# ----------------------------------------------------------------------------------------------------------
# Export wrappers: each one is exactly one graph of docs/FORMAT.md.


def _wrappers():
    import torch

    from .model import attention_bias, rope_cos_sin
    from .sampling import SampleHead

    class EmbedBlock(torch.nn.Module):
        def __init__(self, gpt, cfg: GPTConfig):
            super().__init__()
            self.embed = gpt.embed
            self.cfg = cfg

        def forward(self, input_ids, text_mask, speaker, position_ids, key_mask):
            hidden = self.embed(input_ids, text_mask, speaker)
            cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
            bias = attention_bias(key_mask, input_ids.shape[1])
            return hidden, cos, sin, bias

    class LayerBlock(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden, cos, sin, attn_bias, past_key, past_value):
            return self.layer(hidden, cos, sin, attn_bias, past_key, past_value)

    class HeadCodeBlock(torch.nn.Module):
        """heads.forward_code with the code heads' weights side by side in one [E, k*V] MatMul: one kernel
        (one activation quantization when quantized) instead of k MatMuls, Unsqueezes and a Concat. Every
        logit is the same dot product as in its own head."""

        def __init__(self, heads):
            super().__init__()
            self.heads = heads
            self.k, self.V = len(heads.head_code), heads.head_code[0].weight.shape[0]
            # A parameter, so the export stores it as an initializer (the quantizers only rewrite those).
            self.weight = torch.nn.Parameter(torch.cat([h.weight for h in heads.head_code], 0).detach().clone(),
                                             requires_grad=False)

        def forward(self, hidden):
            h = self.heads.last_hidden(hidden)
            return torch.nn.functional.linear(h, self.weight).reshape(-1, self.k, self.V), h

    class HeadTextBlock(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def forward(self, hidden):
            return self.heads.forward_text(hidden)

    return EmbedBlock, LayerBlock, HeadCodeBlock, HeadTextBlock, SampleHead


# Graph IO names and symbolic shapes, as in docs/FORMAT.md.
EMBED_IO = (
    list(EMBED_INPUTS),
    list(EMBED_OUTPUTS),
    {"input_ids": {0: "B", 1: "S"}, "text_mask": {0: "B", 1: "S"}, "speaker": {0: "B"},
     "position_ids": {0: "B", 1: "S"}, "key_mask": {0: "B", 1: "L"},
     "hidden": {0: "B", 1: "S"}, "cos": {0: "B", 1: "S"}, "sin": {0: "B", 1: "S"},
     "attn_bias": {0: "B", 2: "S", 3: "L"}},
)
LAYER_IO = (
    list(LAYER_INPUTS["portable"]),
    list(LAYER_OUTPUTS),
    {"hidden": {0: "B", 1: "S"}, "cos": {0: "B", 1: "S"}, "sin": {0: "B", 1: "S"},
     "attn_bias": {0: "B", 2: "S", 3: "L"}, "past_key": {0: "P", 1: "B"}, "past_value": {0: "P", 1: "B"},
     "hidden_out": {0: "B", 1: "S"}, "present_key": {0: "S", 1: "B"}, "present_value": {0: "S", 1: "B"}},
)
HEAD_IO = (
    list(HEAD_INPUTS),
    list(HEAD_OUTPUTS),
    {"hidden": {0: "B", 1: "S"}, "logits": {0: "B"}, "last_hidden": {0: "B"}},
)
SAMPLE_IO = (
    list(SAMPLE_INPUTS),
    list(SAMPLE_OUTPUTS),
    {"logits": {0: "N", 1: "V"}, "temperature": {0: "N"}, "penalty": {0: "N"}, "history": {0: "N"},
     "top_p": {0: "N"}, "top_k": {0: "N"}, "block_eos": {0: "N"}, "noise": {0: "N", 1: "V"}, "next_ids": {0: "N"}},
)


def example_inputs(cfg: GPTConfig, block: str, B: int = 2, S: int = 3, P: int = 2, seed: int = 0):
    """Random inputs of the right shapes and dtypes for one block (used to trace and to verify)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    E, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if block == "embed":
        ids = torch.randint(0, cfg.num_audio_tokens, (B, S, 4), generator=g)
        text_mask = torch.zeros(B, S, dtype=torch.bool)
        text_mask[:, : max(1, S - 1)] = True
        ids[0, 0, :] = SPECIAL_TOKENS["spk_emb"]
        ids[:, 1, :] = torch.randint(0, cfg.num_text_tokens, (B, 1), generator=g)
        speaker = torch.randn(B, E, generator=g)
        L = P + S
        key_mask = torch.ones(B, L, dtype=torch.int64)
        key_mask[-1, 0] = 0  # a left-padded row
        pos = torch.arange(P, P + S).unsqueeze(0).repeat(B, 1)
        return (ids, text_mask, speaker, pos, key_mask)
    if block == "layer":
        from .model import attention_bias, rope_cos_sin

        L = P + S
        hidden = torch.randn(B, S, E, generator=g)
        pos = torch.arange(P, P + S).unsqueeze(0).repeat(B, 1)
        cos, sin = rope_cos_sin(pos, D, cfg.rope_theta)
        key_mask = torch.ones(B, L, dtype=torch.int64)
        key_mask[-1, 0] = 0
        bias = attention_bias(key_mask, S)
        pk = torch.randn(P, B, H, D, generator=g)
        pv = torch.randn(P, B, H, D, generator=g)
        return (hidden, cos, sin, bias, pk, pv)
    if block in ("head_code", "head_text"):
        return (torch.randn(B, S, E, generator=g),)
    if block.startswith("sample"):
        V = cfg.num_audio_tokens if block != "sample_text" else cfg.num_text_tokens
        N = B * (cfg.num_vq if V == cfg.num_audio_tokens else 1)
        logits = torch.randn(N, V, generator=g) * 3
        temperature = torch.full((N,), 0.3)
        history = torch.randint(0, V, (N, 16), generator=g)
        history[:, 10:] = -1
        noise = torch.empty(N, V).exponential_(generator=g)
        # Per-row values that differ between rows, so a graph that used one row's value for all would fail.
        penalty = 1.0 + 0.1 * torch.rand(N, generator=g)
        top_p = 0.5 + 0.5 * torch.rand(N, generator=g)
        top_k = torch.randint(1, 40, (N,), generator=g)
        block_eos = torch.arange(N) % 2 == 0
        return (logits, temperature, penalty, history, top_p, top_k, torch.tensor(V - 1, dtype=torch.int64),
                block_eos, noise)
    raise ValueError(f"unknown block {block!r}")
