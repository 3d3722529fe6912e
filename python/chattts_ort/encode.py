"""Streaming audio encoders for the server: samples in, bytes out as they are ready.

pcm and wav are written here (raw little-endian int16; a WAV header with open-ended sizes, as streaming servers
send it, then the same bytes). The compressed formats go through PyAV (FFmpeg's encoders in a wheel, no system
ffmpeg): flac, mp3 (libmp3lame), opus (in Ogg), aac (in ADTS).
"""
from __future__ import annotations

import io
import struct
from typing import Optional

import numpy as np

FORMATS = ("pcm", "wav", "mp3", "opus", "flac", "aac")
MEDIA_TYPES = {"pcm": "audio/pcm", "wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "flac": "audio/flac", "aac": "audio/aac"}
# format -> (container, codec, sample format the codec takes)
_AV = {"mp3": ("mp3", "libmp3lame", "s16p"), "opus": ("ogg", "libopus", "s16"), "flac": ("flac", "flac", "s16"),
       "aac": ("adts", "aac", "fltp")}


def to_int16(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.int16:
        return samples
    return np.clip(np.rint(np.asarray(samples, np.float32) * 32767.0), -32768, 32767).astype(np.int16)


def wav_header(rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A RIFF/WAVE header whose sizes say 'unknown' (0xFFFFFFFF): the data runs to the end of the stream."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits) +
            b"data" + struct.pack("<I", 0xFFFFFFFF))


class _Sink(io.RawIOBase):
    """A write-only file for PyAV's muxer: keeps what it is given until taken."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class Encoder:
    """encoder.add(samples) -> bytes ready now; encoder.close() -> the rest."""

    def __init__(self, fmt: str, rate: int = 24000):
        if fmt not in FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt, self.rate = fmt, rate
        self._started = False
        self._av = None
        if fmt in _AV:
            self._open_av()

    def _open_av(self):
        try:
            import av
        except ImportError as e:
            raise RuntimeError(f"response_format {self.fmt!r} needs PyAV (pip install av): {e}") from None
        container, codec, sample_fmt = _AV[self.fmt]
        self._sink = _Sink()
        self._out = av.open(self._sink, mode="w", format=container)
        rate = 48000 if self.fmt == "opus" else self.rate  # Opus runs at 48 kHz; PyAV resamples
        self._stream = self._out.add_stream(codec, rate=rate, layout="mono")
        if self.fmt == "mp3":
            self._stream.bit_rate = 64000
        self._resampler = av.AudioResampler(format=sample_fmt, layout="mono", rate=rate)
        self._av = av
        self._pts = 0

    def add(self, samples: np.ndarray) -> bytes:
        pcm = to_int16(samples)
        if self.fmt == "pcm":
            return pcm.tobytes()
        if self.fmt == "wav":
            head = b"" if self._started else wav_header(self.rate)
            self._started = True
            return head + pcm.tobytes()
        frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += pcm.size
        for f in self._resampler.resample(frame):
            for packet in self._stream.encode(f):
                self._out.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        if self._av is None:
            return b"" if self._started or self.fmt == "pcm" else wav_header(self.rate)
        for f in self._resampler.resample(None):
            for packet in self._stream.encode(f):
                self._out.mux(packet)
        for packet in self._stream.encode(None):
            self._out.mux(packet)
        self._out.close()
        self._av = None
        return self._sink.take()


def encode_all(samples: np.ndarray, fmt: str, rate: int = 24000, chunk: Optional[int] = None) -> bytes:
    """The whole of `samples` encoded (in pieces of `chunk` samples, as a stream would be)."""
    enc = Encoder(fmt, rate)
    step = chunk or max(1, samples.size)
    out = b"".join(enc.add(samples[i:i + step]) for i in range(0, samples.size, step))
    return out + enc.close()
