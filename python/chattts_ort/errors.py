"""Exceptions of chattts-ort. Every message names the file (or input) and the problem."""


class ChatTTSOrtError(RuntimeError):
    """Base class of the errors chattts-ort raises on its own."""


class AssetError(ChatTTSOrtError):
    """A ChatTTS asset folder is missing a file, a tensor, or a config key, or a shape does not match."""
