"""The decode loop over the exported graphs with onnxruntime's Python API.

A test aid and a benchmark peer, not the product: it shows that the chained graphs reproduce the PyTorch
reference loop, and what the C++ core buys over Python. It mirrors csrc/engine.cpp step for step; the KV
cache is grown by concatenation here, which the C++ core avoids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batching import left_pad, prefill_positions
from ..format import fused_kv_names, manifest_layer_groups, read_manifest


@dataclass
class LoopResult:
    frames: list = field(default_factory=list)     # per row: list of id tuples
    hidden: list = field(default_factory=list)     # per row: list of [E] arrays
    end_step: list = field(default_factory=list)   # per row: step of EOS, or None
    noise: list = field(default_factory=list)      # per step: the [N, V] noise used
    logits: list = field(default_factory=list)     # per step: raw logits [N, V] (record_logits=True)
    steps: int = 0


class OrtLoop:
    def __init__(self, folder, threads: int = 1, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # 23 sessions each with its own pool: spinning workers of one session would steal the cores of the
        # next. (The C++ core shares one global pool instead.)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        g = self.manifest["graphs"]

        def sess(entry):
            return ort.InferenceSession(str(self.folder / entry["file"]), so, providers=list(providers))

        self.embed = sess(g["embed"])
        self.layers = [sess(e) for e in g["layers"]]
        self.head_code = sess(g["head_code"])
        self.head_text = sess(g["head_text"])
        self.sample = sess(g["sample"])
        c = self.manifest["config"]
        self.E, self.H = c["hidden_size"], c["num_heads"]
        self.D = self.E // self.H
        self.num_vq, self.V_code, self.V_text = c["num_vq"], c["num_audio_tokens"], c["num_text_tokens"]
        self.fused = self.manifest.get("layer_form", "portable") == "fused"
        self.groups = manifest_layer_groups(self.manifest)  # the decoder layers of each layer graph
        self.per_graph = self.manifest.get("layers_per_graph", 1)
        self.num_layers = c["num_layers"]
        self.rope_theta = c.get("rope_theta", 10000.0)
        self.kv_np = np.float16 if self.manifest.get("kv_dtype", "fp32") == "fp16" else np.float32
        # Sample heads exported before per-row sampling take one value for all rows ([] instead of [N]).
        self.per_row = len({i.name: i for i in self.sample.get_inputs()}["penalty"].shape) == 1

    def generate(self, prompts, *, text_mode=False, temperature=(0.3, 0.3, 0.3, 0.3), repetition_penalty=1.05,
                 top_p=0.7, top_k=20, max_new_token=100, min_new_token=0, eos_id=None, speaker=None,
                 noise=None, greedy=False, seed=0, record_logits=False, forced=None) -> LoopResult:
        """noise: None (numpy Exp(1) from `seed`), an array [steps, N, V], or a callable(step, N, V).
        forced: ids [steps, N] to feed back instead of the sampled ones (teacher forcing, for comparisons)."""
        ids, mask = left_pad(prompts)
        B, T = mask.shape
        k = 1 if text_mode else self.num_vq
        N, V = B * k, (self.V_text if text_mode else self.V_code)
        eos = eos_id if eos_id is not None else (21136 if text_mode else self.V_code - 1)
        temps = np.asarray(temperature, np.float32).reshape(-1)
        temp_rows = np.tile(temps, B).astype(np.float32) if not text_mode else np.full(N, temps[0], np.float32)
        spk = np.zeros((B, self.E), np.float32) if speaker is None else np.asarray(speaker, np.float32).reshape(B, self.E)
        rng = np.random.default_rng(seed)
        history = np.full((N, 16), -1, np.int64)
        res = LoopResult(frames=[[] for _ in range(B)], hidden=[[] for _ in range(B)], end_step=[None] * B)
        finished = np.zeros(B, bool)
        if self.fused:
            # Right-padded rows, one [B, H, M, D] buffer per layer shared by past and present.
            import onnxruntime as ort

            from ..export.fused import rope_cache

            lens = mask.sum(1).astype(np.int64)
            step_ids = np.zeros_like(ids)
            for b in range(B):
                step_ids[b, : lens[b]] = ids[b, T - lens[b]:]
            M = T + max_new_token + 1
            cos_cache, sin_cache = (a.astype(self.kv_np) for a in rope_cache(M, self.D, self.rope_theta))
            kv = [(ort.OrtValue.ortvalue_from_numpy(np.zeros((B, self.H, M, self.D), self.kv_np)),
                   ort.OrtValue.ortvalue_from_numpy(np.zeros((B, self.H, M, self.D), self.kv_np)))
                  for _ in range(self.num_layers)]
            key_mask, pos = np.ones((B, T), np.int64), np.tile(np.arange(T, dtype=np.int64), (B, 1))
        else:
            past_k = [np.zeros((0, B, self.H, self.D), np.float32) for _ in self.layers]
            past_v = [np.zeros((0, B, self.H, self.D), np.float32) for _ in self.layers]
            key_mask = mask.copy()
            pos = prefill_positions(mask)
            step_ids = ids
        text_rows = np.ones((B, T), bool)
        for step in range(max_new_token):
            h, cos, sin, bias = self.embed.run(None, {
                "input_ids": step_ids, "text_mask": text_rows, "speaker": spk,
                "position_ids": pos, "key_mask": key_mask})
            if self.fused:
                total = lens if step == 0 else lens + 1
                seqlens = (total - 1).astype(np.int32)
                for layer, group in zip(self.layers, self.groups):
                    io = layer.io_binding()
                    io.bind_cpu_input("hidden", np.ascontiguousarray(h))
                    io.bind_cpu_input("seqlens_k", seqlens)
                    io.bind_cpu_input("total_sequence_length", np.array(T if step == 0 else total.max(), np.int32))
                    io.bind_cpu_input("cos_cache", cos_cache)
                    io.bind_cpu_input("sin_cache", sin_cache)
                    io.bind_output("hidden_out")  # first: copy_outputs_to_cpu()[0] below
                    for j, i in enumerate(group):
                        pk, pv, ok, ov = fused_kv_names(j, self.per_graph)
                        io.bind_ortvalue_input(pk, kv[i][0])
                        io.bind_ortvalue_input(pv, kv[i][1])
                        io.bind_ortvalue_output(ok, kv[i][0])
                        io.bind_ortvalue_output(ov, kv[i][1])
                    layer.run_with_iobinding(io)
                    h = io.copy_outputs_to_cpu()[0]
                if step == 0:
                    h = np.stack([h[b, lens[b] - 1] for b in range(B)])[:, None, :]
                else:
                    lens = lens + 1
            else:
                for i, layer in enumerate(self.layers):
                    h, pk, pv = layer.run(None, {"hidden": h, "cos": cos, "sin": sin, "attn_bias": bias,
                                                 "past_key": past_k[i], "past_value": past_v[i]})
                    past_k[i] = np.concatenate([past_k[i], pk], 0)
                    past_v[i] = np.concatenate([past_v[i], pv], 0)
            head = self.head_text if text_mode else self.head_code
            logits, last_hidden = head.run(None, {"hidden": h})
            if greedy:
                q = np.ones((N, V), np.float32)
            elif noise is None:
                q = rng.exponential(size=(N, V)).astype(np.float32)
            elif callable(noise):
                q = np.asarray(noise(step, N, V), np.float32)
            else:
                q = np.asarray(noise[step], np.float32)
            res.noise.append(q)
            rows = (N,) if self.per_row else ()
            (nxt,) = self.sample.run(None, {
                "logits": logits.reshape(N, V).astype(np.float32), "temperature": temp_rows,
                "penalty": np.full(rows, repetition_penalty, np.float32), "history": history,
                "top_p": np.full(rows, top_p, np.float32), "top_k": np.full(rows, top_k, np.int64),
                "eos_id": np.array(eos, np.int64), "block_eos": np.full(rows, step < min_new_token),
                "noise": q})
            if record_logits:
                res.logits.append(logits.reshape(N, V).copy())
            if forced is not None:
                nxt = np.asarray(forced[step], np.int64).reshape(N)
            history[:, step % 16] = nxt
            per_row = nxt.reshape(B, k)
            for b in range(B):
                if finished[b]:
                    continue
                if (per_row[b] == eos).any():
                    finished[b] = True
                    res.end_step[b] = step
                    continue
                res.frames[b].append(tuple(int(x) for x in per_row[b]))
                res.hidden[b].append(last_hidden[b].copy())
            res.steps = step + 1
            if finished.all():
                break
            # Next input: the sampled ids (text mode repeats the id in all four columns).
            step_ids = np.repeat(per_row, 4 // k, axis=1).reshape(B, 1, 4).astype(np.int64)
            text_rows = np.full((B, 1), text_mode)
            if self.fused:
                pos, key_mask = lens[:, None].astype(np.int64), np.ones((B, 1), np.int64)
            else:
                pos = (pos[:, -1:] + 1).astype(np.int64)
                key_mask = np.concatenate([key_mask, np.ones((B, 1), np.int64)], 1)
        return res
