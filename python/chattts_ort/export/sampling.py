"""The sample head: ChatTTS's per-step logits processing and the draw, as one export-friendly module.

Order (ChatTTS 0.2.5, GPT.generate): logits / temperature -> repetition penalty over the last 16 generated
tokens -> top-p (transformers' TopPLogitsWarper, min_tokens_to_keep=3) -> top-k (TopKLogitsWarper,
k = max(top_k, 3), ties kept) -> EOS set to -inf while step < min_new_token -> softmax -> draw.
The draw is argmax(p / q) with q ~ Exp(1) an input: that is what torch.multinomial(p, 1) computes on the CPU,
so feeding the reference's q gives identical tokens; q = 1 gives greedy.
"""
from __future__ import annotations

import torch
from torch import nn

NEG_INF = float("-inf")


def process_logits(logits, temperature, penalty, history, top_p, top_k, eos_id, block_eos):
    """Processed logits [N, V] (before the softmax). history [N, W] int64, entries < 0 are empty.

    temperature [N]; penalty, top_p, top_k and block_eos per row ([N]) or one value for all rows ([]): each
    row is processed with its own values, so rows of different streams can share one call."""
    N, V = logits.shape[0], logits.shape[1]
    x = logits / temperature.unsqueeze(1)
    # Repetition penalty: alpha = penalty ** count, negative logits * alpha, others / alpha.
    vocab = torch.arange(V, dtype=torch.int64)
    counts = (history.unsqueeze(2) == vocab.view(1, 1, -1)).to(torch.float32).sum(1)  # [N, V]
    alpha = torch.pow(penalty.reshape(-1, 1), counts)
    x = torch.where(x < 0, x * alpha, x / alpha)
    # Top-p: drop the low tail whose cumulative probability is <= 1 - top_p, keeping at least 3.
    sorted_x, order = torch.sort(x, dim=1, descending=False)
    cum = torch.softmax(sorted_x, dim=1).cumsum(dim=1)
    keep_tail = vocab >= (V - 3)
    drop_sorted = (cum <= (1.0 - top_p.reshape(-1, 1))) & ~keep_tail.unsqueeze(0)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    x = torch.where(drop, torch.full_like(x, NEG_INF), x)
    # Top-k: k = min(max(top_k, 3), V); everything below the k-th largest goes (ties with it stay).
    # Top-p dropped a prefix of the ascending order, so the k-th largest after it is sorted_x[V - k] unless
    # that entry was dropped (then it is -inf and top-k removes nothing more): no second sort needed.
    k = torch.clamp(torch.clamp(top_k.reshape(-1, 1), min=3), max=V)
    idx = (V - k).expand(N, 1)
    kth = torch.where(torch.gather(drop_sorted, 1, idx), torch.full_like(sorted_x[:, :1], NEG_INF),
                      torch.gather(sorted_x, 1, idx))
    x = torch.where(x < kth, torch.full_like(x, NEG_INF), x)
    # EOS gate, per row.
    eos = (vocab.view(1, -1) == eos_id) & block_eos.reshape(-1, 1)
    x = torch.where(eos, torch.full_like(x, NEG_INF), x)
    return x


class SampleHead(nn.Module):
    """forward(logits [N,V], temperature [N], penalty [N], history [N,16], top_p [N], top_k [N], eos_id [],
    block_eos [N], noise [N,V]) -> next_ids [N] int64 (per-row values; a [] value applies to every row).
    See docs/FORMAT.md."""

    def forward(self, logits, temperature, penalty, history, top_p, top_k, eos_id, block_eos, noise):
        x = process_logits(logits, temperature, penalty, history, top_p, top_k, eos_id, block_eos)
        p = torch.softmax(x, dim=1)
        return torch.argmax(p / noise, dim=1)


def exponential_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """The Exp(1) noise torch.multinomial(p, 1) draws on the CPU for p of this shape (float32)."""
    return torch.empty(shape, dtype=torch.float32).exponential_(generator=generator)
