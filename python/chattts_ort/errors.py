"""Exceptions of chattts-ort. Every message names the file (or input) and the problem."""


class ChatTTSOrtError(RuntimeError):
    """Base class of the errors chattts-ort raises on its own."""


class AssetError(ChatTTSOrtError):
    """A ChatTTS asset folder is missing a file, a tensor, or a config key, or a shape does not match."""


class ExportError(ChatTTSOrtError):
    """An export folder that cannot be written, read or trusted (a bad manifest, a missing or altered graph).
    A failed write leaves nothing behind."""


class QuantizeError(ChatTTSOrtError):
    """A plan or an input folder that cannot be quantized (nothing was written)."""


class GenerationError(ChatTTSOrtError):
    """A generation that cannot go on: non-finite values in a block, a cancelled run, a closed Runtime."""
