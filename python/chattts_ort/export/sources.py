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
    _refresh_generated_tokenizer(folder / "tokenizer" / "tokenizer.json")
    if not ((folder / DECODER_FILE).is_file() and (folder / VOCOS_FILE).is_file()):  # folders of v0.2.0 lack them
        audio = AudioConfig.full() if kind == "full" else AudioConfig.tiny(cfg.hidden_size)
        write_random_audio(folder, audio, seed=seed)
    return folder


def _refresh_generated_tokenizer(path: Path) -> None:
    """Folders written before 0.4.0 hold a generated vocabulary of ~500 CJK characters that refuses ordinary
    Chinese; replace it with today's (the weights stay: every id has a random row either way)."""
    import os

    from tokenizers import Tokenizer

    from .assets import GENERATED_TOKENIZER_MARK, make_generated_tokenizer

    if Tokenizer.from_file(str(path)).token_to_id(GENERATED_TOKENIZER_MARK) is not None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        make_generated_tokenizer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def source_folder(src) -> Path:
    s = str(src)
    if s in RANDOM_SOURCES:
        return random_asset_folder(RANDOM_SOURCES[s])
    return Path(src)


def resolve_source(src):
    """(ChatTTSGPT, GPTConfig, tokenizer.json path) for a source name or asset folder."""
    from .assets import load_asset_folder

    return load_asset_folder(source_folder(src))
