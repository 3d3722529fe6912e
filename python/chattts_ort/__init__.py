"""chattts-ort: ChatTTS's GPT exported to ONNX block by block, run from a C++ core on ONNX Runtime.

    rt = chattts_ort.Runtime.load(export_dir)      # or chattts_ort.prepare.load_model("2Noise/ChatTTS")
    for frame in rt.stream("Hello."):
        frame.codes  # four audio codes

Heavy modules (torch, the C++ core) load only when used.
"""
from .version import __version__  # noqa: F401
from .errors import AssetError, ChatTTSOrtError, ExportError, GenerationError, QuantizeError  # noqa: E402
from .params import InferCodeParams, RefineTextParams  # noqa: E402
from . import speaker  # noqa: E402,F401  (spk_emb strings: encode / decode / random_speaker)
from .frontend import Normalizer  # noqa: E402,F401  (ChatTTS's text front-end)

__all__ = ["Runtime", "Frame", "Generation", "AudioChunk", "InferCodeParams", "RefineTextParams", "Normalizer",
           "ChatTTSOrtError",
           "AssetError", "ExportError", "GenerationError", "QuantizeError", "__version__"]


def __getattr__(name):
    if name in ("Runtime", "Frame", "Generation", "AudioChunk"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'chattts_ort' has no attribute {name!r}")
