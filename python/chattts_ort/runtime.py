"""The user-facing runtime: `Runtime.load(folder)` then `for frame in rt.stream(text): ...`.

Python builds the prompt and checks the input; the C++ core runs prefill and every decode step — embedding,
the layer chain with its in-place KV cache, the head and the sample head — with the GIL released: a
`_core.Model` (the loaded blocks, shared) and a `_core.State` (one generation's KV cache and counters). One
Python call per step, none per layer. Speech (`stream_audio`, `synthesize`): each frame's hidden state goes to a
`_core.AudioEngine`, whose own thread runs the Decoder and Vocos graphs chunk by chunk (docs/AUDIO.md).
"""
from __future__ import annotations

import atexit
import logging
import numbers
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ._native import core
from .errors import ExportError, GenerationError
from .format import AUDIO_FLUSH, AUDIO_STEP, audio_unavailable, graph_path, iter_graphs, open_export
from .params import (InferCodeParams, RefineTextParams, build_prompt_code, build_prompt_refine, check_int,
                     strip_tags)

SpeakerLike = Union[None, str, np.ndarray, Sequence[float]]
RefineLike = Union[None, bool, RefineTextParams]
log = logging.getLogger("chattts_ort")


@dataclass
class Frame:
    """One sampled step of one batch row. `codes` holds the four audio codes (text mode: one token id)."""

    step: int
    codes: np.ndarray
    row: int = 0
    hidden: Optional[np.ndarray] = None  # [hidden_size], final hidden state (after the final norm)


@dataclass
class AudioChunk:
    """Samples of one batch row's speech, in order: `samples[i]` is sample `offset + i` of the utterance."""

    samples: np.ndarray   # float32 in [-1, 1] (int16 when asked)
    offset: int
    row: int = 0
    sample_rate: int = 24000


@dataclass
class Generation:
    """All frames of a generation, per batch row."""

    codes: list = field(default_factory=list)    # per row: int64 [n_frames, 4] (text mode: [n_tokens])
    hidden: list = field(default_factory=list)   # per row: float32 [n_frames, E] when asked, else None
    stop_reason: str = ""
    steps: int = 0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads() -> int:
    """More intra-op threads than cores only spin against each other: the cap is 4x the usable CPUs."""
    return 4 * available_cpus()


def available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_busy_fraction(seconds: float = 0.2) -> Optional[float]:
    """Share of all CPU time spent busy over `seconds`, from /proc/stat (None where there is none). Called
    while this process is idle, it measures the others."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return None if t1 == t0 else 1.0 - (i1 - i0) / (t1 - t0)


# Spinning wins on an idle machine and loses under load (bench, 2 cores, int4: idle 9.0 vs 13.2 ms/step; one
# busy process beside it 16.4 vs 11.9, p99 31 vs 18; two, 22.8 vs 14.1): the automatic choice spins only when
# the others keep less than this share of the CPUs busy at load time.
SPIN_BELOW_BUSY = 0.25


# Intra-op threads of the audio path by default. Its steps are short bursts beside the GPT's steady work, and a
# burst on two threads finishes sooner even when the GPT holds both cores (bench/audio.py, 2 cores, int4, exact
# lookahead: RTF 0.525 vs 0.678 and first audio 0.68 vs 0.83 s for 5 s of speech; 0.632 vs 0.752 for 20 s).
AUDIO_THREADS = 2

# How often an async stream (astream_audio) looks for its frames and samples while none come: from POLL_MIN_S,
# doubling up to POLL_MAX_S (a 16-frame chunk is 0.34 s of audio; 20 ms of lateness is inaudible). Polling holds
# no thread, so waiting requests cost the event loop a few microseconds each per poll and nothing else.
POLL_MIN_S = 0.002
POLL_MAX_S = 0.02


# Runtimes that may have a generation in flight, so the interpreter can stop them before it exits.
_LIVE: "weakref.WeakSet[Runtime]" = weakref.WeakSet()


async def _threaded(make, *args, **kwargs):
    """The iterator make(*args, **kwargs), made and stepped in worker threads, as an async iterator: the
    single-generation path of the async calls (each step runs in the consumer's thread there)."""
    import asyncio

    it = await asyncio.to_thread(make, *args, **kwargs)
    done = object()
    try:
        while (item := await asyncio.to_thread(next, it, done)) is not done:
            yield item
    finally:
        await asyncio.to_thread(it.close)


_DEFAULT = object()  # Runtime.normalizer not chosen yet: the default front-end, made on first use


@atexit.register
def _stop_all_at_exit() -> None:
    """A daemon thread may still be streaming when the interpreter exits: end every live generation (a Run in
    flight is cut) and wait briefly for those steps to return, so no thread is inside the core while Python
    finalises."""
    for rt in list(_LIVE):
        rt.close(timeout=5.0)


class Runtime:
    """A loaded export folder, ready to generate. With `max_streams=N` (N > 1, fused form) it serves N concurrent
    audio streams from any threads, batched step by step in the C++ core; with the default 1, one generation at
    a time (a second concurrent one raises). `close()` (or `with Runtime.load(...) as rt`) ends live streams with
    GenerationError in their consumers and frees the model."""

    def __init__(self, folder: Path, manifest: dict, model, state, tokenizer, device: str, threads: int,
                 max_context: int, max_batch: int):
        self.folder = folder
        self.manifest = manifest
        self.config = manifest["config"]
        self.special = manifest.get("special_tokens", {})
        self.device = device
        self.threads = threads
        self.max_context = max_context
        self.max_batch = max_batch
        self.last_stop_reason = ""
        self._model = model
        self._state = state
        self._tokenizer = tokenizer
        self.strict = False                 # text the tokenizer cannot read fully: error (True) or warning
        self._normalizer = _DEFAULT
        self.max_streams = 1
        self._scheduler = None              # the batched loop of concurrent streams (max_streams > 1)
        self._audio = None                  # the audio path's engine (None: codes only, see no_audio_reason)
        self._audio_why = "not loaded"
        self._busy = threading.Lock()      # held by the one live generation
        self._stepping = threading.Lock()  # held while a step runs in the core
        self._closed = False
        _LIVE.add(self)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, export_dir, device: str = "cpu", threads: Optional[int] = None,
             max_context: Optional[int] = None, max_batch: int = 1, verify: bool = True,
             session_config: Optional[dict] = None, max_streams: int = 1, queue_frames: int = 256,
             batch_invariant: bool = False, spin: Optional[bool] = None, audio: Optional[bool] = None,
             audio_threads: Optional[int] = None, strict: bool = False,
             share_weights: bool = True) -> "Runtime":
        """Load an export folder written by `chattts-ort export`.

        device: "cpu" or "cuda[:N]" (needs onnxruntime-gpu). threads: intra-op threads (default: the usable
        cores; at most 4x them; fixed by the first Runtime of the process). max_context: KV positions per row
        allocated up front (default min(2048, max_position_embeddings); at most max_position_embeddings).
        max_batch: rows the KV cache is allocated for at load; a larger batch later grows it (see
        release_memory). verify: check every graph's sha256 against the manifest.
        session_config: extra ONNX Runtime session config entries for every block (expert use), e.g.
        {"session.disable_prepacking": "1"}.
        max_streams: concurrent streams served by one batched decode loop (> 1 needs the fused layer form):
        `stream()` / `generate()` / `astream()` from any number of threads become rows of one step; past
        max_streams, callers wait in a FIFO (`InferCodeParams.queue_timeout`). queue_frames: frames each
        stream may have waiting for its consumer before its row pauses (256 = 5.5 s of audio).
        batch_invariant: with max_streams > 1, run every decode step over at least two rows, so that at int4 a
        stream's codes do not depend on how many others run (ONNX Runtime's 4-bit MatMulNBits takes another
        path for a single row); fp32 and int8 streams are bit-identical either way. Costs one extra row when a
        stream runs alone.
        spin: whether the thread pool spins between the Runs of a step (fastest on an idle machine) or sleeps
        (steadier when other processes want the cores). None: decided at the first load of the process from
        how busy the other processes keep the CPUs (spin below SPIN_BELOW_BUSY). Like threads, fixed by the
        first Runtime of the process; `rt.spinning` says what is in use.
        audio: load the audio path (stream_audio, synthesize). None: when the export has it; True: required
        (ExportError saying why when the export has none); False: codes only (saves its memory, ~2x the
        Decoder and Vocos weights). audio_threads: intra-op threads of the audio path's own sessions, which run
        beside the GPT's pool (default: AUDIO_THREADS, at most the usable cores).
        strict: refuse text with characters the tokenizer cannot read (ValueError) instead of logging a warning
        that names them and going on without them, as ChatTTS does.
        share_weights: False loads from a private copy of the export (in $TMPDIR, deleted once loaded), so
        that no other process can truncate or rewrite the weight files this one maps (a mapped file truncated
        under a live process kills it with SIGBUS; README "Reliability"). Costs the copy's time and its pages,
        which other processes no longer share.
        """
        folder = Path(export_dir)
        if not share_weights:
            import shutil

            from .format import private_copy

            private = private_copy(folder)
            try:
                rt = cls.load(private, device=device, threads=threads, max_context=max_context, max_batch=max_batch,
                              verify=verify, session_config=session_config, max_streams=max_streams,
                              queue_frames=queue_frames, batch_invariant=batch_invariant, spin=spin, audio=audio,
                              audio_threads=audio_threads, strict=strict)
            finally:
                shutil.rmtree(private, ignore_errors=True)
            rt.folder = folder
            return rt
        manifest = open_export(folder, hashes=verify)
        cfg = manifest["config"]
        if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        cap = max_threads()
        if threads is None:
            threads = available_cpus()
        elif isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= cap:
            raise ValueError(f"threads must be an integer in [1, {cap}] (4x the {available_cpus()} CPUs this "
                             f"process may use; more threads than cores only spin), got {threads!r}")
        threads = int(threads)
        positions = int(cfg["max_position_embeddings"])
        if max_context is None:
            max_context = min(2048, positions)
        max_context = check_int("max_context", max_context, 2, positions)
        max_batch = check_int("max_batch", max_batch, 1, 4096)
        max_streams = check_int("max_streams", max_streams, 1, 4096)
        queue_frames = check_int("queue_frames", queue_frames, 1, 1 << 20)
        if max_streams > 1 and manifest.get("layer_form") != "fused":
            raise ValueError("max_streams > 1 needs an export of the fused layer form (export --layer-form fused)")
        if session_config is not None and not (isinstance(session_config, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in session_config.items())):
            raise ValueError("session_config must map strings to strings")

        if spin is not None and not isinstance(spin, (bool, np.bool_)):
            raise ValueError(f"spin must be None, True or False, got {spin!r}")
        if audio is not None and not isinstance(audio, (bool, np.bool_)):
            raise ValueError(f"audio must be None, True or False, got {audio!r}")
        if not isinstance(strict, (bool, np.bool_)):
            raise ValueError(f"strict must be True or False, got {strict!r}")
        if audio_threads is None:
            audio_threads = min(AUDIO_THREADS, available_cpus())
        audio_threads = check_int("audio_threads", audio_threads, 1, cap)
        why = audio_unavailable(manifest)
        if audio and why:
            raise ExportError(f"{folder}: audio=True, but {why}")
        c = core()
        if not c.env_created():
            if spin is None:
                busy = cpu_busy_fraction()
                spin = busy is None or busy < SPIN_BELOW_BUSY
            c.set_spinning(bool(spin))
        if device.startswith("cuda") and "CUDAExecutionProvider" not in c.available_providers():
            raise RuntimeError(f"device={device!r}: CUDA is not available in this onnxruntime "
                               f"({c.runtime_version()}, providers {list(c.available_providers())}); "
                               "install onnxruntime-gpu on a machine with an NVIDIA GPU")
        g = manifest["graphs"]
        spec = c.ModelSpec()
        spec.embed = str(graph_path(folder, g["embed"]))
        spec.layers = [str(graph_path(folder, e)) for e in g["layers"]]
        spec.num_layers = cfg["num_layers"]
        spec.layers_per_graph = manifest.get("layers_per_graph", 1)
        spec.head_code = str(graph_path(folder, g["head_code"]))
        spec.head_text = str(graph_path(folder, g["head_text"]))
        spec.sample = str(graph_path(folder, g["sample"]))
        spec.hidden = cfg["hidden_size"]
        spec.heads = cfg["num_heads"]
        spec.head_dim = cfg["hidden_size"] // cfg["num_heads"]
        spec.num_vq = cfg["num_vq"]
        spec.vocab_code = cfg["num_audio_tokens"]
        spec.vocab_text = cfg["num_text_tokens"]
        spec.max_context = max_context
        spec.device = device
        spec.threads = threads
        spec.layer_form = manifest.get("layer_form", "portable")
        spec.rope_theta = float(cfg["rope_theta"])
        spec.kv_fp16 = manifest.get("kv_dtype", "fp32") == "fp16"
        spec.session_config = list((session_config or {}).items())
        try:
            model = c.Model(spec)
        except RuntimeError as e:
            raise ExportError(str(e)) from e
        # The graphs must have the IO names the manifest declares (the core checked those it binds).
        for name, e in iter_graphs(manifest):
            ins, outs = model.io(name)
            got = ([i[0] for i in ins], [o[0] for o in outs])
            want = ([i["name"] for i in e["inputs"]], [o["name"] for o in e["outputs"]])
            if got != want:
                raise ExportError(f"{folder / e['file']}: graph IO {got} does not match the manifest {want}")
        engine = None
        if audio is not False and not why:
            engine = _load_audio(c, folder, manifest, device, threads, audio_threads, session_config)
        elif why is None:
            why = "this Runtime was loaded with audio=False"
        _check_kv_memory(model, max_batch + (max_streams if max_streams > 1 else 0), max_context)
        state = c.State(model, max_batch)
        scheduler = None
        if max_streams > 1:
            try:
                scheduler = c.Scheduler(model, max_streams, queue_frames, bool(batch_invariant))
            except RuntimeError as e:
                raise ExportError(str(e)) from e
        from .tokenizer import Tokenizer

        tok = Tokenizer(folder / manifest.get("tokenizer", "tokenizer.json"))
        rt = cls(folder, manifest, model, state, tok, device, threads, max_context, max_batch)
        rt.max_streams = max_streams
        rt.strict = bool(strict)
        rt._scheduler = scheduler
        rt._audio, rt._audio_why = engine, why
        rt.spinning = bool(c.spinning())
        return rt

    # ------------------------------------------------------------------------------------------------------
    def close(self, timeout: Optional[float] = None) -> None:
        """End a live generation (its consumer gets GenerationError at its next frame) and let the model go.
        Waits up to `timeout` seconds (None: until it returns) for a step running in another thread. The
        memory is freed when the last live stream has ended. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._state.close()  # cuts a Run in flight; later steps raise
        if self._scheduler is not None:
            self._scheduler.close()  # every live stream ends with an error in its consumer
        if self._stepping.acquire(timeout=-1 if timeout is None else timeout):
            self._stepping.release()
        if self._audio is not None:
            self._audio.close()
        self._state = self._model = self._scheduler = self._audio = None
        _LIVE.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise GenerationError("this Runtime is closed")

    def release_memory(self) -> None:
        """Free the KV rows a batch larger than max_batch grew (they are otherwise kept for the next one)."""
        self._require_open()
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("release_memory: a generation is in progress")
        try:
            self._state.release_memory()
        finally:
            self._busy.release()

    def profile(self, enable: Optional[bool] = None) -> dict:
        """Per-block time of the C++ loop. `profile(True)` starts timing (the cost is a clock read per block);
        `profile()` returns {block: mean ms per step} over the steps since the last call and resets the sums."""
        self._require_open()
        if enable is not None:
            self._state.profile(bool(enable))
            self._state.take_profile()
            return {}
        raw = dict(self._state.take_profile())
        n = raw.pop("steps", 0)
        return {k: (v / n if n else 0.0) for k, v in raw.items()} | {"steps": int(n)}

    def tokenize(self, prompt: str) -> list:
        """Token ids of a prompt. Pieces the tokenizer cannot read become [UNK]: with `strict` a ValueError,
        else a warning that names them (ChatTTS goes on with [UNK] too)."""
        ids, unknown = self._tokenizer.encode_checked(prompt)
        if unknown:
            what = ", ".join(repr(u) for u in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            if self.strict:
                raise ValueError(f"text has characters the tokenizer does not know (mapped to [UNK]): {what}")
            log.warning("the tokenizer does not know %s (read as [UNK])", what)
        return ids

    # ------------------------------------------------------------------------------------------------------
    # Text, as ChatTTS's infer() takes it before the codes: the front-end, then optionally the refinement.

    @property
    def normalizer(self):
        """The text front-end every call applies (chattts_ort.Normalizer: ChatTTS's, with the number
        normalizers that are installed registered). Assign another one, or None to feed texts as they are."""
        if self._normalizer is _DEFAULT:
            from .frontend import default_normalizer

            self._normalizer = default_normalizer()
        return self._normalizer

    @normalizer.setter
    def normalizer(self, value) -> None:
        if value is not None and not callable(value):
            raise TypeError("normalizer must be a callable (text, ...) -> str, or None")
        self._normalizer = value

    def prepare_text(self, text, normalize: bool = True, lang: Optional[str] = None,
                     refine: RefineLike = None) -> list:
        """The texts the code prompts are made of, as ChatTTS's infer() makes them: each text through the
        front-end (`normalizer`; skipped with normalize=False), then, with `refine` (True or RefineTextParams),
        through the GPT's text mode (refine_text)."""
        texts = self._texts(text)
        if lang not in (None, "zh", "en"):
            raise ValueError(f"lang must be None, 'zh' or 'en', got {lang!r}")
        if normalize and self.normalizer is not None:
            texts = [self.normalizer(t, lang=lang) for t in texts]
        for t in texts:
            if not self._tokenizer.encode(strip_tags(t)):
                raise ValueError(f"text {t[:40]!r} is empty after normalisation (nothing the tokenizer reads)")
        if refine:
            params = refine if isinstance(refine, RefineTextParams) else RefineTextParams()
            texts = self.refine_text(texts, params=params, normalize=False)
        return texts

    def _speakers(self, speaker: SpeakerLike, B: int) -> Optional[np.ndarray]:
        """[B, E] float32 of fp16 values, or None."""
        from .speaker import check_speaker_fp16, decode_spk_emb

        if speaker is None:
            return None
        E = self.config["hidden_size"]
        if isinstance(speaker, str):
            vec = decode_spk_emb(speaker, dim=E).astype(np.float32)
        else:
            try:
                vec = np.asarray(speaker, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"speaker must be a spk_emb string or {E} numbers: {e}") from None
        if vec.ndim == 1:
            vec = np.broadcast_to(vec, (B, vec.shape[0]))
        if vec.shape != (B, E):
            raise ValueError(f"speaker must have {E} values (or [{B}, {E}] for a batch), got shape {vec.shape}")
        if not np.isfinite(vec).all():
            raise ValueError("speaker has non-finite values")
        check_speaker_fp16(vec)
        return np.ascontiguousarray(vec.astype(np.float16).astype(np.float32))

    def _texts(self, text) -> list:
        if not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given")
        if len(texts) > 4096:
            raise ValueError(f"a batch of {len(texts)} texts; at most 4096")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text must be a str or a list of str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError("text is empty")
        return texts

    def _run(self, prompts: list, *, text_mode: bool, temperature, params, speaker: Optional[np.ndarray],
             noise, return_hidden: bool) -> Iterator[Frame]:
        g, noise, by_rows = self._plan(prompts, text_mode=text_mode, temperature=temperature, params=params,
                                       speaker=speaker, noise=noise, return_hidden=return_hidden)
        if by_rows:
            return self._stream_rows(prompts, g, noise, params)
        return self._frames(g, text_mode)

    def _plan(self, prompts: list, *, text_mode: bool, temperature, params, speaker: Optional[np.ndarray],
              noise, return_hidden: bool):
        """(the core's GenerationSpec, the checked noise, whether the rows go to the scheduler) of a request."""
        self._require_open()
        B = len(prompts)
        T = max(len(p) for p in prompts)
        if T >= self.max_context:
            raise ValueError(f"prompt has {T} tokens; it must be shorter than max_context={self.max_context} "
                             "(pass a larger max_context to Runtime.load)")
        by_rows = self._scheduler is not None and not text_mode  # one scheduler stream per row
        if not by_rows and B > self._state.kv_rows:
            _check_kv_memory(self._model, B, self.max_context, have_rows=self._state.kv_rows)
        k = 1 if text_mode else self.config["num_vq"]
        V = self.config["num_text_tokens"] if text_mode else self.config["num_audio_tokens"]
        eos = self.special.get("Ebreak", 21136) if text_mode else V - 1
        g = core().GenerationSpec()
        if noise is not None:
            noise = np.ascontiguousarray(noise, dtype=np.float32)
            if noise.ndim != 3 or noise.shape[1:] != (B * k, V):
                raise ValueError(f"noise must be [steps, {B * k}, {V}], got {noise.shape}")
            if noise.shape[0] < params.max_new_token:
                raise ValueError(f"noise covers {noise.shape[0]} steps but max_new_token={params.max_new_token}")
            if not np.isfinite(noise).all() or (noise <= 0).any():
                raise ValueError("noise must be positive and finite (Exp(1) samples)")
            g.noise = noise
        g.text_mode = text_mode
        g.prompt_ids = [int(i) for p in prompts for i in p]
        g.prompt_lens = [len(p) for p in prompts]
        if speaker is not None:
            g.speaker = speaker.reshape(-1)
        g.temperature = [float(t) for t in temperature]
        g.repetition_penalty = float(params.repetition_penalty)
        g.top_p = float(params.top_P)
        g.top_k = int(params.top_K)
        g.max_new_token = int(params.max_new_token)
        g.min_new_token = int(params.min_new_token)
        g.eos_id = int(eos)
        g.greedy = bool(params.greedy)
        g.return_hidden = bool(return_hidden)
        g.seed = int(params.manual_seed) if params.manual_seed is not None else int.from_bytes(os.urandom(8), "little")
        return g, noise, by_rows

    def _submit_rows(self, prompts: list, g, noise, params) -> list:
        """One scheduler stream per prompt row, with the row's share of the noise; returns their ids."""
        c = core()
        k = self.config["num_vq"]
        ids = []
        try:
            for b, p in enumerate(prompts):
                s = c.StreamSpec()
                s.prompt_ids = [int(i) for i in p]
                if g.speaker.size:
                    E = self.config["hidden_size"]
                    s.speaker = np.asarray(g.speaker).reshape(len(prompts), E)[b]
                s.temperature = list(g.temperature)
                s.repetition_penalty, s.top_p, s.top_k = g.repetition_penalty, g.top_p, g.top_k
                s.max_new_token, s.min_new_token = g.max_new_token, g.min_new_token
                s.greedy, s.return_hidden = g.greedy, g.return_hidden
                s.seed = (g.seed + b) & (2**64 - 1)  # each row its own generator
                timeout = getattr(params, "queue_timeout", None)
                s.queue_timeout_s = -1.0 if timeout is None else float(timeout)
                if noise is not None:
                    s.noise = np.ascontiguousarray(noise[:, b * k:(b + 1) * k])
                ids.append(self._scheduler.submit(s))
        except BaseException:
            for i in ids:
                self._scheduler.cancel(i)
            raise
        return ids

    def _stream_rows(self, prompts: list, g, noise, params) -> Iterator[Frame]:
        scheduler = self._scheduler
        ids = self._submit_rows(prompts, g, noise, params)
        try:
            live = dict(enumerate(ids))
            while live:
                yield from self._pull_rows(scheduler, live, wait_ms=50)
        finally:
            for sid in ids:
                scheduler.cancel(sid)  # a no-op for streams that ended; frees the row of one that did not

    def _pull_rows(self, scheduler, live: dict, wait_ms: int) -> list:
        """The frames the scheduler has for the streams of `live` (row -> stream id; ended ones are removed).
        Blocks (up to wait_ms, GIL released) only on the first stream, and only when nothing came before it."""
        out = []
        for row, sid in list(live.items()):
            p = scheduler.pull(sid, 0 if out or row != min(live) else wait_ms)
            if p.count:
                codes, hidden, steps = p.codes, p.hidden, p.steps
                out += [Frame(step=int(steps[j]), codes=codes[j], row=row,
                              hidden=None if hidden is None else hidden[j]) for j in range(p.count)]
            if p.done:
                del live[row]
                if p.error:
                    raise GenerationError(p.error)
                self.last_stop_reason = p.stop_reason
        return out

    def _frames(self, g, text_mode: bool) -> Iterator[Frame]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Runtime is already generating (finish or close that stream first, "
                               "or load a second Runtime for concurrent work)")
        state = self._state
        try:
            self._require_open()
            state.start(g)
            self.last_stop_reason = ""
            while True:
                try:
                    with self._stepping:
                        r = state.step()
                except RuntimeError as e:
                    if self._closed:
                        raise GenerationError("this Runtime was closed while generating") from None
                    raise GenerationError(str(e)) from e
                ids, hidden = r.ids, r.hidden
                for j, row in enumerate(r.rows.tolist()):
                    yield Frame(step=r.step, codes=ids[j] if not text_mode else ids[j, 0].copy(), row=row,
                                hidden=None if hidden is None else hidden[j])
                if r.done:
                    self.last_stop_reason = r.stop_reason
                    break
        finally:
            state.reset()
            self._busy.release()

    # ------------------------------------------------------------------------------------------------------
    def stream(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
               noise: Optional[np.ndarray] = None, *, normalize: bool = True, lang: Optional[str] = None,
               refine: RefineLike = None) -> Iterator[Frame]:
        """Yield audio-code frames as they are sampled. `text` may be a list (a left-padded batch; each frame
        says its `row`). Breaking out of the loop stops the C++ work at once.

        speaker: a ChatTTS spk_emb string, or [768] / [B, 768] values; default params.spk_emb.
        noise: optional Exp(1) draw noise [max_new_token, B*4, 626]; default: a seeded generator in C++.
        normalize, lang, refine: the text before the codes (prepare_text): ChatTTS's front-end (on by default,
        as in ChatTTS's infer), its language ("zh", "en"; None: detected), and the refinement (off by default).
        """
        params = params or InferCodeParams()
        params.validate()
        texts = self.prepare_text(text, normalize, lang, refine)
        prompts, temps, spk = self._code_prompts(texts, params, speaker)
        return self._run(prompts, text_mode=False, temperature=temps, params=params, speaker=spk, noise=noise,
                         return_hidden=params.return_hidden)

    def _code_prompts(self, texts: list, params: InferCodeParams, speaker: SpeakerLike):
        """(token ids of each text's code prompt, the per-codebook temperatures, the speaker rows or None)."""
        spk_src = speaker if speaker is not None else params.spk_emb
        spk = self._speakers(spk_src, len(texts))
        prompts = [self.tokenize(build_prompt_code(t, spk is not None, params.txt_smp, params.prompt)) for t in texts]
        temps = (params.temperature if isinstance(params.temperature, (list, tuple))
                 else [params.temperature] * self.config["num_vq"])
        return prompts, temps, spk

    def stream_tokens(self, prompts, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                      noise: Optional[np.ndarray] = None) -> Iterator[Frame]:
        """Like stream(), for prompts already tokenized: a list of token-id lists (one per batch row), used
        as they are (no template is applied)."""
        params = params or InferCodeParams()
        params.validate()
        if not isinstance(prompts, (list, tuple)) or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        V = self.config["num_text_tokens"]
        for p in prompts:
            a = np.asarray(p)
            if a.ndim != 1 or a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= V:
                raise ValueError(f"token ids must be integers in [0, {V})")
        spk = self._speakers(speaker if speaker is not None else params.spk_emb, len(prompts))
        temps = params.temperature if isinstance(params.temperature, (list, tuple)) else [params.temperature] * self.config["num_vq"]
        return self._run([list(map(int, p)) for p in prompts], text_mode=False, temperature=temps, params=params,
                         speaker=spk, noise=noise, return_hidden=params.return_hidden)

    async def astream(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                      noise: Optional[np.ndarray] = None, **text_options):
        """stream() as an async iterator, for servers. `async for frame in rt.astream("Hello."): ...` With
        max_streams > 1 no thread is held while it waits (see astream_audio); with one stream, each step runs in a
        worker thread, so the event loop stays free."""
        import asyncio

        if self._scheduler is None:
            async for frame in _threaded(self.stream, text, params, speaker, noise, **text_options):
                yield frame
            return
        scheduler, rows = await self._asubmit(text, params or InferCodeParams(), speaker, noise, text_options)
        try:
            live, wait = dict(enumerate(rows)), POLL_MIN_S
            while live:
                frames = self._pull_rows(scheduler, live, wait_ms=0)
                for f in frames:
                    yield f
                wait = POLL_MIN_S if frames else min(2 * wait, POLL_MAX_S)
                await asyncio.sleep(0 if frames else wait)
        finally:
            for sid in rows:
                scheduler.cancel(sid)

    def generate(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                 noise: Optional[np.ndarray] = None, **text_options) -> Generation:
        """All frames at once: `codes[row]` is int64 [n_frames, 4]; `hidden[row]` [n_frames, 768] if asked.
        text_options: normalize, lang, refine as in stream()."""
        params = params or InferCodeParams()
        texts = self.prepare_text(text, **text_options)
        return self._collect(self.stream(texts, params, speaker, noise, normalize=False), len(texts), 4,
                             params.return_hidden)

    def refine_text(self, text, params: Optional[RefineTextParams] = None, noise: Optional[np.ndarray] = None,
                    *, normalize: bool = True, lang: Optional[str] = None):
        """ChatTTS's text-refinement mode (text head, ends at [Ebreak]), as `infer(refine_text_only=True)`: the
        front-end first (normalize, lang as in stream()), and of the generated ids those below [break_0] kept
        (ChatTTS drops [break_N], [laugh_N], [oral_N], [speed_N]). Returns the refined text (a list of texts for a
        list input); the generated ids, unfiltered, are in `self.last_refine_ids`."""
        params = params or RefineTextParams()
        params.validate()
        texts = self.prepare_text(text, normalize, lang)
        prompts = [self.tokenize(build_prompt_refine(t, params.prompt)) for t in texts]
        gen = self._collect(self._run(prompts, text_mode=True, temperature=[params.temperature], params=params,
                                      speaker=None, noise=noise, return_hidden=False), len(texts), 1, False)
        self.last_refine_ids = [c.tolist() for c in gen.codes]
        below = self.special.get("break_0", 21147)
        out = [self._tokenizer.decode([i for i in ids if i < below]) for ids in self.last_refine_ids]
        return out[0] if isinstance(text, str) else out

    # ------------------------------------------------------------------------------------------------------
    # Speech.

    @property
    def has_audio(self) -> bool:
        return self._audio is not None

    @property
    def no_audio_reason(self) -> Optional[str]:
        """Why this Runtime cannot speak (None when it can)."""
        return None if self._audio is not None else self._audio_why

    @property
    def sample_rate(self) -> int:
        return int(self.manifest.get("audio", {}).get("sample_rate", 24000))

    @property
    def exact_lookahead(self) -> int:
        """GPT frames past a sample's own that decide it (52 for ChatTTS): stream_audio's default lookahead."""
        return int(self.manifest.get("audio", {}).get("exact_lookahead", 0))

    def _require_audio(self):
        self._require_open()
        if self._audio is None:
            raise GenerationError(f"no audio path: {self._audio_why}")
        return self._audio

    def stream_audio(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                     lookahead: Optional[int] = None, chunk_frames: int = 16, dtype: str = "float32",
                     noise: Optional[np.ndarray] = None, **text_options) -> Iterator[AudioChunk]:
        """Yield speech as the GPT samples it: AudioChunks of 24 kHz samples (float32, or int16 with
        dtype="int16"), in order per row, each with the index of its first sample. Breaking out of the loop stops
        the GPT and the audio work.

        lookahead: GPT frames the audio waits for past a sample's own frame. The default, `exact_lookahead` (52),
        makes the stream equal the whole-utterance decode to float rounding (first audio after 53 frames);
        fewer frames start sooner and differ slightly where each chunk ends (docs/AUDIO.md has the measured
        error and the extra work). chunk_frames: frames per audio step (more: less work per frame, later
        chunks; 1..64). Other arguments (text_options: normalize, lang, refine) as stream().
        """
        engine = self._require_audio()
        L, chunk = self._audio_options(lookahead, chunk_frames, dtype)
        import dataclasses

        params = dataclasses.replace(params or InferCodeParams(), return_hidden=True)
        texts = self.prepare_text(text, **text_options)
        B = len(texts)
        frames = self.stream(texts, params, speaker, noise, normalize=False)
        return self._audio_chunks(engine, frames, B, L, chunk, dtype)

    async def _asubmit(self, text, params: InferCodeParams, speaker, noise, text_options: dict):
        """The rows of an async request queued in the scheduler at once (the front-end in a worker thread):
        (the scheduler, the stream ids). The scheduler is returned because close() drops the attribute while
        the core object goes on answering, with errors."""
        import asyncio

        params.validate()
        texts = await asyncio.to_thread(self.prepare_text, text, **text_options)
        prompts, temps, spk = self._code_prompts(texts, params, speaker)
        g, noise, _ = self._plan(prompts, text_mode=False, temperature=temps, params=params, speaker=spk,
                                 noise=noise, return_hidden=params.return_hidden)
        return self._scheduler, self._submit_rows(prompts, g, noise, params)

    def _audio_options(self, lookahead, chunk_frames, dtype):
        exact = self.exact_lookahead
        L = exact if lookahead is None else check_int("lookahead", lookahead, 0, exact)
        chunk = check_int("chunk_frames", chunk_frames, 1, 64)
        if dtype not in ("float32", "int16"):
            raise ValueError(f"dtype must be 'float32' or 'int16', got {dtype!r}")
        return L, chunk

    def _engine_call(self, fn, *a):
        try:
            return fn(*a)
        except RuntimeError as e:  # the engine closed under us (Runtime.close) or refused
            if self._closed:
                raise GenerationError("this Runtime was closed while speaking") from None
            raise GenerationError(f"audio: {e}") from e

    def _audio_chunk(self, samples, first, row: int, dtype: str) -> AudioChunk:
        if dtype == "int16":
            samples = np.clip(np.rint(samples * 32767.0), -32768, 32767).astype(np.int16)
        return AudioChunk(samples, int(first), row, self.sample_rate)

    async def astream_audio(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                            lookahead: Optional[int] = None, chunk_frames: int = 16, dtype: str = "float32",
                            noise: Optional[np.ndarray] = None, **text_options):
        """stream_audio() as an async iterator, for servers. With max_streams > 1 nothing holds a thread while it
        waits: the request is queued for a row at once (its queue_timeout counts from this call), and the
        scheduler's frames and the audio engine's samples are polled from the event loop between short sleeps
        (POLL_MIN_S, doubling to POLL_MAX_S while nothing comes), so a thousand waiting requests cost no
        threads and delay no live stream. The text front-end (and a refinement) run in a worker thread.
        Cancelling the iteration (a client that left) frees the request's row or its place in the queue."""
        import asyncio
        import dataclasses

        if self._scheduler is None:  # one generation at a time, stepped in the consumer's thread
            async for ch in _threaded(self.stream_audio, text, params, speaker, lookahead, chunk_frames, dtype,
                                      noise, **text_options):
                yield ch
            return
        engine = self._require_audio()
        L, chunk = self._audio_options(lookahead, chunk_frames, dtype)
        params = dataclasses.replace(params or InferCodeParams(), return_hidden=True)
        scheduler, rows = await self._asubmit(text, params, speaker, noise, text_options)
        call = self._engine_call
        voices = []
        try:
            for _ in rows:
                voices.append(call(engine.open, L, chunk))
            gpt, audio = dict(enumerate(rows)), dict(enumerate(voices))
            wait = POLL_MIN_S
            while audio:
                came = False
                before = set(gpt)
                for f in self._pull_rows(scheduler, gpt, wait_ms=0):
                    came = True
                    call(engine.push, voices[f.row], f.hidden[None])
                for row in before - set(gpt):
                    call(engine.finish, voices[row])
                for row, aid in list(audio.items()):
                    samples, first, finished, error = call(engine.pull, aid, 0)
                    if error:
                        raise GenerationError(f"audio: {error}")
                    if samples.size:
                        came = True
                        yield self._audio_chunk(samples, first, row, dtype)
                    if finished:
                        del audio[row]
                wait = POLL_MIN_S if came else min(2 * wait, POLL_MAX_S)
                await asyncio.sleep(0 if came else wait)
        finally:
            for sid in rows:
                scheduler.cancel(sid)  # a no-op for streams that ended
            for aid in voices:
                engine.cancel(aid)

    def _audio_chunks(self, engine, frames, B: int, lookahead: int, chunk: int, dtype: str) -> Iterator[AudioChunk]:
        ids = []
        live = {}
        call = self._engine_call

        def drain(wait_ms: int):
            for row, sid in list(live.items()):
                samples, first, done, error = call(engine.pull, sid, wait_ms)
                if error:
                    raise GenerationError(f"audio: {error}")
                if samples.size:
                    yield self._audio_chunk(samples, first, row, dtype)
                if done:
                    del live[row]

        try:
            for row in range(B):
                ids.append(call(engine.open, lookahead, chunk))
                live[row] = ids[-1]
            pushed = [0] * B
            heard = set()
            for f in frames:
                call(engine.push, ids[f.row], f.hidden[None])
                pushed[f.row] += 1
                for ch in drain(0):
                    heard.add(ch.row)
                    yield ch
                if pushed[f.row] == lookahead + 1 and f.row not in heard and f.row in live:
                    # The first audio is due: let the audio thread have the cores for it before the next GPT
                    # step (the GPT runs ahead of real time anyway; this costs it one pause per stream).
                    deadline = time.perf_counter() + 2.0
                    while f.row in live and f.row not in heard and time.perf_counter() < deadline:
                        for ch in drain(20):
                            heard.add(ch.row)
                            yield ch
            for sid in ids:
                call(engine.finish, sid)
            while live:
                yield from drain(50)
        finally:
            frames.close()
            for sid in ids:
                engine.cancel(sid)

    def synthesize(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                   lookahead: Optional[int] = None, dtype: str = "float32", noise: Optional[np.ndarray] = None,
                   **text_options):
        """The whole utterance: (samples, sample_rate); for a list of texts, (list of sample arrays, rate).
        Samples are the vocoder's raw output (ChatTTS's infer() also deletes every sample with |x| <= 1e-5).
        text_options: normalize, lang, refine as in stream()."""
        texts = self.prepare_text(text, **text_options)
        parts = [[] for _ in texts]
        for ch in self.stream_audio(texts, params, speaker, lookahead, chunk_frames=64, dtype=dtype, noise=noise,
                                    normalize=False):
            parts[ch.row].append(ch.samples)
        out = [np.concatenate(p) if p else np.zeros(0, np.int16 if dtype == "int16" else np.float32) for p in parts]
        return (out[0] if isinstance(text, str) else out), self.sample_rate

    def audio_stats(self) -> dict:
        """Counters of the audio path since load: steps, flushes, frames, samples, and ms spent in each graph."""
        return dict(self._require_audio().stats())

    def _collect(self, frames, B: int, k: int, with_hidden: bool) -> Generation:
        codes = [[] for _ in range(B)]
        hidden = [[] for _ in range(B)]
        steps = 0
        for f in frames:
            codes[f.row].append(f.codes)
            if with_hidden:
                hidden[f.row].append(f.hidden)
            steps = f.step + 1
        shape = (0, k) if k > 1 else (0,)
        gen = Generation(stop_reason=getattr(self, "last_stop_reason", ""), steps=steps)
        for b in range(B):
            gen.codes.append(np.asarray(codes[b], np.int64) if codes[b] else np.zeros(shape, np.int64))
            gen.hidden.append(np.asarray(hidden[b], np.float32) if with_hidden and hidden[b] else None)
        return gen


def _load_audio(c, folder: Path, manifest: dict, device: str, threads: int, audio_threads: int, session_config):
    """The audio engine over the export's streaming graphs, checked against the manifest."""
    a = manifest["audio"]
    spec = c.AudioSpec()
    spec.step = str(graph_path(folder, a["graphs"][AUDIO_STEP]))
    spec.flush = str(graph_path(folder, a["graphs"][AUDIO_FLUSH]))
    spec.hidden = int(manifest["config"]["hidden_size"])
    spec.state_size = int(a["state_size"])
    spec.flush_samples = int(a["flush_samples"])
    spec.samples_per_frame = int(a["samples_per_frame"])
    spec.hop = int(a["hop"])
    spec.exact_lookahead = int(a["exact_lookahead"])
    spec.sample_rate = int(a["sample_rate"])
    spec.device = device
    spec.threads = threads
    spec.own_threads = audio_threads
    spec.session_config = list((session_config or {}).items())
    try:
        engine = c.AudioEngine(spec)
    except RuntimeError as e:
        raise ExportError(f"audio path: {e}") from e
    for name in (AUDIO_STEP, AUDIO_FLUSH):
        e = a["graphs"][name]
        ins, outs = engine.io(name)
        got = ([i[0] for i in ins], [o[0] for o in outs])
        want = ([i["name"] for i in e["inputs"]], [o["name"] for o in e["outputs"]])
        if got != want:
            engine.close()
            raise ExportError(f"{folder / e['file']}: graph IO {got} does not match the manifest {want}")
    return engine


def _check_kv_memory(model, rows: int, max_context: int, have_rows: int = 0) -> None:
    """Refuse a KV cache that cannot fit in the memory available now, before allocating any of it."""
    need = model.kv_bytes_per_row(max_context) * (rows - have_rows)
    avail = available_memory()
    if avail is not None and need > 0.9 * avail:
        raise ValueError(f"{rows} rows x {max_context} positions need {need / 1e9:.2f} GB more of KV cache, but "
                         f"only {avail / 1e9:.2f} GB of memory is available: use a smaller batch or max_context")
