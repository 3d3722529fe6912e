"""chattts-ort: ChatTTS's GPT exported to ONNX block by block, run from a C++ core on ONNX Runtime.

    rt = chattts_ort.Runtime.load(export_dir)
    for frame in rt.stream("Hello."):
        frame.codes  # four audio codes

Heavy modules (torch, the C++ core) load only when used.
"""
__version__ = "0.1.0"

from .errors import AssetError, ChatTTSOrtError  # noqa: E402
from .params import InferCodeParams, RefineTextParams  # noqa: E402
from . import speaker  # noqa: E402,F401  (spk_emb strings: encode / decode / random_speaker)

__all__ = ["Runtime", "Frame", "Generation", "InferCodeParams", "RefineTextParams", "export_model",
           "ChatTTSOrtError", "AssetError", "__version__"]


def __getattr__(name):
    if name in ("Runtime", "Frame", "Generation"):
        from . import runtime

        return getattr(runtime, name)
    if name == "export_model":
        from .export import export_model

        return export_model
    raise AttributeError(f"module 'chattts_ort' has no attribute {name!r}")
