"""Defaults of the torch-free product: where the cache lives and where the default model's export is kept.

The default model is a seeded random-weight model of ChatTTS's exact shape; `export/sources.py` writes and
exports it on first use (that needs the export extra); a runtime only reads the folder named here.
"""
from __future__ import annotations

import os
from pathlib import Path

from .version import __version__


def cache_dir() -> Path:
    """$CHATTTS_ORT_CACHE, or ~/.cache/chattts-ort."""
    root = os.environ.get("CHATTTS_ORT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "chattts-ort"


def default_export_dir(kind: str = "full", layer_form: str = "fused") -> Path:
    """Where the random default model's export lives. The package version is part of the name: a new release
    re-exports instead of reusing old graphs."""
    name = "random" if kind == "full" else "random-tiny"
    return cache_dir() / "exports" / f"{name}-seed0-{layer_form}-v{__version__}"
