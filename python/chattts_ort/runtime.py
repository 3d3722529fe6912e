"""The user-facing runtime: `Runtime.load(folder)` then `for frame in rt.stream(text): ...`.

Python builds the prompt and checks the input; the C++ core (`chattts_ort._core.Engine`) runs prefill and
every decode step — embedding, the layer chain with its in-place KV cache, the head and the sample head —
with the GIL released. One Python call per step, none per layer.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ._native import core
from .batching import left_pad
from .errors import ExportError
from .format import block_io, graph_path, iter_graphs, open_export
from .params import InferCodeParams, RefineTextParams, build_prompt_code, build_prompt_refine

SpeakerLike = Union[None, str, np.ndarray, Sequence[float]]


@dataclass
class Frame:
    """One sampled step of one batch row. `codes` holds the four audio codes (text mode: one token id)."""

    step: int
    codes: np.ndarray
    row: int = 0
    hidden: Optional[np.ndarray] = None  # [hidden_size], final hidden state (after the final norm)


@dataclass
class Generation:
    """All frames of a generation, per batch row."""

    codes: list = field(default_factory=list)    # per row: int64 [n_frames, 4] (text mode: [n_tokens])
    hidden: list = field(default_factory=list)   # per row: float32 [n_frames, E] when asked, else None
    stop_reason: str = ""
    steps: int = 0


class Runtime:
    """A loaded export folder, ready to generate. Not for concurrent use from several threads: load one
    Runtime per thread (they share ONNX Runtime's thread pool)."""

    def __init__(self, folder: Path, manifest: dict, engine, tokenizer, device: str, threads: int,
                 max_context: int):
        self.folder = folder
        self.manifest = manifest
        self.config = manifest["config"]
        self.special = manifest.get("special_tokens", {})
        self.device = device
        self.threads = threads
        self.max_context = max_context
        self._engine = engine
        self._tokenizer = tokenizer
        self._busy = threading.Lock()

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, export_dir, device: str = "cpu", threads: Optional[int] = None,
             max_context: Optional[int] = None, max_batch: int = 1, verify: bool = True,
             session_config: Optional[dict] = None) -> "Runtime":
        """Load an export folder written by `chattts-ort export`.

        device: "cpu" or "cuda[:N]" (needs onnxruntime-gpu). threads: intra-op threads (default: all cores;
        fixed by the first Runtime of the process). max_context: KV positions per row allocated up front
        (default min(2048, max_position_embeddings)). max_batch: rows the KV cache is allocated for at load;
        a larger batch later grows it once. verify: check every graph's sha256 against the manifest.
        session_config: extra ONNX Runtime session config entries for every block (expert use), e.g.
        {"session.disable_prepacking": "1"}.
        """
        folder = Path(export_dir)
        manifest = open_export(folder, hashes=verify)
        cfg = manifest["config"]
        entries = list(iter_graphs(manifest))
        if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        threads = int(threads) if threads else (os.cpu_count() or 1)
        if threads < 1:
            raise ValueError("threads must be >= 1")
        if max_context is None:
            max_context = min(2048, int(cfg.get("max_position_embeddings", 2048)))
        if max_context < 2:
            raise ValueError("max_context must be >= 2")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")

        c = core()
        if device.startswith("cuda") and "CUDAExecutionProvider" not in c.available_providers():
            raise RuntimeError(f"device={device!r}: CUDA is not available in this onnxruntime "
                               f"({c.runtime_version()}, providers {list(c.available_providers())}); "
                               "install onnxruntime-gpu on a machine with an NVIDIA GPU")
        g = manifest["graphs"]
        spec = c.EngineSpec()
        spec.embed = str(graph_path(folder, g["embed"]))
        spec.layers = [str(graph_path(folder, e)) for e in g["layers"]]
        spec.head_code = str(graph_path(folder, g["head_code"]))
        spec.head_text = str(graph_path(folder, g["head_text"]))
        spec.sample = str(graph_path(folder, g["sample"]))
        spec.hidden = cfg["hidden_size"]
        spec.heads = cfg["num_heads"]
        spec.head_dim = cfg["hidden_size"] // cfg["num_heads"]
        spec.num_vq = cfg["num_vq"]
        spec.vocab_code = cfg["num_audio_tokens"]
        spec.vocab_text = cfg["num_text_tokens"]
        spec.max_context = int(max_context)
        spec.max_batch = int(max_batch)
        spec.device = device
        spec.threads = threads
        spec.layer_form = manifest.get("layer_form", "portable")
        spec.rope_theta = float(cfg.get("rope_theta", 10000.0))
        spec.kv_fp16 = manifest.get("kv_dtype", "fp32") == "fp16"
        spec.session_config = [(str(k), str(v)) for k, v in (session_config or {}).items()]
        try:
            engine = c.Engine(spec)
        except RuntimeError as e:
            raise ExportError(str(e)) from e
        # The graphs must have the IO names the manifest declares, and those the engine binds.
        form = manifest.get("layer_form", "portable")
        for name, e in entries:
            which, layer = ("layer", int(name[6:])) if name.startswith("layer_") else (name, 0)
            ins, outs = engine.io(which, layer)
            got = ([i[0] for i in ins], [o[0] for o in outs])
            want = ([i["name"] for i in e["inputs"]], [o["name"] for o in e["outputs"]])
            if got != want:
                raise ExportError(f"{folder / e['file']}: graph IO {got} does not match the manifest {want}")
            need_in, need_out = block_io(name, form)
            for side, names, needed in (("input", got[0], need_in), ("output", got[1], need_out)):
                missing = [n for n in needed if n not in names]
                if missing:
                    raise ExportError(f"{folder / e['file']}: block {name} ({form} form) has no {side} "
                                      f"{missing[0]!r}; the graph is not a {form} {name.split('_')[0]} block")
        from .tokenizer import Tokenizer

        tok_path = folder / manifest.get("tokenizer", "tokenizer.json")
        return cls(folder, manifest, engine, Tokenizer(tok_path), device, threads, int(max_context))

    # ------------------------------------------------------------------------------------------------------
    def profile(self, enable: Optional[bool] = None) -> dict:
        """Per-block time of the C++ loop. `profile(True)` starts timing (the cost is a clock read per block);
        `profile()` returns {block: mean ms per step} over the steps since the last call and resets the sums."""
        if enable is not None:
            self._engine.profile(bool(enable))
            self._engine.take_profile()
            return {}
        raw = dict(self._engine.take_profile())
        n = raw.pop("steps", 0)
        return {k: (v / n if n else 0.0) for k, v in raw.items()} | {"steps": int(n)}

    def tokenize(self, prompt: str) -> list:
        ids = self._tokenizer.encode(prompt)
        unk = self.special.get("UNK", 100)
        if unk in ids:
            raise ValueError(f"text has characters the tokenizer does not know (mapped to [UNK]): {prompt!r}")
        return ids

    def _speakers(self, speaker: SpeakerLike, B: int) -> Optional[np.ndarray]:
        """[B, E] float32 of fp16 values, or None."""
        from .speaker import decode_spk_emb

        if speaker is None:
            return None
        E = self.config["hidden_size"]
        if isinstance(speaker, str):
            vec = decode_spk_emb(speaker, dim=E).astype(np.float32)
        else:
            vec = np.asarray(speaker, dtype=np.float32)
        if vec.ndim == 1:
            vec = np.broadcast_to(vec, (B, vec.shape[0]))
        if vec.shape != (B, E):
            raise ValueError(f"speaker must have {E} values (or [{B}, {E}] for a batch), got shape {vec.shape}")
        if not np.isfinite(vec).all():
            raise ValueError("speaker has non-finite values")
        return np.ascontiguousarray(vec.astype(np.float16).astype(np.float32))

    def _texts(self, text) -> list:
        if not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given")
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text must be a str or a list of str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError("text is empty")
        return texts

    def _run(self, prompts: list, *, text_mode: bool, temperature, params, speaker: Optional[np.ndarray],
             noise, return_hidden: bool) -> Iterator[Frame]:
        B = len(prompts)
        T = max(len(p) for p in prompts)
        if T >= self.max_context:
            raise ValueError(f"prompt has {T} tokens; it must be shorter than max_context={self.max_context} "
                             "(pass a larger max_context to Runtime.load)")
        ids, mask = left_pad(prompts)
        k = 1 if text_mode else self.config["num_vq"]
        V = self.config["num_text_tokens"] if text_mode else self.config["num_audio_tokens"]
        eos = self.special.get("Ebreak", 21136) if text_mode else V - 1
        if noise is not None:
            noise = np.ascontiguousarray(noise, dtype=np.float32)
            if noise.ndim != 3 or noise.shape[1:] != (B * k, V):
                raise ValueError(f"noise must be [steps, {B * k}, {V}], got {noise.shape}")
            if noise.shape[0] < params.max_new_token:
                raise ValueError(f"noise covers {noise.shape[0]} steps but max_new_token={params.max_new_token}")
            if not np.isfinite(noise).all() or (noise <= 0).any():
                raise ValueError("noise must be positive and finite (Exp(1) samples)")
        spk = speaker if speaker is not None else np.zeros((B, self.config["hidden_size"]), np.float32)
        seed = params.manual_seed if params.manual_seed is not None else int.from_bytes(os.urandom(8), "little")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Runtime is already generating (finish or close that stream first, "
                               "or load a second Runtime for concurrent work)")
        try:
            self._engine.start(ids, mask, spk, text_mode, np.asarray(temperature, np.float32),
                               float(params.repetition_penalty), float(params.top_P), int(params.top_K),
                               int(params.max_new_token), int(params.min_new_token), int(eos),
                               bool(params.greedy), int(seed) & (2**64 - 1), noise)
            self.last_stop_reason = ""
            while True:
                step, rows, codes, hidden, _ended, done, reason = self._engine.step(return_hidden)
                for j in range(len(rows)):
                    yield Frame(step=int(step), codes=codes[j] if not text_mode else codes[j, 0].copy(),
                                row=int(rows[j]), hidden=None if hidden is None else hidden[j])
                if done:
                    self.last_stop_reason = reason
                    break
        finally:
            self._engine.reset()
            self._busy.release()

    # ------------------------------------------------------------------------------------------------------
    def stream(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
               noise: Optional[np.ndarray] = None) -> Iterator[Frame]:
        """Yield audio-code frames as they are sampled. `text` may be a list (a left-padded batch; each frame
        says its `row`). Breaking out of the loop stops the C++ work at once.

        speaker: a ChatTTS spk_emb string, or [768] / [B, 768] values; default params.spk_emb.
        noise: optional Exp(1) draw noise [max_new_token, B*4, 626]; default: a seeded generator in C++.
        """
        params = params or InferCodeParams()
        params.validate()
        texts = self._texts(text)
        spk_src = speaker if speaker is not None else params.spk_emb
        spk = self._speakers(spk_src, len(texts))
        prompts = [self.tokenize(build_prompt_code(t, spk is not None, params.txt_smp, params.prompt)) for t in texts]
        temps = params.temperature if isinstance(params.temperature, (list, tuple)) else [params.temperature] * self.config["num_vq"]
        return self._run(prompts, text_mode=False, temperature=temps, params=params, speaker=spk, noise=noise,
                         return_hidden=params.return_hidden)

    def stream_tokens(self, prompts, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                      noise: Optional[np.ndarray] = None) -> Iterator[Frame]:
        """Like stream(), for prompts already tokenized: a list of token-id lists (one per batch row), used
        as they are (no template is applied)."""
        params = params or InferCodeParams()
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        V = self.config["num_text_tokens"]
        for p in prompts:
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"token ids must be in [0, {V})")
        spk = self._speakers(speaker if speaker is not None else params.spk_emb, len(prompts))
        temps = params.temperature if isinstance(params.temperature, (list, tuple)) else [params.temperature] * self.config["num_vq"]
        return self._run([list(map(int, p)) for p in prompts], text_mode=False, temperature=temps, params=params,
                         speaker=spk, noise=noise, return_hidden=params.return_hidden)

    def generate(self, text, params: Optional[InferCodeParams] = None, speaker: SpeakerLike = None,
                 noise: Optional[np.ndarray] = None) -> Generation:
        """All frames at once: `codes[row]` is int64 [n_frames, 4]; `hidden[row]` [n_frames, 768] if asked."""
        params = params or InferCodeParams()
        texts = self._texts(text)
        return self._collect(self.stream(texts, params, speaker, noise), len(texts), 4, params.return_hidden)

    def refine_text(self, text, params: Optional[RefineTextParams] = None, noise: Optional[np.ndarray] = None):
        """ChatTTS's text-refinement mode (text head, ends at [Ebreak]). Returns the refined text (a list of
        texts for a list input); the token ids are in `self.last_refine_ids`."""
        params = params or RefineTextParams()
        params.validate()
        texts = self._texts(text)
        prompts = [self.tokenize(build_prompt_refine(t, params.prompt)) for t in texts]
        gen = self._collect(self._run(prompts, text_mode=True, temperature=[params.temperature], params=params,
                                      speaker=None, noise=noise, return_hidden=False), len(texts), 1, False)
        self.last_refine_ids = [c.tolist() for c in gen.codes]
        out = [self._tokenizer.decode(ids) for ids in self.last_refine_ids]
        return out[0] if isinstance(text, str) else out

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
