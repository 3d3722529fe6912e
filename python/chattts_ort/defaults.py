"""The embedded default: a seeded random-weight model of ChatTTS's exact shape (real weights cannot be
downloaded here; speed does not depend on the values). It is written once, in ChatTTS's asset layout, to a
cache folder, and exported from there, so the demo and the benchmarks need no download.

Sources understood everywhere a model is named: "random" (full shape, seed 0), "random-tiny" (a tiny shape
for tests), or the path of a ChatTTS asset folder (asset/gpt/{config.json, model.safetensors},
asset/Embed.safetensors, asset/tokenizer/).
"""
from __future__ import annotations

import os
from pathlib import Path

RANDOM_SOURCES = {"random": "full", "random-tiny": "tiny"}


def cache_dir() -> Path:
    root = os.environ.get("CHATTTS_ORT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "chattts-ort"


def random_asset_folder(kind: str = "full", seed: int = 0) -> Path:
    """The random asset folder (written on first use)."""
    from .assets import write_random_asset_folder
    from .config import GPTConfig

    cfg = GPTConfig.full() if kind == "full" else GPTConfig.tiny()
    folder = cache_dir() / "assets" / f"random-{kind}-seed{seed}"
    if not (folder / "gpt" / "model.safetensors").is_file():
        write_random_asset_folder(folder, cfg=cfg, seed=seed)
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


def default_export(kind: str = "full", progress: bool = False, layer_form: str = "fused") -> Path:
    """The export folder of the random default model (exported on first use, then reused)."""
    from . import __version__
    from .export import MANIFEST, export_model

    name = "random" if kind == "full" else "random-tiny"
    # The package version is part of the name: a new release re-exports instead of reusing old graphs.
    folder = cache_dir() / "exports" / f"{name}-seed0-{layer_form}-v{__version__}"
    if not (folder / MANIFEST).is_file():
        if progress:
            print(f"first use: exporting the random {kind}-shape model to {folder} ...", flush=True)
        export_model(name, folder, force=True, progress=progress, layer_form=layer_form)
    return folder
