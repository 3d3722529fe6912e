"""The on-disk contract between export and run: the one module both sides import (docs/FORMAT.md).

It owns the format version, the manifest (read, write, check), the block names and the IO names of every
graph, sha256, and atomic folder writes. It imports neither torch nor the C++ core.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

from .errors import ChatTTSOrtError, ExportError

FORMAT = "chattts-ort/1"
MANIFEST = "manifest.json"
OPSET = 17

# Block names: the keys of the manifest's "graphs" and the names used in errors, plans and reports.
EMBED, HEAD_CODE, HEAD_TEXT, SAMPLE = "embed", "head_code", "head_text", "sample"
SINGLE_BLOCKS = (EMBED, HEAD_CODE, HEAD_TEXT, SAMPLE)
LAYER_FORMS = ("fused", "portable")
KV_DTYPES = ("fp32", "fp16")
# ONNX metadata key naming the block a graph file was exported as (a swapped or duplicated file is caught at load).
BLOCK_METADATA_KEY = "chattts_ort.block"


def layer_name(i: int) -> str:
    """The block name of the i-th layer graph (with layers_per_graph N > 1, graph i holds layers N*i ..)."""
    return f"layer_{i:02d}"


def layer_groups(num_layers: int, per_graph: int = 1) -> list:
    """The decoder layers each layer graph holds, in chain order: [range(0, N), range(N, 2N), ...] (the last
    graph takes what is left)."""
    return [range(s, min(num_layers, s + per_graph)) for s in range(0, num_layers, per_graph)]


def manifest_layer_groups(manifest: dict) -> list:
    return layer_groups(manifest["config"]["num_layers"], manifest.get("layers_per_graph", 1))


def fused_kv_names(j: int, layers_per_graph: int) -> tuple:
    """(past_key, past_value, present_key, present_value) of the j-th layer of a fused layer graph: the plain
    names in an export of one layer per graph (every export before layers_per_graph), suffixed _j otherwise
    (also in a last graph that holds fewer layers)."""
    sfx = "" if layers_per_graph == 1 else f"_{j}"
    return (f"past_key{sfx}", f"past_value{sfx}", f"present_key{sfx}", f"present_value{sfx}")


# Graph IO names, per block (and per layer form). The C++ core binds exactly these names; Runtime.load
# checks every graph against them before the first step.
EMBED_INPUTS = ("input_ids", "text_mask", "speaker", "position_ids", "key_mask")
EMBED_OUTPUTS = ("hidden", "cos", "sin", "attn_bias")
LAYER_INPUTS = {
    "portable": ("hidden", "cos", "sin", "attn_bias", "past_key", "past_value"),
    "fused": ("hidden", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"),
}
LAYER_OUTPUTS = ("hidden_out", "present_key", "present_value")
HEAD_INPUTS = ("hidden",)
HEAD_OUTPUTS = ("logits", "last_hidden")
SAMPLE_INPUTS = ("logits", "temperature", "penalty", "history", "top_p", "top_k", "eos_id", "block_eos", "noise")
SAMPLE_OUTPUTS = ("next_ids",)


# The audio path (optional: exports made before it have none). "decoder" and "vocos" decode whole utterances;
# "audio_step" and "audio_flush" are the two together in streaming form (docs/AUDIO.md).
DECODER, VOCOS, AUDIO_STEP, AUDIO_FLUSH = "decoder", "vocos", "audio_step", "audio_flush"
AUDIO_BLOCKS = (DECODER, VOCOS, AUDIO_STEP, AUDIO_FLUSH)
AUDIO_IO = {
    DECODER: (("hidden",), ("mel",)),
    VOCOS: (("mel",), ("audio",)),
    AUDIO_STEP: (("hidden", "state", "frames_done"), ("audio", "state_out", "first_sample")),
    AUDIO_FLUSH: (("state", "frames_done"), ("audio", "first_sample")),
}
AUDIO_FIELDS = {"state_size": (1, 1 << 30), "flush_samples": (1, 1 << 30), "exact_lookahead": (0, 1 << 20),
                "samples_per_frame": (1, 1 << 20), "hop": (1, 1 << 20), "sample_rate": (1, 1 << 24)}


def block_io(block: str, layer_form: str) -> Tuple[tuple, tuple]:
    """(input names, output names) a block must have, in order."""
    if block == EMBED:
        return EMBED_INPUTS, EMBED_OUTPUTS
    if block.startswith("layer_"):
        return LAYER_INPUTS[layer_form], LAYER_OUTPUTS
    if block in (HEAD_CODE, HEAD_TEXT):
        return HEAD_INPUTS, HEAD_OUTPUTS
    if block == SAMPLE:
        return SAMPLE_INPUTS, SAMPLE_OUTPUTS
    if block in AUDIO_IO:
        return AUDIO_IO[block]
    raise ExportError(f"unknown block {block!r}")


def iter_graphs(manifest: dict) -> Iterator[Tuple[str, dict]]:
    """(block name, entry) for every graph of a manifest, layers as 'layer_NN', in chain order."""
    g = manifest["graphs"]
    yield EMBED, g[EMBED]
    for i, e in enumerate(g["layers"]):
        yield layer_name(i), e
    for k in (HEAD_CODE, HEAD_TEXT, SAMPLE):
        yield k, g[k]


def iter_audio_graphs(manifest: dict) -> Iterator[Tuple[str, dict]]:
    """(block name, entry) for the audio graphs of a manifest (none for an export without audio)."""
    a = manifest.get("audio")
    if a:
        for k in AUDIO_BLOCKS:
            yield k, a["graphs"][k]


def iter_all_graphs(manifest: dict) -> Iterator[Tuple[str, dict]]:
    """The GPT's graphs, then the audio graphs: every file an export holds."""
    yield from iter_graphs(manifest)
    yield from iter_audio_graphs(manifest)


def audio_unavailable(manifest: dict) -> Optional[str]:
    """Why an export cannot make audio (None when it can)."""
    if not manifest.get("audio"):
        made = manifest.get("exporter", {}).get("version", "an older version")
        return (f"this export has no audio graphs (written by chattts-ort {made}, before the audio path, or from "
                "an asset folder without Decoder.safetensors and Vocos.safetensors); it serves audio codes only. "
                "Export it again with this version to make speech")
    return None


def sha256_file(path: os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Manifest schema. Every error names the file and the field, so a hand-edited or truncated manifest is told
# apart from a broken graph.

# config field -> (type, lowest, highest). Highest bounds keep every size product far from int64 overflow.
CONFIG_FIELDS = {
    "hidden_size": (int, 1, 1 << 16),
    "num_layers": (int, 1, 1024),
    "num_heads": (int, 1, 1024),
    "intermediate_size": (int, 1, 1 << 18),
    "rms_norm_eps": (float, 1e-12, 1.0),
    "rope_theta": (float, 1.0, 1e9),
    "num_text_tokens": (int, 2, 1 << 24),
    "num_audio_tokens": (int, 2, 1 << 20),
    "num_vq": (int, 1, 4),
    "max_position_embeddings": (int, 2, 1 << 20),
}
GRAPH_ENTRY_FIELDS = {"file": str, "sha256": str, "bytes": int, "inputs": list, "outputs": list}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_config(cfg, where: str) -> None:
    if not isinstance(cfg, dict):
        raise ExportError(f"{where}: 'config' must be an object")
    for key, (typ, lo, hi) in CONFIG_FIELDS.items():
        if key not in cfg:
            raise ExportError(f"{where}: config.{key} is missing")
        v = cfg[key]
        ok = _is_int(v) if typ is int else _is_number(v)
        if not ok or not (lo <= v <= hi):
            kind = "an integer" if typ is int else "a finite number"
            raise ExportError(f"{where}: config.{key} must be {kind} in [{lo}, {hi}], got {v!r}")
    if cfg["hidden_size"] % cfg["num_heads"] or (cfg["hidden_size"] // cfg["num_heads"]) % 2:
        raise ExportError(f"{where}: config.hidden_size {cfg['hidden_size']} must be num_heads "
                          f"({cfg['num_heads']}) times an even head size")


def check_manifest(m, where: str) -> dict:
    """Structural check of a parsed manifest; returns it. Raises ExportError naming the field."""
    if not isinstance(m, dict):
        raise ExportError(f"{where}: the manifest must be a JSON object")
    if m.get("format") != FORMAT:
        raise ExportError(f"{where}: format {m.get('format')!r} is not {FORMAT!r}")
    for key in ("config", "graphs"):
        if key not in m:
            raise ExportError(f"{where}: missing key {key!r}")
    check_config(m["config"], where)
    form = m.get("layer_form", "portable")
    if form not in LAYER_FORMS:
        raise ExportError(f"{where}: layer_form {form!r} is not one of {', '.join(LAYER_FORMS)}")
    kv = m.get("kv_dtype", "fp32")
    if kv not in KV_DTYPES or (kv == "fp16" and form != "fused"):
        raise ExportError(f"{where}: kv_dtype {kv!r} (fp32, or fp16 with the fused layer form)")
    if not isinstance(m.get("tokenizer", "tokenizer.json"), str):
        raise ExportError(f"{where}: 'tokenizer' must be a file name")
    st = m.get("special_tokens", {})
    if not isinstance(st, dict) or not all(_is_int(v) for v in st.values()):
        raise ExportError(f"{where}: 'special_tokens' must map names to integer ids")
    g = m["graphs"]
    if not isinstance(g, dict):
        raise ExportError(f"{where}: 'graphs' must be an object")
    for k in SINGLE_BLOCKS + ("layers",):
        if k not in g:
            raise ExportError(f"{where}: graphs.{k} is missing")
    if not isinstance(g["layers"], list):
        raise ExportError(f"{where}: graphs.layers must be a list")
    n = m.get("layers_per_graph", 1)
    if not _is_int(n) or not 1 <= n <= m["config"]["num_layers"]:
        raise ExportError(f"{where}: layers_per_graph must be an integer in [1, config.num_layers], got {n!r}")
    if n > 1 and form != "fused":
        raise ExportError(f"{where}: layers_per_graph > 1 needs the fused layer form")
    if len(g["layers"]) != len(layer_groups(m["config"]["num_layers"], n)):
        raise ExportError(f"{where}: graphs.layers lists {len(g['layers'])} graphs, but config.num_layers "
                          f"{m['config']['num_layers']} at {n} layers per graph makes "
                          f"{len(layer_groups(m['config']['num_layers'], n))}")
    a = m.get("audio")
    if a is not None:
        if not isinstance(a, dict) or not isinstance(a.get("graphs"), dict) or not isinstance(a.get("config"), dict):
            raise ExportError(f"{where}: 'audio' must be an object with 'config' and 'graphs'")
        for k in AUDIO_BLOCKS:
            if k not in a["graphs"]:
                raise ExportError(f"{where}: audio.graphs.{k} is missing")
        for k, (lo, hi) in AUDIO_FIELDS.items():
            if not _is_int(a.get(k)) or not lo <= a[k] <= hi:
                raise ExportError(f"{where}: audio.{k} must be an integer in [{lo}, {hi}], got {a.get(k)!r}")
        if 2 * a["config"].get("dec_idim", -1) != m["config"]["hidden_size"]:
            raise ExportError(f"{where}: audio.config.dec_idim must be half the GPT's hidden_size")
    files = {}
    for name, e in iter_all_graphs(m):
        field = (f"graphs.layers[{int(name[6:])}]" if name.startswith("layer_")
                 else f"audio.graphs.{name}" if name in AUDIO_BLOCKS else f"graphs.{name}")
        if not isinstance(e, dict):
            raise ExportError(f"{where}: {field} must be an object")
        for key, typ in GRAPH_ENTRY_FIELDS.items():
            if key not in e:
                raise ExportError(f"{where}: {field}.{key} is missing")
            if not isinstance(e[key], typ) or (typ is int and isinstance(e[key], bool)):
                raise ExportError(f"{where}: {field}.{key} must be of type {typ.__name__}")
        _check_file_name(e["file"], f"{where}: {field}.file")
        if e["file"] in files:
            raise ExportError(f"{where}: {field}.file {e['file']!r} is also the file of {files[e['file']]}")
        files[e["file"]] = name
        if "data" in e:  # the graph's weights in an external data file (shared-weights exports)
            d = e["data"]
            if not isinstance(d, dict) or not isinstance(d.get("file"), str) or not isinstance(d.get("sha256"), str) \
                    or not _is_int(d.get("bytes")):
                raise ExportError(f"{where}: {field}.data must be an object with 'file', 'sha256' and 'bytes'")
            _check_file_name(d["file"], f"{where}: {field}.data.file")
            if d["file"] in files:
                raise ExportError(f"{where}: {field}.data.file {d['file']!r} is also the file of {files[d['file']]}")
            files[d["file"]] = name
        for side in ("inputs", "outputs"):
            for j, io in enumerate(e[side]):
                if not isinstance(io, dict) or not isinstance(io.get("name"), str) or not isinstance(io.get("shape", []), list):
                    raise ExportError(f"{where}: {field}.{side}[{j}] must be an object with a 'name' and a 'shape'")
    _check_file_name(m.get("tokenizer", "tokenizer.json"), f"{where}: tokenizer")
    return m


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _check_file_name(name: str, what: str) -> None:
    """Graph and tokenizer files are plain names inside the export folder: no paths, no '..'."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ExportError(f"{what} {name!r} must be a plain file name inside the export folder")


# Bounds of a manifest.json, checked before (size) and while (depth) it is parsed. A real manifest is a few
# tens of KB (~1 KB per graph) and 6 levels deep; these leave wide room and keep a hostile file from costing
# memory, time or a RecursionError.
MAX_MANIFEST_BYTES = 8 << 20
MAX_MANIFEST_DEPTH = 32


def _json_depth(v) -> int:
    """Nesting depth of a parsed JSON value (iterative: never recurses)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_MANIFEST_DEPTH:
                stack.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def load_manifest_json(p: Path):
    """The parsed JSON of a manifest file, bounded: refused unread past MAX_MANIFEST_BYTES, refused past
    MAX_MANIFEST_DEPTH levels of nesting (ExportError, never RecursionError or MemoryError)."""
    p = Path(p)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)  # at most the limit, even if the file grows meanwhile
    except OSError as e:
        raise ExportError(f"{p} cannot be read: {e}") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ExportError(f"{p} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; a manifest is a few KB: refused "
                          "unparsed")
    try:
        m = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ExportError(f"{p} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise ExportError(f"{p} is not valid JSON: {e}") from e
    except RecursionError:
        raise ExportError(f"{p} nests deeper than {MAX_MANIFEST_DEPTH} levels; refused") from None
    if _json_depth(m) > MAX_MANIFEST_DEPTH:
        raise ExportError(f"{p} nests deeper than {MAX_MANIFEST_DEPTH} levels; refused")
    return m


def read_manifest(folder) -> dict:
    """The checked manifest of an export folder (ExportError if it is missing, unreadable, malformed, larger
    than MAX_MANIFEST_BYTES or nested deeper than MAX_MANIFEST_DEPTH)."""
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        raise ExportError(f"{folder} is not a chattts-ort export: {MANIFEST} is missing")
    return check_manifest(load_manifest_json(p), str(p))


def graph_path(folder: Path, entry: dict) -> Path:
    """The graph file of a manifest entry, confined to the folder (symlinks out of it are refused)."""
    folder = Path(folder)
    p = folder / entry["file"]
    if p.resolve().parent != folder.resolve():
        raise ExportError(f"{p}: resolves outside the export folder {folder}")
    return p


def check_files(folder, manifest: dict, hashes: bool = True) -> None:
    """Every graph named by the manifest exists in the folder with the recorded size (and sha256)."""
    folder = Path(folder)
    for name, e in iter_all_graphs(manifest):
        for what, f in [("graph", e)] + ([("weight data", e["data"])] if "data" in e else []):
            p = graph_path(folder, f)
            if not p.is_file():
                raise ExportError(f"{p}: {what} of '{name}' named in the manifest is missing")
            if p.stat().st_size != f["bytes"]:
                raise ExportError(f"{p}: size {p.stat().st_size} does not match the manifest ({f['bytes']}); "
                                  "the file is corrupt or from another export")
            if hashes and sha256_file(p) != f["sha256"]:
                raise ExportError(f"{p}: sha256 does not match the manifest; the file is corrupt or from another "
                                  "export")
    tok = folder / manifest.get("tokenizer", "tokenizer.json")
    if not tok.is_file():
        raise ExportError(f"{tok}: tokenizer named in the manifest is missing")


def open_export(folder, hashes: bool = True) -> dict:
    """read_manifest + check_files: what every consumer of an export folder (runtime, quantize, verify) does
    before it reads a graph."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder not found: {folder}")
    m = read_manifest(folder)
    check_files(folder, m, hashes=hashes)
    return m


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 11: "float64", 3: "int8", 2: "uint8"}


def graph_io(path: os.PathLike) -> dict:
    """Names, dtypes and shapes of a graph's inputs and outputs (read without loading the weights)."""
    import onnx

    return _io_of(onnx.load(str(path), load_external_data=False))


def _io_of(m) -> dict:
    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    init = {i.name for i in m.graph.initializer}
    return {"inputs": [one(v) for v in m.graph.input if v.name not in init], "outputs": [one(v) for v in m.graph.output]}


def _external_data_files(m) -> list:
    """The external data files a graph's initializers name (none for a self-contained graph)."""
    import onnx

    files = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.update(kv.value for kv in t.external_data if kv.key == "location")
    return sorted(files)


def graph_entry(folder: Path, file: str, precision: str = "fp32") -> dict:
    """The manifest entry of a graph file: its sha256, size, precision and IO (read from the file), and its
    external data file (`data`: file, sha256, bytes) when its weights live beside it."""
    import onnx

    p = folder / file
    entry = {"file": file, "sha256": sha256_file(p), "bytes": p.stat().st_size, "precision": precision}
    model = onnx.load(str(p), load_external_data=False)  # the graph only, once
    entry.update(_io_of(model))
    data = _external_data_files(model)
    if len(data) > 1:
        raise ExportError(f"{p}: weights spread over {len(data)} external files; chattts-ort exports keep one")
    if data:
        _check_file_name(data[0], f"{p}: external data")
        d = folder / data[0]
        entry["data"] = {"file": data[0], "sha256": sha256_file(d), "bytes": d.stat().st_size}
    return entry


def rewrite_graph_entries(manifest: dict, folder: Path, precision_of) -> dict:
    """A copy of `manifest` whose graph entries describe the files now in `folder` (after a tool rewrote
    them); precision_of(block name, old entry) gives each block's precision."""
    m = json.loads(json.dumps(manifest))
    g = m["graphs"]
    for name, e in list(iter_all_graphs(manifest)):
        new = graph_entry(Path(folder), e["file"], precision_of(name, e))
        if name.startswith("layer_"):
            g["layers"][int(name[6:])] = new
        elif name in AUDIO_BLOCKS:
            m["audio"]["graphs"][name] = new
        else:
            g[name] = new
    return m


def write_manifest(folder: Path, manifest: dict) -> None:
    check_manifest(manifest, str(Path(folder) / MANIFEST))
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def is_export(folder) -> bool:
    p = Path(folder) / MANIFEST
    try:
        return load_manifest_json(p).get("format", "").startswith("chattts-ort/")
    except (ExportError, OSError, ValueError, AttributeError):
        return False


# Files chattts-ort itself writes into an export folder besides those its manifest names: the reports of
# `verify` (and of the quantization report, `verify --against`).
REPORT_FILES = ("verify.json", "quant_report.png")


def export_foreign_files(folder) -> list:
    """Names in an export folder that neither its manifest (graphs, weight data, tokenizer, the manifest
    itself) nor REPORT_FILES account for: what `--force` must not delete. A manifest that cannot be checked
    names nothing but itself."""
    folder = Path(folder)
    ours = {MANIFEST, *REPORT_FILES}
    try:
        m = read_manifest(folder)
    except ExportError:
        m = None
    if m is not None:
        ours.add(m.get("tokenizer", "tokenizer.json"))
        for _, e in iter_all_graphs(m):
            ours.add(e["file"])
            if "data" in e:
                ours.add(e["data"]["file"])
    foreign = []
    for p in sorted(folder.iterdir()):
        lm = _LEFTOVER.match(p.name)  # a report write killed half-way (.verify.json.tmp-PID-*)
        name = lm.group("name") if lm else p.name
        if name in ours and (p.is_symlink() or not p.is_dir()):
            continue
        foreign.append(p.name + ("/" if p.is_dir() and not p.is_symlink() else ""))
    return foreign


# ----------------------------------------------------------------------------------------------------------
# Atomic folder writes.
#
# A folder is built in a hidden sibling ".NAME.tmp-PID-XXXX" and moved into place only when complete. With
# force, an existing folder is replaced only if `replaceable` says it is one of ours (or it is empty) and, for an
# export, it holds nothing its manifest does not name (export_foreign_files): it is renamed aside to
# ".NAME.old-PID-XXXX", the new one is moved in, then the old one is deleted. Single files (reports, `say`'s
# audio) are written to ".NAME.tmp-PID-XXXX[.ext]" and renamed. Siblings of these kinds whose writer process no
# longer runs (kill -9) are removed by the next write beside them; another live process's never are.

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]*$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_leftovers(out: Path) -> list:
    """Delete the temporary siblings of `out` (folders or files) whose writer process is gone; returns what was
    removed."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{glob_escape(out.name)}.*-*"):
        m = _LEFTOVER.match(p.name)
        if not m or m.group("name") != out.name or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed


def glob_escape(s: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", s)


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """An empty file ".NAME.tmp-PID-XXXX<suffix>" beside `path` (after removing dead writers' leftovers)."""
    path = Path(path)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE = 1 << 20


def is_no_space(exc: BaseException, where=None) -> bool:
    """Whether a failed write ran out of space: an OSError ENOSPC/EDQUOT anywhere in the exception's chain, a
    message that says so (C++ writers: torch, ONNX Runtime), or, for other errors from a writer, a file system
    at `where` with less than 1 MiB left."""
    e, seen = exc, 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if "no space left on device" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    if where is not None and isinstance(exc, Exception):
        try:
            st = os.statvfs(where)
            return st.f_bavail * st.f_frsize < _LOW_SPACE
        except OSError:
            return False
    return False


def _written(exc: BaseException, tmp: Path, out: Path) -> Path:
    """The file a failed write was writing, named as it would have been in `out`."""
    name = getattr(exc, "filename", None)
    if name:
        try:
            return out / Path(name).resolve().relative_to(Path(tmp).resolve())
        except (ValueError, OSError):
            pass
    return out


def no_space_error(what) -> ExportError:
    return ExportError(f"no space left on device while writing {what}; nothing was replaced")


def check_output_folder(out, force: bool, replaceable: Callable[[Path], bool] = is_export,
                        what: str = "a chattts-ort export") -> Path:
    """Refuse output paths that must never be written or replaced; returns the path."""
    raw = str(out) if out is not None else ""
    if raw.strip() in ("", ".", ".."):
        raise ExportError(f"output folder {raw!r} is not a folder name (give a new folder, e.g. ./my-export)")
    out = Path(out)
    res = out.resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if res == Path(res.anchor) or res == home or cwd == res or res in cwd.parents:
        raise ExportError(f"refusing to write to {out} ({res}): it is the root, the home folder, the working "
                          "folder or one of its parents")
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; give the real folder")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if not force:
            raise ExportError(f"{out} already exists (use --force to replace it)")
        if any(out.iterdir()):
            if not replaceable(out):
                raise ExportError(f"{out} exists and is not {what}; --force replaces only {what} or an empty "
                                  "folder (remove it yourself if you mean it)")
            if replaceable is is_export:
                foreign = export_foreign_files(out)
                if foreign:
                    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
                    raise ExportError(f"{out} holds files its manifest does not name: {', '.join(foreign[:5])}{more}; "
                                      "--force replaces only what the exporter wrote (move them out, or remove the "
                                      "folder yourself)")
    return out


@contextmanager
def atomic_folder(out, force: bool = False, replaceable: Callable[[Path], bool] = is_export,
                  what: str = "a chattts-ort export"):
    """Yields a temporary folder to fill; on success it becomes `out` (see the note above this function). A
    write that runs out of space raises ExportError ("no space left on device while writing X; nothing was
    replaced"), with the temporary folder removed and an earlier `out` untouched."""
    out = check_output_folder(out, force, replaceable, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tag = f"{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag}", dir=out.parent))
    except OSError as e:
        if is_no_space(e):
            raise no_space_error(out) from e
        raise
    old: Optional[Path] = None
    try:
        yield tmp
        try:
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{tag}", dir=out.parent))
                os.replace(out, old / "x")  # rename: same file system, never a copy
            os.replace(tmp, out)
        except BaseException:
            if old is not None and (old / "x").exists() and not out.exists():
                os.replace(old / "x", out)
            raise
    except BaseException as e:
        # Out of space: said in one line. The statvfs test is only for errors of writers we do not know (torch,
        # ONNX Runtime); our own errors say what they are.
        full = isinstance(e, Exception) and not isinstance(e, ExportError) and is_no_space(
            e, None if isinstance(e, ChatTTSOrtError) else tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise no_space_error(_written(e, tmp, out)) from e
        raise
    finally:
        if old is not None and (out.exists() or not (old / "x").exists()):
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """A file written to a sibling and renamed into place (a report is never half-written). Out of space:
    ExportError, the earlier file untouched."""
    path = Path(path)
    tmp = None
    try:
        tmp = temp_sibling(path)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and is_no_space(e):
            raise no_space_error(path) from e
        raise


def private_copy(folder) -> Path:
    """A copy, in a new temporary folder ($TMPDIR), of the files an export's manifest names (graphs, weight
    data, tokenizer, manifest): what Runtime.load(share_weights=False) loads from and then deletes, so that no
    other process can truncate or rewrite the pages it maps. The caller removes the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder not found: {folder}")
    m = read_manifest(folder)
    names = [MANIFEST, m.get("tokenizer", "tokenizer.json")]
    for _, e in iter_all_graphs(m):
        names += [e["file"]] + ([e["data"]["file"]] if "data" in e else [])
    tmp = Path(tempfile.mkdtemp(prefix=f"chattts-ort-private-{os.getpid()}-"))
    try:
        for n in names:
            src = graph_path(folder, {"file": n})
            if src.is_file():  # a missing one is named by open_export on the copy
                shutil.copyfile(src, tmp / n)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and is_no_space(e):
            raise ExportError(f"no space left on device while copying {folder} for share_weights=False "
                              f"(into {tmp.parent}; set TMPDIR elsewhere)") from e
        raise
    return tmp


# ----------------------------------------------------------------------------------------------------------
# Block tags: each graph file carries the name of the block it was exported as, in its ONNX metadata.


def tag_graph(model, block: str):
    """Set the block tag of an onnx.ModelProto (in place); returns it."""
    for p in list(model.metadata_props):
        if p.key == BLOCK_METADATA_KEY:
            model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = BLOCK_METADATA_KEY, block
    return model


def tag_graph_file(path: Path, block: str) -> None:
    """Re-tag a graph file in place (after a tool that may drop metadata, e.g. an optimiser)."""
    import onnx

    model = onnx.load(str(path))
    onnx.save(tag_graph(model, block), str(path))


def block_tag(path: Path) -> Optional[str]:
    """The block tag of a graph file (read without its weights), or None."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == BLOCK_METADATA_KEY), None)
