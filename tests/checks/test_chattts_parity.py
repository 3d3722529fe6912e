"""The C++ runtime against ChatTTS 0.2.5's own GPT.generate on the same random weights (optional).

The `chattts` package's top-level import pulls in its audio stack (vocos, torchaudio), which cannot be
installed beside the CPU torch used here, so only its model modules are loaded (the package __init__ files
are bypassed). Skipped with the reason when `chattts` (installed with --no-deps) or its few needs are missing.
"""
import importlib.util
import json
import logging
import pathlib
import sys
import types

import numpy as np
import pytest
import torch

from chattts_ort import InferCodeParams, Runtime


_CACHE = {}


def _chattts_modules():
    if "mods" in _CACHE:
        return _CACHE["mods"]
    spec = importlib.util.find_spec("ChatTTS")
    if spec is None:
        pytest.skip("the chattts package is not installed (pip install --no-deps chattts==0.2.5)")
    root = pathlib.Path(spec.submodule_search_locations[0])
    saved = {k: sys.modules.get(k) for k in ("ChatTTS", "ChatTTS.model")}
    try:
        for name, path in (("ChatTTS", root), ("ChatTTS.model", root / "model")):
            if name not in sys.modules or not hasattr(sys.modules[name], "Chat"):
                m = types.ModuleType(name)
                m.__path__ = [str(path)]
                sys.modules[name] = m
        from ChatTTS.model.embed import Embed
        from ChatTTS.model.gpt import GPT
        from ChatTTS.model.processors import gen_logits
        from ChatTTS.model.speaker import Speaker
    except Exception as e:  # missing needs of ChatTTS (requests, pybase16384, ...)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
        pytest.skip(f"ChatTTS's model modules do not import here: {e!r}")
    _CACHE["mods"] = (Embed, GPT, gen_logits, Speaker)
    return _CACHE["mods"]


def test_runtime_matches_chattts_generate(tiny_export):
    Embed, GPT, gen_logits, Speaker = _chattts_modules()
    from chattts_ort.export.sources import random_asset_folder
    from chattts_ort.speaker import random_speaker

    logging.getLogger("ChatTTS").setLevel(logging.ERROR)
    folder = random_asset_folder("tiny")  # the folder tiny_export was exported from
    cfg = json.loads((folder / "gpt" / "config.json").read_text())
    embed = Embed(cfg["hidden_size"], cfg["num_audio_tokens"], cfg["num_text_tokens"], cfg["num_vq"])
    embed.load_pretrained(str(folder / "Embed.safetensors"), torch.device("cpu"))
    gpt = GPT(cfg, embed)
    gpt.load_pretrained(str(folder / "gpt"), str(folder / "Embed.safetensors"))
    gpt.prepare()

    rt = Runtime.load(tiny_export, threads=1, max_context=256, max_batch=2)
    spk = random_speaker(seed=3, dim=cfg["hidden_size"])
    prompts = [rt.tokenize("[Stts][spk_emb][speed_5]hello world, this is a test[Ptts]"),
               rt.tokenize("[Stts][spk_emb][speed_5]chat tts[Ptts]")]
    T = max(map(len, prompts))
    ids = torch.zeros(2, T, 4, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, p in enumerate(prompts):  # ChatTTS's tokenizer left-pads a batch
        ids[b, T - len(p):] = torch.tensor(p).unsqueeze(-1)
        mask[b, T - len(p):] = True
    emb = embed(ids, torch.ones(2, T, dtype=torch.bool))
    Speaker.apply(Speaker.__new__(Speaker), emb, spk, ids, 21143, torch.device("cpu"))
    steps, seed = 120, 1234
    warpers, procs = gen_logits(cfg["num_audio_tokens"] - 1, top_P=0.7, top_K=20, repetition_penalty=1.05)
    out = next(gpt.generate(emb, ids, temperature=torch.tensor([0.3] * 4), eos_token=cfg["num_audio_tokens"] - 1,
                            attention_mask=mask, max_new_token=steps, min_new_token=0,
                            logits_processors=(*procs, *warpers), show_tqdm=False, manual_seed=seed,
                            return_hidden=True))
    # ChatTTS re-seeds its generator with manual_seed at every step: every step draws the same Exp(1) noise.
    q = torch.empty(8, cfg["num_audio_tokens"]).exponential_(generator=torch.Generator().manual_seed(seed))
    noise = np.repeat(q.numpy()[None], steps, axis=0)
    got = rt.stream_tokens(prompts, params=InferCodeParams(max_new_token=steps, return_hidden=True), speaker=spk,
                           noise=noise)
    frames = {0: [], 1: []}
    hidden = {0: [], 1: []}
    for f in got:
        frames[f.row].append(f.codes)
        hidden[f.row].append(f.hidden)
    for b in range(2):
        want = out.ids[b].numpy()
        assert np.array_equal(np.array(frames[b]).reshape(-1, 4), want), f"row {b}"
        np.testing.assert_allclose(np.array(hidden[b]), out.hiddens[b].numpy(), atol=2e-4)
    print(f"frames per row: {[len(frames[0]), len(frames[1])]} (ChatTTS: {[len(x) for x in out.ids]})")
