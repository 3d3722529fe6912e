"""Peers measured by bench/run.py in the same run as chattts-ort.

- torch-eager: transformers' LlamaModel (eager attention, KV cache) on the same weights, with ChatTTS's
  sampling in PyTorch (our reference loop's processing: temperature, repetition penalty, top-p, top-k,
  softmax, multinomial). What a PyTorch user of ChatTTS runs.
- ort-python: the same exported graphs driven from Python with onnxruntime's API (chattts_ort.ortloop).
- onnxruntime-genai: its model builder on the same weights saved as a transformers LlamaForCausalLM whose
  vocabulary is one code book (embed_tokens = emb_code[0], lm_head = head_code[0], 626 tokens), greedy search.
  One head instead of four and no repetition penalty: a slightly lighter job than ChatTTS's step.

Each measure_* function returns per-step times (ms) of the decode loop and the prefill latency (ms).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _gpt(model_kind: str):
    from chattts_ort.defaults import resolve_source

    return resolve_source("random" if model_kind == "full" else "random-tiny")


def measure_torch_eager(model_kind: str, prompt_len: int, steps: int, threads: int, context_points=()):
    """Decode ms/step of transformers LlamaModel + ChatTTS sampling (batch 1)."""
    import torch
    import torch.nn.functional as F
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    from transformers.cache_utils import DynamicCache

    from chattts_ort.reference import llama_from, repetition_penalty

    torch.set_num_threads(threads)
    gpt, cfg, _ = _gpt(model_kind)
    llama = llama_from(gpt, cfg, attn_implementation="eager")
    heads = gpt.heads.head_code
    warpers = [TopPLogitsWarper(0.7, min_tokens_to_keep=3), TopKLogitsWarper(20, min_tokens_to_keep=3)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (1, prompt_len), generator=g)
    temperature = torch.full((cfg.num_vq, 1), 0.3)
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        emb = gpt.embed(ids.unsqueeze(-1).expand(-1, -1, 4), torch.ones(1, prompt_len, dtype=torch.bool))
        cache = DynamicCache()
        attn = torch.ones(1, prompt_len, dtype=torch.long)
        generated = torch.zeros(cfg.num_vq, 0, dtype=torch.long)
        for step in range(steps):
            if step:
                emb = gpt.embed(nxt.view(1, 1, 4), torch.zeros(1, 1, dtype=torch.bool))
                attn = torch.cat([attn, torch.ones(1, 1, dtype=torch.long)], 1)
            out = llama(inputs_embeds=emb, attention_mask=attn, past_key_values=cache, use_cache=True)
            h = out.last_hidden_state[:, -1]
            logits = torch.stack([hd(h) for hd in heads], 1).view(cfg.num_vq, -1) / temperature
            logits = repetition_penalty(logits, generated[:, -16:], 1.05)
            for w in warpers:
                logits = w(None, logits)
            logits[:, cfg.num_audio_tokens - 1] = -torch.inf  # min_new_token = steps: EOS blocked
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=g).view(-1)
            generated = torch.cat([generated, nxt.view(-1, 1)], 1)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1000)
            t0 = t1
    return {"prefill_ms": times[0], "step_ms": times[1:]}


def measure_ort_python(export_dir: str, prompt_len: int, steps: int, threads: int):
    """Per-step ms of the Python ONNX Runtime loop (timed through its noise callback, called once per step)."""
    from chattts_ort.ortloop import OrtLoop

    loop = OrtLoop(export_dir, threads=threads)
    rng = np.random.default_rng(0)
    stamps = []

    def noise(step, N, V):
        stamps.append(time.perf_counter())
        return rng.exponential(size=(N, V)).astype(np.float32)

    prompt = [[21131, 21144, 21173] + rng.integers(1000, 20000, max(1, prompt_len - 4)).tolist() + [21132]]
    t0 = time.perf_counter()
    loop.generate(prompt, max_new_token=steps, min_new_token=steps, noise=noise)
    # stamps[i] is taken inside step i just before the sample head: differences are per-step times.
    d = np.diff([t0] + stamps) * 1000
    return {"prefill_ms": float(d[0]), "step_ms": d[1:].tolist()}


def chattts_modules():
    """ChatTTS 0.2.5's model modules without its package __init__ (which needs vocos/torchaudio)."""
    import importlib.util
    import pathlib
    import types

    spec = importlib.util.find_spec("ChatTTS")
    if spec is None:
        raise RuntimeError("the chattts package is not installed (pip install --no-deps chattts==0.2.5)")
    root = pathlib.Path(spec.submodule_search_locations[0])
    for name, path in (("ChatTTS", root), ("ChatTTS.model", root / "model")):
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        sys.modules[name] = m
    from ChatTTS.model.embed import Embed
    from ChatTTS.model.gpt import GPT
    from ChatTTS.model.processors import gen_logits

    return Embed, GPT, gen_logits


def measure_chattts(model_kind: str, prompt_len: int, steps: int, threads: int):
    """ChatTTS 0.2.5's own GPT.generate on the same asset folder, streamed one step per yield."""
    import logging

    import torch

    from chattts_ort.defaults import random_asset_folder

    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    Embed, GPT, gen_logits = chattts_modules()
    folder = random_asset_folder("full" if model_kind == "full" else "tiny")
    cfg = json.loads((folder / "gpt" / "config.json").read_text())
    embed = Embed(cfg["hidden_size"], cfg["num_audio_tokens"], cfg["num_text_tokens"], cfg["num_vq"])
    embed.load_pretrained(str(folder / "Embed.safetensors"), torch.device("cpu"))
    gpt = GPT(cfg, embed)
    gpt.load_pretrained(str(folder / "gpt"), str(folder / "Embed.safetensors"))
    gpt.prepare()
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, 20000, (1, prompt_len))).unsqueeze(-1).expand(-1, -1, 4).contiguous()
    warpers, procs = gen_logits(cfg["num_audio_tokens"] - 1, top_P=0.7, top_K=20, repetition_penalty=1.05)
    stamps = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        emb = embed(ids, torch.ones(1, prompt_len, dtype=torch.bool))
        for _ in gpt.generate(emb, ids, temperature=torch.tensor([0.3] * 4), eos_token=cfg["num_audio_tokens"] - 1,
                              attention_mask=torch.ones(1, prompt_len, dtype=torch.bool), max_new_token=steps,
                              min_new_token=steps, logits_processors=(*procs, *warpers), show_tqdm=False,
                              stream=True, stream_batch=1, manual_seed=0):
            stamps.append(time.perf_counter())
    d = np.diff([t0] + stamps) * 1000
    return {"prefill_ms": float(d[0]), "step_ms": d[1:].tolist()}


# ---------------------------------------------------------------------------------------------------------- genai


def genai_available():
    try:
        import onnxruntime_genai  # noqa: F401

        return True, ""
    except Exception as e:  # pragma: no cover
        return False, f"onnxruntime-genai not importable: {e}"


def save_llama_for_causal_lm(model_kind: str, out_dir: Path) -> Path:
    """The same random weights as a transformers LlamaForCausalLM (vocab = one code book of 626)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chattts_ort.assets import to_transformers_llama_state_dict

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    gpt, cfg, _ = _gpt(model_kind)
    lc = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                     max_position_embeddings=cfg.max_position_embeddings, vocab_size=cfg.num_audio_tokens,
                     bos_token_id=0, eos_token_id=cfg.num_audio_tokens - 1, pad_token_id=0,
                     tie_word_embeddings=False)
    m = LlamaForCausalLM(lc).eval()
    sd = {f"model.{k}": v for k, v in to_transformers_llama_state_dict(gpt).items()}
    sd["model.embed_tokens.weight"] = gpt.embed.emb_code[0].weight.detach()
    sd["lm_head.weight"] = gpt.heads.head_code[0].weight.detach()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    m.save_pretrained(str(tmp))
    _save_code_tokenizer(tmp, cfg.num_audio_tokens)  # the builder copies a tokenizer; codes need none
    os.replace(tmp, out_dir)
    return out_dir


def _save_code_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"c{i}": i for i in range(vocab)}, unk_token="c0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="c0", pad_token="c0", bos_token="c0",
                            eos_token=f"c{vocab - 1}").save_pretrained(str(folder))


def build_genai(hf_dir: Path, out_dir: Path, precision: str) -> Path:
    out_dir = Path(out_dir)
    if (out_dir / "genai_config.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(tmp) + "-cache",
           "--extra_options", "int4_accuracy_level=4"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (tmp / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai builder failed ({precision}): {r.stderr[-2000:]}")
    os.replace(tmp, out_dir)
    return out_dir


def measure_genai(model_dir: str, prompt_len: int, steps: int, threads: int):
    import onnxruntime_genai as og

    cfg_path = Path(model_dir) / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt_len + steps + 1, min_length=prompt_len + steps + 1)
    gen = og.Generator(model, params)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 600, prompt_len).astype(np.int32)
    times = []
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    # append_tokens runs the prefill; each generate_next_token then runs one decode step.
    t1 = time.perf_counter()
    prefill = (t1 - t0) * 1000
    for _ in range(steps):
        t0 = time.perf_counter()
        gen.generate_next_token()
        times.append((time.perf_counter() - t0) * 1000)
        if gen.is_done():
            break
    return {"prefill_ms": prefill, "step_ms": times}
