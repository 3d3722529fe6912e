"""Our PyTorch GPT against references: transformers' LlamaModel, torch's weight norm, F.normalize."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chattts_ort.export.assets import gpt_from_state_dicts, random_state_dicts, to_transformers_llama_state_dict
from chattts_ort.config import SPECIAL_TOKENS, GPTConfig
from chattts_ort.export.model import attention_bias, normalize_speaker, rope_cos_sin
from chattts_ort.checks.reference import llama_from


def _chain_vs_llama(cfg, seed=0, decode_steps=5):
    torch.manual_seed(seed)
    llama_sd, embed_sd = random_state_dicts(cfg, seed)
    gpt = gpt_from_state_dicts(cfg, llama_sd, embed_sd)
    llama = llama_from(gpt, cfg)
    from transformers.cache_utils import DynamicCache

    B, T, E = 2, 7, cfg.hidden_size
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, :3] = 0  # row 1 is left-padded
    x = torch.randn(B, T, E)
    worst = 0.0
    with torch.no_grad():
        pos = mask.cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 1)
        cache = DynamicCache()
        want = llama(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
        h, past = gpt.forward_layers(x, cos, sin, attention_bias(mask, T))
        got = gpt.heads.norm(h)
        valid = mask.bool()
        worst = max(worst, (got - want.last_hidden_state)[valid].abs().max().item())
        for _ in range(decode_steps):
            xs = torch.randn(B, 1, E)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], 1)
            pos = (mask.cumsum(-1) - 1)[:, -1:]
            want = llama(inputs_embeds=xs, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
            h, past = gpt.forward_layers(xs, cos, sin, attention_bias(mask, 1), past)
            worst = max(worst, (gpt.heads.norm(h) - want.last_hidden_state).abs().max().item())
    return worst


def test_layers_match_transformers_llama_tiny():
    err = _chain_vs_llama(GPTConfig.tiny())
    print(f"tiny: max abs error vs transformers LlamaModel = {err:.3e}")
    assert err < 1e-4


@pytest.mark.slow
def test_layers_match_transformers_llama_full_shape():
    torch.set_num_threads(2)
    err = _chain_vs_llama(GPTConfig.full(), decode_steps=2)
    print(f"full shape: max abs error vs transformers LlamaModel = {err:.3e}")
    assert err < 1e-4


def test_heads_bake_weight_norm_like_torch():
    cfg = GPTConfig.tiny()
    llama_sd, embed_sd = random_state_dicts(cfg, 3)
    gpt = gpt_from_state_dicts(cfg, llama_sd, embed_sd)
    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(cfg.hidden_size, cfg.num_audio_tokens, bias=False))
    lin.load_state_dict({"parametrizations.weight.original0": embed_sd["head_code.2.parametrizations.weight.original0"],
                         "parametrizations.weight.original1": embed_sd["head_code.2.parametrizations.weight.original1"]})
    h = torch.randn(3, 1, cfg.hidden_size)
    logits, last = gpt.heads.forward_code(h)
    torch.testing.assert_close(logits[:, 2], lin(gpt.heads.norm(h[:, -1])), rtol=1e-5, atol=1e-5)
    assert logits.shape == (3, cfg.num_vq, cfg.num_audio_tokens)


def test_embed_rows():
    cfg = GPTConfig.tiny()
    gpt = gpt_from_state_dicts(cfg, *random_state_dicts(cfg, 4))
    ids = torch.tensor([[[5000] * 4, [SPECIAL_TOKENS["spk_emb"]] * 4, [1, 2, 3, 625]]])
    text_mask = torch.tensor([[True, True, False]])
    spk = torch.randn(1, cfg.hidden_size)
    out = gpt.embed(ids, text_mask, spk)
    e = gpt.embed
    torch.testing.assert_close(out[0, 0], e.emb_text.weight[5000])
    code = sum(e.emb_code[i].weight[int(ids[0, 2, i])] for i in range(4))
    torch.testing.assert_close(out[0, 2], code)
    # ChatTTS: F.normalize of the fp16 speaker, then fp32.
    want = F.normalize(spk[0].to(torch.float16), p=2.0, dim=0, eps=1e-12).float()
    torch.testing.assert_close(out[0, 1], want, rtol=0, atol=0)
    # Without a speaker the [spk_emb] row is the text embedding.
    out2 = gpt.embed(ids, text_mask, None)
    torch.testing.assert_close(out2[0, 1], e.emb_text.weight[SPECIAL_TOKENS["spk_emb"]])


def test_speaker_normalisation_matches_chattts_bitwise():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = (torch.randn(768, generator=g) * float(torch.rand(1, generator=g) * 5 + 0.01)).to(torch.float16)
        want = F.normalize(x, p=2.0, dim=0, eps=1e-12).float()
        got = normalize_speaker(x.float().unsqueeze(0))[0]
        assert torch.equal(got, want)


def test_attention_bias_left_padding():
    mask = torch.tensor([[0, 1, 1, 1]])
    b = attention_bias(mask, 2)  # P = 2 cached, 2 new
    neg = torch.finfo(torch.float32).min
    assert b.shape == (1, 1, 2, 4)
    assert b[0, 0, 0].tolist() == [neg, 0.0, 0.0, neg]
    assert b[0, 0, 1].tolist() == [neg, 0.0, 0.0, 0.0]


def test_state_dict_round_trip():
    cfg = GPTConfig.tiny()
    llama_sd, embed_sd = random_state_dicts(cfg, 5)
    gpt = gpt_from_state_dicts(cfg, llama_sd, embed_sd)
    back = to_transformers_llama_state_dict(gpt)
    for k, v in llama_sd.items():
        assert torch.equal(back[k], v), k
