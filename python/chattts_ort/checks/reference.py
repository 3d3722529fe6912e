"""The PyTorch reference loop: ChatTTS 0.2.5's GPT.generate re-created step for step (docs/CHATTTS_LOOP.md).

It is independent of the exported graphs on purpose: the decoder layers run in transformers' LlamaModel (as in
ChatTTS) with a left-padded attention mask and position_ids = cumsum(mask) - 1, and sampling uses transformers'
own TopPLogitsWarper / TopKLogitsWarper (min_tokens_to_keep=3) after ChatTTS's repetition penalty, then
softmax and torch.multinomial's draw (argmax(p / q), q ~ Exp(1)). Our modules supply only the embedding and
the heads. Tests compare the ONNX chain and the C++ runtime with this loop, token for token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SPECIAL_TOKENS, GPTConfig
from ..export.model import ChatTTSGPT


@dataclass
class ReferenceResult:
    frames: List[list] = field(default_factory=list)   # per row: list of id tuples (4 codes, or 1 text id)
    hidden: List[list] = field(default_factory=list)   # per row: list of [E] float32 arrays
    end_step: List[Optional[int]] = field(default_factory=list)
    noise: List[np.ndarray] = field(default_factory=list)  # per step: [N, V] Exp(1) noise used
    logits: List[np.ndarray] = field(default_factory=list)  # per step: raw logits [N, V]
    steps: int = 0


def llama_from(model: ChatTTSGPT, cfg: GPTConfig, attn_implementation: str = "eager"):
    """transformers' LlamaModel with our layer weights."""
    from transformers import LlamaConfig, LlamaModel

    from ..export.assets import to_transformers_llama_state_dict

    lc = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                     max_position_embeddings=cfg.max_position_embeddings, vocab_size=32,
                     attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    lc._attn_implementation = attn_implementation
    llama = LlamaModel(lc).eval()
    sd = to_transformers_llama_state_dict(model)
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("embed_tokens") for k in missing), (missing, unexpected)
    return llama


def repetition_penalty(scores: torch.Tensor, window: torch.Tensor, penalty: float) -> torch.Tensor:
    """ChatTTS's CustomRepetitionPenaltyLogitsProcessorRepeat (window = last 16 generated ids per row)."""
    if window.shape[1] == 0:
        return scores
    freq = F.one_hot(window, scores.size(1)).sum(1)
    alpha = torch.pow(torch.tensor(penalty, dtype=scores.dtype), freq)
    return torch.where(scores < 0, scores * alpha, scores / alpha)


def generate_reference(model: ChatTTSGPT, cfg: GPTConfig, prompts, mode: str = "code", params=None,
                       speaker=None, noise: Optional[Callable] = None, greedy: bool = False,
                       llama=None) -> ReferenceResult:
    """Run ChatTTS's loop on token-id prompts (left-padded into one batch).

    noise: callable(step, N, V) -> [N, V] Exp(1) tensor; None -> ChatTTS's own draw: torch.multinomial with a
    generator re-seeded with params.manual_seed at every step (as ChatTTS does), or the global RNG.
    """
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    from transformers.cache_utils import DynamicCache

    from ..batching import left_pad
    from ..params import InferCodeParams, RefineTextParams

    text_mode = mode == "text"
    params = params or (RefineTextParams() if text_mode else InferCodeParams())
    llama = llama or llama_from(model, cfg)
    ids_np, mask_np = left_pad(prompts)
    ids = torch.from_numpy(ids_np)
    mask = torch.from_numpy(mask_np).bool()
    B, T = mask.shape
    k = 1 if text_mode else cfg.num_vq
    V = cfg.num_text_tokens if text_mode else cfg.num_audio_tokens
    N = B * k
    eos = SPECIAL_TOKENS["Ebreak"] if text_mode else cfg.num_audio_tokens - 1
    temps = params.temperature if isinstance(params.temperature, (list, tuple)) else [params.temperature] * k
    temperature = torch.tensor(temps, dtype=torch.float32).unsqueeze(0).expand(B, -1).reshape(-1, 1)
    warpers = [TopPLogitsWarper(params.top_P, min_tokens_to_keep=3), TopKLogitsWarper(params.top_K, min_tokens_to_keep=3)]
    spk = None if speaker is None else torch.as_tensor(np.asarray(speaker, np.float32)).reshape(B, -1)

    res = ReferenceResult(frames=[[] for _ in range(B)], hidden=[[] for _ in range(B)], end_step=[None] * B)
    generated = torch.zeros(B, 0, 4, dtype=torch.int64)
    finished = torch.zeros(B, dtype=torch.bool)
    attn = mask.clone()
    cache = DynamicCache()
    gen = torch.Generator()
    with torch.no_grad():
        for step in range(params.max_new_token):
            if step == 0:
                emb = model.embed(ids, torch.ones(B, T, dtype=torch.bool), spk)
                pos = attn.long().cumsum(-1) - 1
                pos = pos.masked_fill(~attn, 1)
            else:
                last = generated[:, -1:, :]
                emb = model.embed(last, torch.full((B, 1), text_mode, dtype=torch.bool))
                attn = torch.cat([attn, torch.ones(B, 1, dtype=torch.bool)], 1)
                pos = (attn.long().cumsum(-1) - 1)[:, -1:]
            out = llama(inputs_embeds=emb, attention_mask=attn.long(), position_ids=pos, past_key_values=cache,
                        use_cache=True)
            # LlamaModel's output already went through its final norm (ChatTTS applies the heads to it).
            last_hidden = out.last_hidden_state[:, -1, :]
            if text_mode:
                logits = model.heads.head_text(last_hidden).float()
                window = generated[:, -16:, 0]
            else:
                logits = torch.stack([h(last_hidden) for h in model.heads.head_code], 1).reshape(N, V).float()
                window = generated[:, -16:, :].permute(0, 2, 1).reshape(N, -1)
            res.logits.append(logits.numpy().copy())
            scores = logits / temperature
            if params.repetition_penalty != 1:
                scores = repetition_penalty(scores, window, params.repetition_penalty)
            for w in warpers:
                scores = w(None, scores)
            if step < params.min_new_token:
                scores[:, eos] = -torch.inf
            probs = F.softmax(scores, dim=-1)
            if greedy:
                q = torch.ones(N, V)
            elif noise is not None:
                q = torch.as_tensor(noise(step, N, V), dtype=torch.float32)
            else:
                if params.manual_seed is not None:
                    gen.manual_seed(params.manual_seed)  # ChatTTS re-seeds at every step
                    q = torch.empty(N, V).exponential_(generator=gen)
                else:
                    q = torch.empty(N, V).exponential_()
            res.noise.append(q.numpy().copy())
            nxt = torch.argmax(probs / q, dim=1)  # == torch.multinomial(probs, 1) with the same q
            per_row = nxt.view(B, k)
            for b in range(B):
                if finished[b]:
                    continue
                if bool((per_row[b] == eos).any()):
                    finished[b] = True
                    res.end_step[b] = step
                    continue
                res.frames[b].append(tuple(int(x) for x in per_row[b]))
                res.hidden[b].append(last_hidden[b].numpy().copy())
            res.steps = step + 1
            step_ids = per_row.repeat_interleave(4 // k, dim=1) if text_mode else per_row
            generated = torch.cat([generated, step_ids.view(B, 1, 4)], 1)
            if bool(finished.all()):
                break
    return res
