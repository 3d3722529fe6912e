"""Where the idle per-step gap to onnxruntime-genai goes: the same decode, taken apart.

    python bench/gap.py [--model full] [--precision int4] [--layers-per-graph 20] [--reps 3] [--steps 250]

Four measurements alternate within each repetition, each in a fresh process with 2 intra-op threads:
- "genai": onnxruntime-genai itself on the same weights (bench/peers.py's peer, greedy, one 626-way head);
- "genai graph": the model.onnx genai built, run by plain ONNX Runtime (IO binding, KV bound in place like genai
  does, the attention mask growing one position per step; no sampling, no Python search loop);
- "layers": chattts-ort's layer graphs alone, run by plain ONNX Runtime the same way (the process-wide thread pool
  the core uses, KV bound in place, seqlens growing one position per step);
- "chattts-ort": Runtime.stream(), its frame gaps, and Runtime.profile() over the decode steps only, split into
  the layer graphs and the rest of ChatTTS's step (embedding, 4 code heads, noise, sample head).
Both plain-ORT loops start after 8 cached positions like the genai peer's prompt; chattts-ort's prompt is short too.

Reading it: "layers" / "genai graph" is what the kernels give (the same ONNX Runtime kernels on both sides);
chattts-ort's "layers" share against plain "layers" is the core's own overhead; its "rest" is the extra work of
ChatTTS's step. Results: bench/results/DATE-gap-MODEL-PRECISION[-lpgN].{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_probe import decode_ms, write_results  # noqa: E402
from under_load import _GENAI_PROBE, genai_model  # noqa: E402

P0 = 8  # prompt positions already in the cache when the timed decode starts

# Plain ONNX Runtime: a chain of graphs run back to back with IO binding, KV buffers bound as past and present.
_PLAIN = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
import onnxruntime.capi._pybind_state as C
a = json.loads(sys.argv[1])
C.set_global_thread_pool_sizes(2, 1)          # the core's thread setup: one process-wide pool of 2
M, steps, P0 = a["max_context"], a["steps"], a["p0"]
so = ort.SessionOptions()
so.use_per_session_threads = False
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in a["graphs"]]
H, D, E = a["heads"], a["head_dim"], a["hidden"]
def kv(b, s):  # every past input and its present output share one [1, H, M, D] buffer
    for i in (i.name for i in s.get_inputs() if i.name.startswith("past")):
        v = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, H, M, D), np.float32))
        b.bind_ortvalue_input(i, v)
        b.bind_ortvalue_output(i.replace("past_key_values", "present").replace("past_", "present_"), v)
if a["kind"] == "genai":
    s = sessions[0]
    b = s.io_binding()
    kv(b, s)
    logits = np.zeros((1, 1, a["vocab"]), np.float32)
    b.bind_output("logits", "cpu", 0, np.float32, [1, 1, a["vocab"]], logits.ctypes.data)
    def step(t, ids=np.array([[5]], np.int64)):
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", np.ones((1, P0 + t + 1), np.int64))
        s.run_with_iobinding(b)
else:
    import importlib.util
    spec = importlib.util.spec_from_file_location("fused", a["fused_py"])
    fused = importlib.util.module_from_spec(spec); spec.loader.exec_module(fused)
    cc, sc = fused.rope_cache(M, D, a["rope_theta"])
    cc, sc = ort.OrtValue.ortvalue_from_numpy(cc), ort.OrtValue.ortvalue_from_numpy(sc)
    h = [ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(0).standard_normal((1, 1, E)).astype(np.float32) * 0.1),
         ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, E), np.float32))]
    seq = np.zeros(1, np.int32); tot = np.zeros((), np.int32)
    seq_v, tot_v = ort.OrtValue.ortvalue_from_numpy(seq), ort.OrtValue.ortvalue_from_numpy(tot)
    binds = []
    for k, s in enumerate(sessions):
        b = s.io_binding()
        kv(b, s)
        b.bind_ortvalue_input("hidden", h[k % 2]); b.bind_ortvalue_output("hidden_out", h[(k + 1) % 2])
        b.bind_ortvalue_input("seqlens_k", seq_v); b.bind_ortvalue_input("total_sequence_length", tot_v)
        b.bind_ortvalue_input("cos_cache", cc); b.bind_ortvalue_input("sin_cache", sc)
        binds.append((s, b))
    def step(t):  # the OrtValues wrap seq and tot in place: bound once, like the core's buffers
        seq[0] = P0 + t; tot[...] = P0 + t + 1
        for s, b in binds:
            s.run_with_iobinding(b)
for t in range(10):
    step(t)
gaps = []
for t in range(steps):
    t0 = time.perf_counter(); step(t); gaps.append(time.perf_counter() - t0)
g = np.array(gaps) * 1000
print(json.dumps({"median": float(np.median(g)), "p99": float(np.percentile(g, 99))}))
"""

# chattts-ort's decode with the core's per-block profile over the decode steps only.
_RUNTIME = r"""
import json, sys, time
import numpy as np
from chattts_ort import InferCodeParams, Runtime
a = json.loads(sys.argv[1])
rt = Runtime.load(a["export"], threads=2, max_context=a["max_context"], audio=False)
list(rt.stream("warm up", params=InferCodeParams(max_new_token=10, min_new_token=10)))
rt.profile(True)
gaps, last = [], None
p = InferCodeParams(max_new_token=a["steps"], min_new_token=a["steps"], manual_seed=0)
for i, f in enumerate(rt.stream("hello world", params=p)):
    now = time.perf_counter()
    if i == 0:
        rt.profile()                          # drop the prefill from the per-block sums
    if last is not None:
        gaps.append(now - last)
    last = now
prof = rt.profile()
g = np.array(gaps[5:]) * 1000
rest = sum(prof[k] for k in ("embed", "head", "noise", "sample", "other"))
print(json.dumps({"median": float(np.median(g)), "p99": float(np.percentile(g, 99)), "layers_ms": prof["layers"],
                  "rest_ms": rest, "profile": prof}))
"""


def main(argv=None) -> int:
    import json

    import granularity
    from streams import cpu_name

    from chattts_ort.format import read_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--layers-per-graph", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    export = granularity.export_for(args.model, args.layers_per_graph, args.precision)  # N = 1: the default
    m = read_manifest(export)
    if m.get("layer_form") != "fused":
        raise SystemExit("bench/gap.py measures the fused layer form")
    cfg = m["config"]
    genai_dir = genai_model(args.model, args.precision)
    max_context = P0 + args.steps + 32
    common = {"steps": args.steps, "max_context": max_context, "p0": P0, "heads": cfg["num_heads"],
              "head_dim": cfg["hidden_size"] // cfg["num_heads"], "hidden": cfg["hidden_size"]}
    fused_py = str(HERE.parent / "python" / "chattts_ort" / "export" / "fused.py")
    layer_graphs = [str(Path(export) / e["file"]) for e in m["graphs"]["layers"]]
    jobs = {
        "genai": lambda: decode_ms({"model_dir": genai_dir, "threads": 2, "steps": args.steps, "bench": str(HERE)},
                                   probe=_GENAI_PROBE),
        "genai graph": lambda: decode_ms({**common, "kind": "genai", "graphs": [str(Path(genai_dir) / "model.onnx")],
                                          "vocab": cfg["num_audio_tokens"]}, probe=_PLAIN),
        "layers": lambda: decode_ms({**common, "kind": "layers", "graphs": layer_graphs, "fused_py": fused_py,
                                     "rope_theta": cfg["rope_theta"]}, probe=_PLAIN),
        "chattts-ort": lambda: decode_ms({"export": export, "steps": args.steps, "max_context": max_context},
                                         probe=_RUNTIME),
    }
    got = {k: [] for k in jobs}
    for rep in range(args.reps):
        for name, job in jobs.items():
            got[name].append(job())
            print(f"rep {rep + 1}: {name:12s} {json.dumps(got[name][-1])}", flush=True)
    med = {k: statistics.median(d["median"] for d in v) for k, v in got.items()}
    layers_rt = statistics.median(d["layers_ms"] for d in got["chattts-ort"])
    rest_rt = statistics.median(d["rest_ms"] for d in got["chattts-ort"])
    stamp = datetime.now(timezone.utc)
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": cpu_name(), "model": args.model,
           "precision": args.precision, "layers_per_graph": args.layers_per_graph, "steps": args.steps,
           "reps": args.reps, "median_ms": med, "chattts_ort_layers_ms": layers_rt, "chattts_ort_rest_ms": rest_rt,
           "runs": got, "command": "python bench/gap.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    g = med["genai"]
    lpg = f", {args.layers_per_graph} layers per graph" if args.layers_per_graph > 1 else ""
    lines = [f"#### The idle gap to onnxruntime-genai ({args.model} model, {args.precision}{lpg}), {res['date']} on "
             f"{res['machine']}", "",
             f"Decode ms/step, median of {args.reps} alternating runs of {args.steps} steps (2 threads, idle machine).",
             "", "| what | ms/step | vs genai |", "|---|---|---|",
             f"| onnxruntime-genai (its generator, greedy) | {g:.2f} | 1.00 |",
             f"| genai's model.onnx in plain ONNX Runtime | {med['genai graph']:.2f} | {med['genai graph'] / g:.2f} |",
             f"| chattts-ort's layer graphs in plain ONNX Runtime | {med['layers']:.2f} | {med['layers'] / g:.2f} |",
             f"| chattts-ort (Runtime.stream) | {med['chattts-ort']:.2f} | {med['chattts-ort'] / g:.2f} |",
             f"| - of which its layer graphs (Runtime.profile) | {layers_rt:.2f} | {layers_rt / g:.2f} |",
             f"| - of which the rest of ChatTTS's step (embedding, 4 code heads, noise, sampling) | {rest_rt:.2f} | "
             f"{rest_rt / g:.2f} |",
             "", f"Command: `{res['command']}`"]
    tag = f"-lpg{args.layers_per_graph}" if args.layers_per_graph > 1 else ""
    write_results(Path(args.out) / f"{stamp:%Y-%m-%d}-gap-{args.model}-{args.precision}{tag}", res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
