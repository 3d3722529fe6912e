"""Per-block quantization, per-block graph optimization, and the report that locates quantization loss.

Each block of an export folder is quantized on its own, so a plan can give every block its own precision and
the error report can say which block loses most. Precisions:

- `fp32`: the block as exported.
- `fp16`: weights stored in fp16, computed in fp32 (a Cast after each weight; ONNX Runtime's CPU provider has
  few fp16 kernels, so this halves the file, not the step time).
- `int8`: 8-bit weight-only `MatMulNBits` (onnxruntime.quantization's MatMulNBitsQuantizer, symmetric,
  accuracy_level 4 = int8 activations in the kernel; level 0 measured ~70x slower for 8 bits here).
- `int8-dynamic`: onnxruntime's dynamic quantization (int8 per-channel weights, activations quantized per call).
- `int4`: 4-bit weight-only `MatMulNBits`, block size configurable (default 32), accuracy_level 4.

The embedding (table lookups) takes fp32 or fp16; the sample head has no weights and stays fp32.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QuantizeError
from .export import graph_entry
from .format import MANIFEST, atomic_folder, iter_graphs, open_export, read_manifest, sha256_file, tag_graph_file

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "int4")
ALLOWED = {"embed": ("fp32", "fp16"), "sample": ("fp32",)}  # other blocks take every precision
PLANS = {
    "fp32": {},
    "fp16": {"embed": "fp16", "layers": "fp16", "head_code": "fp16", "head_text": "fp16"},
    # The code heads read 7.7 MB of fp32 weights per step, as much as two int4 layers: they go to int8 too.
    "int8": {"layers": "int8", "head_code": "int8", "head_text": "int8"},
    "int8-layers": {"layers": "int8"},
    "int8-dynamic": {"layers": "int8-dynamic"},
    "int4": {"layers": "int4", "head_code": "int8", "head_text": "int8"},
    "int4-layers": {"layers": "int4"},
    "int4-edges": {"layers": "int4", "first_layer": "int8", "last_layer": "int8", "head_code": "int8",
                   "head_text": "int8"},
}


def resolve_plan(plan, manifest: dict) -> dict:
    """{block name: precision} for every block of the manifest. `plan` is a plan name, a JSON object string,
    or a dict mapping "embed", "layers", "layer_NN", "first_layer", "last_layer", "head_code", "head_text",
    "sample" to precisions (later, more specific keys override "layers"). The key "optimize" (true/false) is an
    option, not a block: it asks for ONNX Runtime's offline optimisation of every block after quantization."""
    if isinstance(plan, str):
        s = plan.strip()
        if s.startswith("{"):
            try:
                plan = json.loads(s)
            except json.JSONDecodeError as e:
                raise QuantizeError(f"plan is not valid JSON: {e}") from e
        elif s in PLANS:
            plan = PLANS[s]
        else:
            raise QuantizeError(f"unknown plan {plan!r}; plans: {', '.join(PLANS)}, or a JSON object")
    if not isinstance(plan, dict):
        raise QuantizeError("a plan must be a name, a JSON object or a dict")
    _plan_optimize(plan)  # validates the option
    names = [n for n, _ in iter_graphs(manifest)]
    layers = [n for n in names if n.startswith("layer_")]
    out = {n: "fp32" for n in names}
    order = sorted(((k, v) for k, v in plan.items() if k not in PLAN_OPTIONS), key=lambda kv: 0 if kv[0] == "layers" else 1)
    for key, prec in order:
        if prec not in PRECISIONS:
            raise QuantizeError(f"unknown precision {prec!r} for {key!r}; precisions: {', '.join(PRECISIONS)}")
        if key == "layers":
            targets = layers
        elif key == "first_layer":
            targets = layers[:1]
        elif key == "last_layer":
            targets = layers[-1:]
        elif key in out:
            targets = [key]
        else:
            raise QuantizeError(f"plan names block {key!r}, which this export does not have "
                                f"(blocks: embed, layers, layer_00..{layers[-1][6:]}, head_code, head_text, sample)")
        for t in targets:
            kind = "embed" if t == "embed" else "sample" if t == "sample" else None
            if kind and prec not in ALLOWED[kind]:
                raise QuantizeError(f"block {t!r} cannot be {prec} (allowed: {', '.join(ALLOWED[kind])})")
            out[t] = prec
    return out


PLAN_OPTIONS = ("optimize",)


def _plan_dict(plan) -> dict:
    if isinstance(plan, str):
        s = plan.strip()
        if s.startswith("{"):
            try:
                return json.loads(s)
            except json.JSONDecodeError as e:
                raise QuantizeError(f"plan is not valid JSON: {e}") from e
        return PLANS.get(s, {})
    return plan if isinstance(plan, dict) else {}


def _plan_optimize(plan) -> bool:
    opt = _plan_dict(plan).get("optimize", False)
    if not isinstance(opt, bool):
        raise QuantizeError(f'plan option "optimize" must be true or false, got {opt!r}')
    return opt


def _to_fp16_weights(model):
    """Store large float initializers as fp16 and Cast them back to fp32 where they are used."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    new_inits, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= 1024:
            arr = numpy_helper.to_array(init).astype(np.float16)
            name16 = init.name + "_fp16"
            new_inits.append(numpy_helper.from_array(arr, name16))
            casts.append(helper.make_node("Cast", [name16], [init.name], to=TensorProto.FLOAT, name=init.name + "_cast"))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return model


def quantize_block(src: Path, dst: Path, precision: str, block_size: int = 32) -> None:
    import onnx

    if precision == "fp32":
        shutil.copyfile(src, dst)
        return
    model = onnx.load(str(src))
    if precision == "fp16":
        onnx.save(_to_fp16_weights(model), str(dst))
    elif precision in ("int8", "int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=8 if precision == "int8" else 4, block_size=block_size,
                                 is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(dst), False)
    elif precision == "int8-dynamic":
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": TensorProto.FLOAT})
    else:  # pragma: no cover - resolve_plan rejects it first
        raise QuantizeError(f"unknown precision {precision!r}")


@dataclass
class QuantizeReport:
    out_dir: Path
    plan: dict
    seconds: float
    bytes_in: int
    bytes_out: int

    def summary(self) -> str:
        counts = {}
        for p in self.plan.values():
            counts[p] = counts.get(p, 0) + 1
        mix = ", ".join(f"{n} blocks {p}" for p, n in sorted(counts.items()))
        return (f"wrote {self.out_dir} in {self.seconds:.1f} s: {mix}; graphs {self.bytes_in / 1e6:.1f} MB -> "
                f"{self.bytes_out / 1e6:.1f} MB")


def quantize_export(inp, out, plan="int8", block_size: int = 32, force: bool = False,
                    progress: bool = True, optimize=None) -> QuantizeReport:
    """Write a new export folder whose blocks carry the precisions of `plan` (see resolve_plan).

    optimize: save every block as ONNX Runtime's offline-optimised graph too (see optimize_export); None takes
    the plan's "optimize" option (default false)."""
    inp = Path(inp)
    manifest = open_export(inp)  # as Runtime.load checks it: a tampered folder is refused, not re-hashed
    done = {n: e.get("precision", "fp32") for n, e in iter_graphs(manifest)}
    if any(p != "fp32" for p in done.values()) or manifest.get("quantization"):
        raise QuantizeError(f"{inp} is already quantized ({ {n: p for n, p in done.items() if p != 'fp32'} }); "
                            "quantize the fp32 export instead")
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= 16, got {block_size}")
    precisions = resolve_plan(plan, manifest)
    if optimize is None:
        optimize = _plan_optimize(plan)
    t0 = time.perf_counter()

    def job(tmp: Path):
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(precisions), desc="quantize", unit="graph", leave=False)
        # The quantizer logs every node at INFO through loggers of its own (created when it is imported).
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

        loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                           if n.startswith("onnxruntime")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            for name, entry in iter_graphs(manifest):
                quantize_block(inp / entry["file"], tmp / entry["file"], precisions[name], block_size)
                if optimize:
                    _optimize_file(tmp / entry["file"], tmp / entry["file"])
                if precisions[name] != "fp32" or optimize:
                    tag_graph_file(tmp / entry["file"], name)
                if bar is not None:
                    bar.update(1)
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)
            if bar is not None:
                bar.close()
        shutil.copyfile(inp / manifest.get("tokenizer", "tokenizer.json"), tmp / "tokenizer.json")
        m = json.loads(json.dumps(manifest))
        g = m["graphs"]
        g["embed"] = graph_entry(tmp, g["embed"]["file"], precisions["embed"])
        g["layers"] = [graph_entry(tmp, e["file"], precisions[f"layer_{i:02d}"]) for i, e in enumerate(g["layers"])]
        for k in ("head_code", "head_text", "sample"):
            g[k] = graph_entry(tmp, g[k]["file"], precisions[k])
        m["quantization"] = {"plan": plan if isinstance(plan, (str, dict)) else str(plan), "block_size": block_size,
                             "source": str(inp.resolve()), "source_manifest_sha256": sha256_file(inp / MANIFEST)}
        if optimize:
            m["optimized"] = OPTIMIZED
        (tmp / MANIFEST).write_text(json.dumps(m, indent=2))

    with atomic_folder(out, force) as tmp:
        job(tmp)
    size = lambda folder: sum(p.stat().st_size for p in Path(folder).glob("*.onnx"))  # noqa: E731
    return QuantizeReport(Path(out), precisions, time.perf_counter() - t0, size(inp), size(out))


OPTIMIZED = "ort-extended"


def _optimize_file(src: Path, dst: Path) -> None:
    """ONNX Runtime's graph optimisation at ORT_ENABLE_EXTENDED, saved as a model file. EXTENDED, not ALL:
    level ALL adds layout transforms (NCHWc, prepacked forms) specific to the machine that ran it, so its
    output is not portable. src may equal dst (the session has read the file before it writes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = Path(dst).with_name(Path(dst).name + ".opt")
    so.optimized_model_filepath = str(tmp)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    os.replace(tmp, dst)


def optimize_export(inp, out, force: bool = False, progress: bool = True) -> Path:
    """Save every block as ONNX Runtime's offline-optimised graph (ORT_ENABLE_EXTENDED: RMSNorm, GELU/SiLU and
    MatMul fusions; layout-independent, so the files stay portable). Graph IO is unchanged."""
    inp = Path(inp)
    manifest = open_export(inp)
    if manifest.get("optimized"):
        raise QuantizeError(f"{inp} is already optimised ({manifest['optimized']})")

    def job(tmp: Path):
        for name, entry in iter_graphs(manifest):
            _optimize_file(inp / entry["file"], tmp / entry["file"])
            tag_graph_file(tmp / entry["file"], name)
        shutil.copyfile(inp / manifest.get("tokenizer", "tokenizer.json"), tmp / "tokenizer.json")
        m = json.loads(json.dumps(manifest))
        g = m["graphs"]
        g["embed"] = graph_entry(tmp, g["embed"]["file"], g["embed"].get("precision", "fp32"))
        g["layers"] = [graph_entry(tmp, e["file"], e.get("precision", "fp32")) for e in g["layers"]]
        for k in ("head_code", "head_text", "sample"):
            g[k] = graph_entry(tmp, g[k]["file"], g[k].get("precision", "fp32"))
        m["optimized"] = OPTIMIZED
        (tmp / MANIFEST).write_text(json.dumps(m, indent=2))

    with atomic_folder(out, force) as tmp:
        job(tmp)
    return Path(out)


# ----------------------------------------------------------------------------------------------------------
# The error report: every block against its fp32 counterpart, then the chain.


@dataclass
class CompareReport:
    folder: Path
    against: Path
    blocks: list                      # dicts: block, precision, output, max_abs, rel_l2, cosine
    chain: dict
    path: Path = None
    plot: Path = None
    seconds: float = 0.0
    goal_agreement: float = 0.95      # None: reported, not enforced (plans with int4 blocks)

    @property
    def worst_block(self) -> str:
        cand = [b for b in self.blocks if b["block"] not in ("sample",) and b["output"] in ("hidden", "hidden_out", "logits")]
        return max(cand, key=lambda b: b["rel_l2"])["block"] if cand else ""

    @property
    def failed(self) -> list:
        bad = []
        if self.goal_agreement is not None and self.chain.get("agreement", 0) < self.goal_agreement:
            bad.append("chain agreement")
        bad += sorted({b["block"] for b in self.blocks if not np.isfinite(b["rel_l2"])})
        return bad

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        lines = [f"{'block':<10} {'prec':<12} {'output':<14} {'max abs':>10} {'rel L2':>10} {'cosine':>10}"]
        for b in self.blocks:
            lines.append(f"{b['block']:<10} {b['precision']:<12} {b['output']:<14} {b['max_abs']:10.3e} "
                         f"{b['rel_l2']:10.3e} {b['cosine']:10.6f}")
        c = self.chain
        lines.append(f"chain ({c['steps']} steps, teacher-forced on the fp32 greedy tokens): greedy agreement "
                     f"{100 * c['agreement']:.2f}% "
                     f"({'goal >= %.0f%%' % (100 * self.goal_agreement) if self.goal_agreement else 'no goal for int4'}), "
                     f"mean KL(fp32 || this) {c['mean_kl']:.3e}")
        lines.append(f"block that loses most: {self.worst_block}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "against": str(self.against), "ok": self.ok, "failed": self.failed,
                "blocks": self.blocks, "chain": self.chain, "worst_block": self.worst_block,
                "seconds": self.seconds, "plot": str(self.plot) if self.plot else None}


def _block_feeds(manifest: dict, cfg, name: str, seed: int):
    """Named inputs for one block (numpy), the same for both folders."""
    from .export import example_inputs

    if name.startswith("layer_") and manifest.get("layer_form") == "fused":
        from .fused import run_fused_reference_inputs

        feed, _ = run_fused_reference_inputs(cfg, B=1, S=1, P=8, M=16, seed=seed)
        return feed
    block = "layer" if name.startswith("layer_") else name
    args = example_inputs(cfg, block, seed=seed)
    entry = dict(iter_graphs(manifest))[name]
    return {i["name"]: a.numpy() for i, a in zip(entry["inputs"], args)}


def compare_exports(folder, against, steps: int = 200, progress: bool = False, seed: int = 0) -> CompareReport:
    import onnxruntime as ort

    from .config import GPTConfig

    t0 = time.perf_counter()
    folder, against = Path(folder), Path(against)
    mq, mf = open_export(folder), open_export(against)  # verify refuses what Runtime.load refuses
    if mq["config"] != mf["config"] or mq.get("layer_form") != mf.get("layer_form"):
        raise QuantizeError(f"{folder} and {against} are not exports of the same model and layer form")
    cfg = GPTConfig.from_dict(mq["config"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    blocks = []
    entries_q, entries_f = dict(iter_graphs(mq)), dict(iter_graphs(mf))
    for i, (name, eq) in enumerate(entries_q.items()):
        feed = _block_feeds(mq, cfg, name, seed + i)
        sq = ort.InferenceSession(str(folder / eq["file"]), so, providers=["CPUExecutionProvider"])
        sf = ort.InferenceSession(str(against / entries_f[name]["file"]), so, providers=["CPUExecutionProvider"])
        if progress:
            print(f"compare {name} ({eq.get('precision', 'fp32')})", file=sys.stderr, flush=True)
        got = sq.run(None, {k: v.copy() for k, v in feed.items()})
        want = sf.run(None, {k: v.copy() for k, v in feed.items()})
        for out, g, w in zip(sq.get_outputs(), got, want):
            g64, w64 = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
            fin = np.isfinite(w64) & np.isfinite(g64)
            g64, w64 = g64[fin], w64[fin]
            nw = np.linalg.norm(w64)
            blocks.append({
                "block": name, "precision": eq.get("precision", "fp32"), "output": out.name,
                "max_abs": float(np.abs(g64 - w64).max()) if g64.size else 0.0,
                "rel_l2": float(np.linalg.norm(g64 - w64) / nw) if nw > 0 else 0.0,
                "cosine": float(g64 @ w64 / (np.linalg.norm(g64) * nw)) if nw > 0 and np.linalg.norm(g64) > 0 else 1.0,
            })
    if progress:
        print(f"compare chain: {steps} teacher-forced steps", file=sys.stderr, flush=True)
    chain = _chain_agreement(folder, against, cfg, steps, seed)
    has_int4 = any(e.get("precision") == "int4" for e in entries_q.values())
    rep = CompareReport(folder, against, blocks, chain, goal_agreement=None if has_int4 else 0.95)
    rep.seconds = time.perf_counter() - t0
    rep.plot = _plot(rep, folder / "quant_report.png")
    return rep


def _chain_agreement(folder: Path, against: Path, cfg, steps: int, seed: int) -> dict:
    """Greedy tokens of the fp32 chain, fed to both chains (teacher forcing); per step and codebook: does the
    argmax of the logits agree, and KL(softmax fp32 || softmax this)."""
    from .ortloop import OrtLoop

    rng = np.random.default_rng(seed)
    prompt = [[21131, 21144, 21173] + rng.integers(1000, 20000, 12).tolist() + [21132]]
    ref = OrtLoop(against, threads=2).generate(prompt, greedy=True, max_new_token=steps, min_new_token=steps,
                                               record_logits=True)
    forced = np.array([f for f in ref.frames[0]], np.int64)
    got = OrtLoop(folder, threads=2).generate(prompt, greedy=True, max_new_token=len(forced), min_new_token=len(forced),
                                              record_logits=True, forced=forced)
    a = np.stack(ref.logits[: len(forced)]).astype(np.float64)  # [steps, N, V]
    b = np.stack(got.logits[: len(forced)]).astype(np.float64)
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = logsoftmax(a), logsoftmax(b)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    return {"steps": int(len(forced)), "agreement": agree, "mean_kl": kl}


def _plot(rep: CompareReport, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional
        return None
    rows = [b for b in rep.blocks if b["output"] in ("hidden", "hidden_out", "logits")]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.5))
    ax.bar(range(len(rows)), [max(b["rel_l2"], 1e-12) for b in rows],
           color=["C3" if b["block"] == rep.worst_block else "C0" for b in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([b["block"].replace("layer_", "L") for b in rows], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("relative L2 error vs fp32")
    ax.set_title(f"{rep.folder.name}: greedy agreement {100 * rep.chain['agreement']:.1f}%, "
                 f"mean KL {rep.chain['mean_kl']:.2e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Memory: what loading a folder costs, against the bytes of its weights.

_RSS_PROBE = r"""
import json, sys
args = json.loads(sys.argv[1])

def rss():  # (current, peak) resident set in bytes, from the kernel's own accounting
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                got[k] = int(v.split()[0]) * 1024
    return got["VmRSS"], got["VmHWM"]

import numpy, onnxruntime as ort
if args["via"] == "runtime":
    from chattts_ort import Runtime
    from chattts_ort._native import core
    core()
before = rss()[0]
if args["via"] == "runtime":
    keep = Runtime.load(args["folder"], threads=1, max_context=args["max_context"], verify=False,
                        session_config=args["config"])
else:
    keep = []
    for path in args["files"]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        for k, v in args["config"].items():
            so.add_session_config_entry(k, v)
        keep.append(ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]))
after, peak = rss()
print(json.dumps({"before": before, "after": after, "peak": peak}))
"""


@dataclass
class RSSReport:
    folder: Path
    via: str                 # "runtime" (the C++ core) or "ort" (one Python onnxruntime session per block)
    prepacking: bool
    weight_bytes: int        # sum of the folder's graph files
    rss_before: int          # resident bytes before loading (interpreter, onnxruntime)
    rss_after: int           # resident bytes with every block loaded
    peak_rss: int            # the high-water mark while loading

    @property
    def loaded_bytes(self) -> int:
        return self.rss_after - self.rss_before

    @property
    def ratio(self) -> float:
        """Resident bytes the loaded blocks hold, per byte of weights (goal <= 1.2)."""
        return self.loaded_bytes / self.weight_bytes

    @property
    def peak_ratio(self) -> float:
        return (self.peak_rss - self.rss_before) / self.weight_bytes

    def summary(self) -> str:
        return (f"{self.folder.name} via {self.via}, prepacking {'on' if self.prepacking else 'off'}: weights "
                f"{self.weight_bytes / 1e6:.1f} MB, loaded +{self.loaded_bytes / 1e6:.1f} MB resident "
                f"({self.ratio:.2f}x), peak while loading +{(self.peak_rss - self.rss_before) / 1e6:.1f} MB "
                f"({self.peak_ratio:.2f}x)")

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "via": self.via, "prepacking": self.prepacking,
                "weight_bytes": self.weight_bytes, "rss_before": self.rss_before, "rss_after": self.rss_after,
                "peak_rss": self.peak_rss, "ratio": self.ratio, "peak_ratio": self.peak_ratio}


def load_rss(folder, via: str = "runtime", disable_prepacking: bool = False, max_context: int = 16,
             timeout: float = 600) -> RSSReport:
    """Load every block of `folder` in a fresh subprocess and measure its resident memory (Linux /proc).

    via="runtime" loads through the C++ core (Runtime.load; max_context small, so the KV cache it allocates
    is negligible: 2 * layers * heads * max_context * head_dim * 4 bytes); via="ort" opens one Python
    onnxruntime session per block. disable_prepacking sets the session config "session.disable_prepacking"
    (ONNX Runtime otherwise re-lays-out MatMul weights at load into kernel-specific packed copies)."""
    if via not in ("runtime", "ort"):
        raise ValueError(f"via must be 'runtime' or 'ort', got {via!r}")
    if not Path("/proc/self/status").exists():
        raise RuntimeError("load_rss reads /proc/self/status (Linux only)")
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = [str(folder / e["file"]) for _, e in iter_graphs(manifest)]
    config = {"session.disable_prepacking": "1"} if disable_prepacking else {}
    args = {"folder": str(folder), "files": files, "via": via, "config": config, "max_context": int(max_context)}
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"load_rss: loading {folder} failed:\n{r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    weights = sum(Path(f).stat().st_size for f in files)
    return RSSReport(folder, via, not disable_prepacking, weights, got["before"], got["after"], got["peak"])
