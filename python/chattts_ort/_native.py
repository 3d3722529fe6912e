"""Loading the C++ core and, through it, libonnxruntime from the installed onnxruntime wheel.

The core links to nothing: it dlopens the library that the `onnxruntime` (or `onnxruntime-gpu`) package
ships, so one build of the extension serves both wheels. Set CHATTTS_ORT_LIBRARY to use another library.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import threading

_lock = threading.Lock()


class RuntimeLibraryError(RuntimeError):
    """libonnxruntime could not be found or loaded."""


def find_onnxruntime_library() -> str:
    """Path of libonnxruntime inside the installed onnxruntime package (or $CHATTTS_ORT_LIBRARY)."""
    override = os.environ.get("CHATTTS_ORT_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise RuntimeLibraryError(f"CHATTTS_ORT_LIBRARY={override} does not exist")
        return override
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeLibraryError(
            "the onnxruntime package is not installed: `pip install onnxruntime` (CPU) or "
            "`pip install onnxruntime-gpu` (CUDA)")
    for root in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(root, "capi", "libonnxruntime.so*")))
        hits += sorted(glob.glob(os.path.join(root, "capi", "libonnxruntime*.dylib")))
        if hits:
            return hits[0]
    raise RuntimeLibraryError(
        f"no libonnxruntime shared library in the onnxruntime package at {list(spec.submodule_search_locations)}")


def core():
    """The `chattts_ort._core` module with ONNX Runtime loaded (idempotent, thread-safe)."""
    from . import _core

    with _lock:
        if not _core.runtime_ready():
            path = find_onnxruntime_library()
            try:
                _core.init_runtime(path)
            except RuntimeError as e:
                raise RuntimeLibraryError(str(e)) from e
    return _core


def runtime_info() -> dict:
    c = core()
    return {
        "onnxruntime": c.runtime_version(),
        "library": c.runtime_library_path(),
        "providers": list(c.available_providers()),
        "api_version": int(c.ORT_API_VERSION),
    }
