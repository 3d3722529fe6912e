"""The systems bench/run.py measures, each behind the same two calls:

    system = make_system(name, ...)           # load (timed by the caller)
    t_call, stamps = system.run(prompt_len, steps)

`run` generates exactly `steps` frames (EOS is blocked: min_new_token = max_new_token) after a prompt of
`prompt_len` tokens and returns perf_counter() at the call and at the moment each frame became available
to the caller. Time to first frame = stamps[0] - t_call (prefill + first sample); per-step decode time =
diff(stamps).

- chattts-ort: the product. Runtime.stream(text) with a text whose templated prompt is exactly prompt_len
  tokens (the user's path, tokenizer included); each frame timed as the stream yields it.
- ort-python: the same exported graphs driven from Python (chattts_ort.ortloop.OrtLoop). It has no per-frame
  hook, so the sample-head session is wrapped: a frame is stamped when the sample head returns.
- torch-eager: transformers' LlamaModel (eager attention, KV cache) on the same weights plus ChatTTS's
  sampling in PyTorch (temperature, repetition penalty, top-p, top-k, softmax, multinomial) - what a
  PyTorch user of ChatTTS runs. Stamped after each multinomial draw.
- chattts-0.2.5: ChatTTS 0.2.5's own GPT.generate (stream=True, stream_batch=1: one yield per step; its last,
  extra yield after the loop is not a frame and is dropped).
- onnxruntime-genai: its model builder on the same weights saved as a transformers LlamaForCausalLM whose
  vocabulary is one code book (embed_tokens = emb_code[0], lm_head = head_code[0], 626 tokens), greedy search.
  One head instead of four and no repetition penalty: a slightly lighter job than ChatTTS's step. The first
  frame = append_tokens (prefill) + the first generate_next_token (which only picks from the prefill logits).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

now = time.perf_counter


def _gpt(model_kind: str):
    from chattts_ort.export.sources import resolve_source

    return resolve_source("random" if model_kind == "full" else "random-tiny")


# ------------------------------------------------------------------------------------------------ chattts-ort


class ChatttsOrt:
    """The product: C++ core behind Runtime.stream()."""

    WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree and "
             "children play near the river on a bright summer morning").split()

    def __init__(self, export_dir, threads, max_context):
        from chattts_ort import Runtime

        self.rt = Runtime.load(export_dir, threads=threads, max_context=max_context, verify=False)
        self._texts = {}

    def text_of_length(self, n: int):
        """A text whose ChatTTS prompt ([Stts][empty_spk][speed_5]{text}[Ptts]) is exactly n tokens, or None."""
        if n in self._texts:
            return self._texts[n]
        from chattts_ort.params import build_prompt_code

        count = lambda ws: len(self.rt.tokenize(build_prompt_code(" ".join(ws), False, None, "[speed_5]")))  # noqa: E731
        words, i = [], 0
        while count(words) < n and i < 4 * n:
            words.append(self.WORDS[i % len(self.WORDS)])
            i += 1
        while words and count(words) > n:
            words.pop()
        while count(words) < n and len(words) < 4 * n:   # top up one token at a time
            words.append("a")
        text = " ".join(words) if count(words) == n else None
        self._texts[n] = text
        return text

    def run(self, prompt_len, steps):
        from chattts_ort import InferCodeParams

        params = InferCodeParams(max_new_token=steps, min_new_token=steps, manual_seed=0)
        text = self.text_of_length(prompt_len)
        stamps = []
        t0 = now()
        if text is not None:
            it = self.rt.stream(text, params=params)
        else:  # the tokenizer cannot hit the length exactly: same loop on token ids
            it = self.rt.stream_tokens([[21131, 21144, 21173] + [1000 + i for i in range(prompt_len - 4)] + [21132]],
                                       params=params)
        for _ in it:
            stamps.append(now())
        return t0, stamps


# ------------------------------------------------------------------------------------------------ ort-python


class _StampedSession:
    """An onnxruntime session proxy that records when each run returns."""

    def __init__(self, sess, stamps):
        self.sess, self.stamps = sess, stamps

    def run(self, *a, **k):
        out = self.sess.run(*a, **k)
        self.stamps.append(now())
        return out


class OrtPython:
    def __init__(self, export_dir, threads):
        from chattts_ort.checks.ortloop import OrtLoop

        self.loop = OrtLoop(export_dir, threads=threads)
        self.stamps = []
        self.loop.sample = _StampedSession(self.loop.sample, self.stamps)

    def run(self, prompt_len, steps):
        prompt = [[21131, 21144, 21173] + [1000 + i for i in range(prompt_len - 4)] + [21132]]
        self.stamps.clear()
        t0 = now()
        self.loop.generate(prompt, max_new_token=steps, min_new_token=steps, seed=0)
        return t0, list(self.stamps)


# ------------------------------------------------------------------------------------------------ torch-eager


class TorchEager:
    def __init__(self, model_kind, threads):
        import torch
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        from chattts_ort.checks.reference import llama_from

        torch.set_num_threads(threads)
        self.gpt, self.cfg, _ = _gpt(model_kind)
        self.llama = llama_from(self.gpt, self.cfg, attn_implementation="eager")
        self.warpers = [TopPLogitsWarper(0.7, min_tokens_to_keep=3), TopKLogitsWarper(20, min_tokens_to_keep=3)]

    def run(self, prompt_len, steps):
        import torch
        import torch.nn.functional as F
        from transformers.cache_utils import DynamicCache

        from chattts_ort.checks.reference import repetition_penalty

        gpt, cfg = self.gpt, self.cfg
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (1, prompt_len), generator=g)
        temperature = torch.full((cfg.num_vq, 1), 0.3)
        stamps = []
        with torch.inference_mode():
            t0 = now()
            emb = gpt.embed(ids.unsqueeze(-1).expand(-1, -1, cfg.num_vq), torch.ones(1, prompt_len, dtype=torch.bool))
            cache = DynamicCache()
            attn = torch.ones(1, prompt_len, dtype=torch.long)
            generated = torch.zeros(cfg.num_vq, 0, dtype=torch.long)
            for step in range(steps):
                if step:
                    emb = gpt.embed(nxt.view(1, 1, cfg.num_vq), torch.zeros(1, 1, dtype=torch.bool))
                    attn = torch.cat([attn, torch.ones(1, 1, dtype=torch.long)], 1)
                out = self.llama(inputs_embeds=emb, attention_mask=attn, past_key_values=cache, use_cache=True)
                h = out.last_hidden_state[:, -1]
                logits = torch.stack([hd(h) for hd in gpt.heads.head_code], 1).view(cfg.num_vq, -1) / temperature
                logits = repetition_penalty(logits, generated[:, -16:], 1.05)
                for w in self.warpers:
                    logits = w(None, logits)
                logits[:, cfg.num_audio_tokens - 1] = -torch.inf  # min_new_token = steps: EOS blocked
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=g).view(-1)
                generated = torch.cat([generated, nxt.view(-1, 1)], 1)
                stamps.append(now())
        return t0, stamps


# ------------------------------------------------------------------------------------------------ ChatTTS 0.2.5


def chattts_modules():
    """ChatTTS 0.2.5's model modules without its package __init__ (which imports vocos/torchaudio)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("ChatTTS")
    if spec is None:
        raise RuntimeError("the chattts package is not installed (pip install --no-deps chattts==0.2.5)")
    root = Path(spec.submodule_search_locations[0])
    for name, path in (("ChatTTS", root), ("ChatTTS.model", root / "model")):
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        sys.modules[name] = m
    from ChatTTS.model.embed import Embed
    from ChatTTS.model.gpt import GPT
    from ChatTTS.model.processors import gen_logits

    return Embed, GPT, gen_logits


class ChatTTS025:
    def __init__(self, model_kind, threads):
        import logging

        import torch

        from chattts_ort.export.sources import random_asset_folder

        logging.disable(logging.WARNING)
        torch.set_num_threads(threads)
        Embed, GPT, gen_logits = chattts_modules()
        folder = random_asset_folder("full" if model_kind == "full" else "tiny")
        self.cfg = cfg = json.loads((folder / "gpt" / "config.json").read_text())
        self.embed = Embed(cfg["hidden_size"], cfg["num_audio_tokens"], cfg["num_text_tokens"], cfg["num_vq"])
        self.embed.load_pretrained(str(folder / "Embed.safetensors"), torch.device("cpu"))
        self.gpt = GPT(cfg, self.embed)
        self.gpt.load_pretrained(str(folder / "gpt"), str(folder / "Embed.safetensors"))
        self.gpt.prepare()
        warpers, procs = gen_logits(cfg["num_audio_tokens"] - 1, top_P=0.7, top_K=20, repetition_penalty=1.05)
        self.procs = (*procs, *warpers)

    def run(self, prompt_len, steps):
        import torch

        cfg = self.cfg
        rng = np.random.default_rng(0)
        ids = torch.from_numpy(rng.integers(1000, 20000, (1, prompt_len))).unsqueeze(-1).expand(-1, -1, cfg["num_vq"]).contiguous()
        stamps = []
        with torch.inference_mode():
            t0 = now()
            emb = self.embed(ids, torch.ones(1, prompt_len, dtype=torch.bool))
            for _ in self.gpt.generate(emb, ids, temperature=torch.tensor([0.3] * cfg["num_vq"]),
                                       eos_token=cfg["num_audio_tokens"] - 1,
                                       attention_mask=torch.ones(1, prompt_len, dtype=torch.bool), max_new_token=steps,
                                       min_new_token=steps, logits_processors=self.procs, show_tqdm=False,
                                       stream=True, stream_batch=1, manual_seed=0):
                stamps.append(now())
        return t0, stamps[:steps]  # the last yield (after the loop) is the final result, not a new frame


# ------------------------------------------------------------------------------------------------ onnxruntime-genai


def genai_available():
    try:
        import onnxruntime_genai  # noqa: F401

        return True, ""
    except Exception as e:  # pragma: no cover
        return False, f"onnxruntime-genai not importable: {e}"


def save_llama_for_causal_lm(model_kind: str, out_dir: Path) -> Path:
    """The same random weights as a transformers LlamaForCausalLM (vocab = one code book of 626)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from chattts_ort.export.assets import to_transformers_llama_state_dict

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
    sd["lm_head.weight"] = gpt.heads.head_code[0].weight.detach()  # weight norm already baked by our model
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


class Genai:
    def __init__(self, model_dir, threads):
        import onnxruntime_genai as og

        cfg_path = Path(model_dir) / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        opts = cfg["model"]["decoder"].setdefault("session_options", {})
        if opts.get("intra_op_num_threads") != threads:
            opts["intra_op_num_threads"] = threads
            cfg_path.write_text(json.dumps(cfg, indent=2))
        self.og = og
        self.model = og.Model(str(model_dir))
        self.context_length = cfg["model"].get("context_length")

    def run(self, prompt_len, steps):
        og = self.og
        params = og.GeneratorParams(self.model)
        # max_length counts the prompt: prompt_len + steps generated tokens; min_length keeps EOS away.
        params.set_search_options(do_sample=False, max_length=prompt_len + steps, min_length=prompt_len + steps)
        gen = og.Generator(self.model, params)
        prompt = np.random.default_rng(0).integers(1, 600, prompt_len).astype(np.int32)
        stamps = []
        t0 = now()
        gen.append_tokens(prompt)           # prefill forward
        while len(stamps) < steps and not gen.is_done():
            gen.generate_next_token()       # picks a token from the last logits, then (next call) runs a step
            stamps.append(now())
        return t0, stamps


# ------------------------------------------------------------------------------------------------ factory


def make_system(name, *, export="", model="full", threads=1, max_context=2048):
    if name == "chattts-ort":
        return ChatttsOrt(export, threads, max_context)
    if name == "ort-python":
        return OrtPython(export, threads)
    if name == "torch-eager":
        return TorchEager(model, threads)
    if name == "chattts-0.2.5":
        return ChatTTS025(model, threads)
    if name == "onnxruntime-genai":
        return Genai(export, threads)
    raise ValueError(f"unknown system {name}")
