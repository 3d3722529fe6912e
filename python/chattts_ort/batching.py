"""Turning token-id prompts into the [B, T, 4] left-padded batch every implementation consumes."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """ids [B, T, 4] int64 (each text id repeated in the 4 columns) and attention_mask [B, T] int64.

    Rows are left-padded to the longest prompt, as ChatTTS batches them.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("a prompt has no tokens")
    B, T = len(prompts), max(lens)
    ids = np.full((B, T, 4), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):, :] = np.asarray(p, dtype=np.int64)[:, None]
        mask[b, T - len(p):] = 1
    return ids, mask


def prefill_positions(mask: np.ndarray) -> np.ndarray:
    """position_ids = cumsum(mask) - 1, padded slots 1 (as transformers/ChatTTS fill them)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 1, pos, 1).astype(np.int64)
