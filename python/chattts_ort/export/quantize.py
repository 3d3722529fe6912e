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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QuantizeError
from ..format import (AUDIO_BLOCKS, MANIFEST, atomic_folder, check_output_folder, iter_all_graphs, open_export,
                      rewrite_graph_entries, sha256_file, tag_graph_file, write_manifest)

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "int4")
ALLOWED = {"embed": ("fp32", "fp16"), "sample": ("fp32",)}  # other blocks take every precision
AUDIO_ALLOWED = ("fp32", "fp16", "int8", "int8-dynamic")
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


PLAN_OPTIONS = ("optimize",)


def parse_plan(plan) -> dict:
    """A plan as a dict: a plan name, a JSON object string, or a dict. Options are checked here."""
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
    opt = plan.get("optimize", False)
    if not isinstance(opt, bool):
        raise QuantizeError(f'plan option "optimize" must be true or false, got {opt!r}')
    return plan


def resolve_plan(plan, manifest: dict) -> dict:
    """{block name: precision} for every block of the manifest. `plan` is a plan name, a JSON object string,
    or a dict mapping "embed", "layers", "layer_NN", "first_layer", "last_layer", "head_code", "head_text",
    "sample" to precisions (later, more specific keys override "layers"). The key "optimize" (true/false) is an
    option, not a block: it asks for ONNX Runtime's offline optimisation of every block after quantization."""
    plan = parse_plan(plan)
    names = [n for n, _ in iter_all_graphs(manifest)]
    layers = [n for n in names if n.startswith("layer_")]
    out = {n: "fp32" for n in names}
    order = sorted(((k, v) for k, v in plan.items() if k not in PLAN_OPTIONS), key=lambda kv: 0 if kv[0] == "layers" else 1)
    for key, prec in order:
        if prec not in PRECISIONS:
            raise QuantizeError(f"unknown precision {prec!r} for {key!r}; precisions: {', '.join(PRECISIONS)}")
        if key == "layers":
            targets = layers
        elif key == "audio":
            targets = [n for n in names if n in AUDIO_BLOCKS]
            if not targets:
                raise QuantizeError("plan names 'audio', but this export has no audio graphs")
        elif key == "first_layer":
            targets = layers[:1]
        elif key == "last_layer":
            targets = layers[-1:]
        elif key in out:
            targets = [key]
        else:
            raise QuantizeError(f"plan names block {key!r}, which this export does not have "
                                f"(blocks: embed, layers, layer_00..{layers[-1][6:]}, head_code, head_text, sample; audio, "
                                f"{', '.join(AUDIO_BLOCKS)})")
        for t in targets:
            kind = "embed" if t == "embed" else "sample" if t == "sample" else None
            if kind and prec not in ALLOWED[kind]:
                raise QuantizeError(f"block {t!r} cannot be {prec} (allowed: {', '.join(ALLOWED[kind])})")
            if t in AUDIO_BLOCKS and prec not in AUDIO_ALLOWED:
                raise QuantizeError(f"audio block {t!r} cannot be {prec} (allowed: {', '.join(AUDIO_ALLOWED)})")
            out[t] = prec
    return out


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

        excluded = _idft_matmuls(model)
        constants = {i.name for i in model.graph.initializer} | {
            n.output[0] for n in model.graph.node if n.op_type == "Constant"}
        wanted = sum(n.op_type == "MatMul" and n.name not in excluded and n.input[1] in constants
                     for n in model.graph.node)
        q = MatMulNBitsQuantizer(model, bits=8 if precision == "int8" else 4, block_size=block_size,
                                 is_symmetric=True, accuracy_level=4, nodes_to_exclude=excluded)
        q.process()
        done = sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)
        if done < wanted:  # the quantizer skips what it cannot rewrite without a word: say so
            raise QuantizeError(f"{src.name}: {precision} rewrote {done} of the {wanted} weight MatMuls")
        q.model.save_model_to_file(str(dst), False)
    elif precision == "int8-dynamic":
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=_idft_matmuls(model),
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    else:  # pragma: no cover - resolve_plan rejects it first
        raise QuantizeError(f"unknown precision {precision!r}")


def _idft_matmuls(model) -> list:
    """The audio graphs' inverse-DFT MatMul (a [n_fft + 2, n_fft] constant basis): exact trigonometry, not a
    learned weight, so it stays fp32 whatever the plan."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:  # the exporter may leave it as a Constant node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            shapes[n.output[0]] = tuple(n.attribute[0].t.dims)
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2:
            sh = shapes.get(n.input[1])
            if sh and len(sh) == 2 and sh[0] == sh[1] + 2 and sh[1] >= 256:
                out.append(n.name)
    return out


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
    check_output_folder(out, force)  # before any work: a refused OUT costs nothing
    manifest = open_export(inp)  # as Runtime.load checks it: a tampered folder is refused, not re-hashed
    if manifest.get("shared_weights"):
        raise QuantizeError(f"{inp} has shared weights (pre-packed for one machine); quantize its source instead")
    done = {n: e.get("precision", "fp32") for n, e in iter_all_graphs(manifest)}
    if any(p != "fp32" for p in done.values()) or manifest.get("quantization"):
        raise QuantizeError(f"{inp} is already quantized ({ {n: p for n, p in done.items() if p != 'fp32'} }); "
                            "quantize the fp32 export instead")
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= 16, got {block_size}")
    precisions = resolve_plan(plan, manifest)
    if optimize is None:
        optimize = parse_plan(plan).get("optimize", False)
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
            for name, entry in iter_all_graphs(manifest):
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
        m = rewrite_graph_entries(manifest, tmp, lambda name, _e: precisions[name])
        m["quantization"] = {"plan": plan if isinstance(plan, (str, dict)) else str(plan), "block_size": block_size,
                             "source": str(inp.resolve()), "source_manifest_sha256": sha256_file(inp / MANIFEST)}
        if optimize:
            m["optimized"] = OPTIMIZED
        write_manifest(tmp, m)

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
    check_output_folder(out, force)
    manifest = open_export(inp)
    if manifest.get("shared_weights"):
        raise QuantizeError(f"{inp} has shared weights, already optimised")
    if manifest.get("optimized"):
        raise QuantizeError(f"{inp} is already optimised ({manifest['optimized']})")

    def job(tmp: Path):
        for name, entry in iter_all_graphs(manifest):
            _optimize_file(inp / entry["file"], tmp / entry["file"])
            tag_graph_file(tmp / entry["file"], name)
        shutil.copyfile(inp / manifest.get("tokenizer", "tokenizer.json"), tmp / "tokenizer.json")
        m = rewrite_graph_entries(manifest, tmp, lambda _name, e: e.get("precision", "fp32"))
        m["optimized"] = OPTIMIZED
        write_manifest(tmp, m)

    with atomic_folder(out, force) as tmp:
        job(tmp)
    return Path(out)


SHARED_MIN_BYTES = 1024  # initializers below this stay inside the graph file (norm weights, shapes)


def _share_file(src: Path, dst: Path) -> None:
    """Save `src` as dst + dst's .data: the graph at ORT_ENABLE_EXTENDED (portable), every initializer of at least
    SHARED_MIN_BYTES in the data file, and beside each weight the form ONNX Runtime pre-packs it into at load
    (MatMul, MatMulNBits). Loading maps that file and hands the kernels the saved packed forms in place, so every
    process that loads it shares the pages instead of each packing a private copy."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.stem + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                str(SHARED_MIN_BYTES))
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def share_weights_export(inp, out, force: bool = False, progress: bool = True) -> Path:
    """Write OUT: the export INP with each block's weights in a data file beside its graph, pre-packed for this
    machine's kernels, so that processes loading OUT share one copy of the weights in the page cache (see
    `chattts-ort memory --processes N`). The packed forms depend on the CPU and the ONNX Runtime version: the
    manifest records both, and on another machine ONNX Runtime packs its own private copy again (still correct,
    no longer shared). Quantize first: a shared-weights export is not quantized or optimised again."""
    import platform

    import onnxruntime as ort

    from ..format import block_tag

    inp = Path(inp)
    check_output_folder(out, force)  # before any work: a refused OUT costs nothing
    manifest = open_export(inp)
    if manifest.get("shared_weights"):
        raise QuantizeError(f"{inp} already has shared weights")
    graphs = list(iter_all_graphs(manifest))

    def job(tmp: Path):
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(graphs), desc="share weights", unit="graph", leave=False)
        try:
            for name, entry in graphs:
                _share_file(inp / entry["file"], tmp / entry["file"])
                if block_tag(tmp / entry["file"]) != name:  # ONNX Runtime keeps the model's metadata; check it
                    raise QuantizeError(f"{tmp / entry['file']}: the saved graph lost its block tag")
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        shutil.copyfile(inp / manifest.get("tokenizer", "tokenizer.json"), tmp / "tokenizer.json")
        m = rewrite_graph_entries(manifest, tmp, lambda _name, e: e.get("precision", "fp32"))
        m.setdefault("optimized", OPTIMIZED)
        m["shared_weights"] = {"onnxruntime": ort.__version__, "machine": platform.machine(),
                               "cpu": _cpu_name(), "source": str(inp.resolve()),
                               "source_manifest_sha256": sha256_file(inp / MANIFEST)}
        write_manifest(tmp, m)

    with atomic_folder(out, force) as tmp:
        job(tmp)
    return Path(out)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
