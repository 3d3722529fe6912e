"""Where models come from: the seeded random default (written once in ChatTTS's asset layout, then exported
to the cache), the tiny variant tests use, or a real ChatTTS asset folder. Real weights cannot be downloaded here; speed does not depend on their values.

Sources understood everywhere a model is named: "random" (full shape, seed 0), "random-tiny" (a tiny shape
for tests), or the path of a ChatTTS asset folder (asset/gpt/{config.json, model.safetensors},
asset/Embed.safetensors, asset/tokenizer/).
"""
from __future__ import annotations

from pathlib import Path

from ..defaults import cache_dir

RANDOM_SOURCES = {"random": "full", "random-tiny": "tiny"}


def random_asset_folder(kind: str = "full", seed: int = 0) -> Path:
    """The random asset folder (written on first use)."""
    from ..config import GPTConfig
    from .assets import write_random_asset_folder

    from ..config import AudioConfig
    from .audio import DECODER_FILE, VOCOS_FILE, write_random_audio

    cfg = GPTConfig.full() if kind == "full" else GPTConfig.tiny()
    folder = cache_dir() / "assets" / f"random-{kind}-seed{seed}"
    if not (folder / "gpt" / "model.safetensors").is_file():
        write_random_asset_folder(folder, cfg=cfg, seed=seed)
    if not ((folder / DECODER_FILE).is_file() and (folder / VOCOS_FILE).is_file()):  # folders of v0.2.0 lack them
        audio = AudioConfig.full() if kind == "full" else AudioConfig.tiny(cfg.hidden_size)
        write_random_audio(folder, audio, seed=seed)
    return folder


def source_folder(src) -> Path:
    s = str(src)
    if s in RANDOM_SOURCES:
        return random_asset_folder(RANDOM_SOURCES[s])
    return Path(src)


def resolve_source(src):
    """(ChatTTSGPT, GPTConfig, tokenizer.json path) for a source name or asset folder."""
    from .assets import load_asset_folder

    return load_asset_folder(source_folder(src))
