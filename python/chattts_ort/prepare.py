"""The model a command runs: `--model` resolved into a ready export folder, exported and quantized once.

`--model` (say, serve, demo) takes:
- nothing: ChatTTS's real model (2Noise/ChatTTS) when it is cached or can be downloaded, else (offline) the
  random default model of ChatTTS's exact shape, said in one line;
- `2Noise/ChatTTS[@revision]` or any Hub repository of ChatTTS's asset layout: fetched and verified (hub.py);
- a ChatTTS asset folder (asset/gpt/config.json, ...);
- `random` / `random-tiny`: the seeded random default (tiny: the tests' shape);
- an export folder (manifest.json): used as it is.
Every source but the last is exported once per (its files' hashes, layer form, package version) into the cache and
then run at the fastest precision whose quantization report passes (int4, else int8, else fp32; a report whose
failure is known for the source, KNOWN_REPORTS, is not made again). A file lock per
cache entry makes a second process that starts meanwhile wait for the first instead of exporting again.

This module composes export/, checks/ and the Hub; like cli.py it sits above the rest of the package.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import hub
from .defaults import cache_dir, default_export_dir
from .errors import AssetError
from .format import MANIFEST
from .version import __version__

# The demo's default model runs at the fastest precision whose quantization report passes: greedy agreement
# with fp32 over the report's 200 teacher-forced steps of at least this (the goal of the quantization issue).
DEMO_AGREEMENT = 0.95
# Seconds to wait for the Hub to answer whether the default model can be downloaded.
PROBE_TIMEOUT = 5.0


@dataclass
class Prepared:
    folder: Path   # the export folder to load
    why: str       # one line for the user: which model, at which precision, and why

    @property
    def random(self) -> bool:
        """Whether the export was made from the seeded random model (its speech is noise; it ends at random)."""
        try:
            return json.loads((self.folder / MANIFEST).read_text()).get("source") in ("random", "random-tiny")
        except (OSError, ValueError):
            return False


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


@contextmanager
def cache_lock(name: str, progress: bool = True):
    """Held while one cache entry is made: a second process waits here, and then finds it made."""
    from filelock import FileLock, Timeout

    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(progress, f"another process is preparing {name}; waiting for it ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def export_cached(src, name: str, progress: bool = True, layer_form: str = "fused") -> Path:
    """The fp32 export of `src` (an asset folder, or "random" / "random-tiny") under cache_dir()/exports/NAME,
    made once."""
    from .export.exporter import export_model

    folder = cache_dir() / "exports" / name
    if (folder / MANIFEST).is_file():
        return folder
    with cache_lock(folder.name, progress):
        if not (folder / MANIFEST).is_file():
            _say(progress, f"first use: exporting {src} to {folder} ...")
            export_model(src, folder, force=True, progress=progress, layer_form=layer_form)
    return folder


# Quantization reports whose outcome is known before they are made, per source the demo exports and precision:
# the agreement measured. The random default model is a pure function of (seed 0, ChatTTS's shape, this package),
# and its int4 report fails by a wide margin: 89.5-89.8% greedy agreement with fp32 on the machines measured, against
# the 95% it needs (int8: 98%). Quantizing to int4 and checking it (about 20 s, a quarter of the first `make demo`)
# would only produce that known failure, so the random default starts at int8 (tests/test_build.py re-measures the
# int4 report, slow, so that this entry cannot go stale unnoticed). A real model (the Hub's, an asset folder) has no
# entry: its outcome is unknown until measured, and the rule stays "the fastest precision that passes". A report
# that was measured and cached for the same export still wins over this table.
KNOWN_REPORTS = {"random": {"int4": 0.895}}


def _saved_report(path: Path, fp32: Path) -> Optional[dict]:
    """The quantization report cached in `path` if it was made against `fp32` over the 200 steps, else None."""
    report = path / "verify.json"
    try:
        saved = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("against") != str(fp32) or saved.get("chain", {}).get("steps") != 200:
        return None
    return saved


def fastest_passing(fp32: Path, progress: bool = True, known: Optional[dict] = None):
    """(export folder, why) for an fp32 export: int4 if its quantization report passes, else int8, else fp32.
    Quantizes and writes each report once (cached beside the fp32 export). `known` maps a precision to the
    agreement its report is known to reach for this source (KNOWN_REPORTS): a precision known to fail is not
    quantized nor checked again, unless a report of it is already cached (then that report decides)."""
    from .checks.verify import verify_export
    from .export.quantize import quantize_export

    known = known or {}
    failed = []
    for prec in ("int4", "int8"):
        path = fp32.parent / f"{fp32.name}-{prec}"
        saved = _saved_report(path, fp32) if (path / MANIFEST).is_file() else None
        if saved is None and prec in known and known[prec] < DEMO_AGREEMENT:
            failed.append(f"{prec} {100 * known[prec]:.1f}% does not (known for this model, not re-measured)")
            continue
        if saved is None:
            with cache_lock(path.name, progress):
                if not (path / MANIFEST).is_file():
                    _say(progress, f"first use: quantizing {fp32.name} to {prec} ...")
                    quantize_export(fp32, path, plan=prec, force=True, progress=False)
                saved = _saved_report(path, fp32)
                if saved is None:
                    _say(progress, f"first use: checking {prec} against fp32 (the quantization report) ...")
                    verify_export(path, against=fp32, steps=200)
                    saved = json.loads((path / "verify.json").read_text())
        agreement = saved["chain"]["agreement"]
        if agreement >= DEMO_AGREEMENT:
            why = (f"precision {prec}: the fastest that passes the quantization report (greedy agreement with fp32 "
                   f"{100 * agreement:.1f}% >= {100 * DEMO_AGREEMENT:.0f}%"
                   + (f"; {', '.join(failed)}" if failed else "") + ")")
            return path, why
        failed.append(f"{prec} {100 * agreement:.1f}% does not")
    return fp32, f"precision fp32: no quantized precision passes the quantization report ({', '.join(failed)})"


def demo_model(kind: str = "full", progress: bool = True):
    """(export folder, why) of the random default model at its fastest passing precision."""
    src = "random" if kind == "full" else "random-tiny"
    fp32 = default_export_dir(kind)
    fp32 = export_cached(src, fp32.name, progress)
    return fastest_passing(fp32, progress, known=KNOWN_REPORTS.get(src))


def _hub_export_name(model: "hub.HubModel", layer_form: str) -> str:
    return f"{model.spec.repo_id.replace('/', '--')}-{model.source_key[:12]}-{layer_form}-v{__version__}"


def from_hub(spec, progress: bool = True, local_only: bool = False, layer_form: str = "fused") -> Prepared:
    model = hub.fetch(spec, progress=progress, local_only=local_only)
    fp32 = export_cached(model.asset_dir, _hub_export_name(model, layer_form), progress, layer_form)
    folder, why = fastest_passing(fp32, progress)
    return Prepared(folder, f"model {model.spec} (commit {model.commit[:10]}); {why}")


def from_asset_folder(path: Path, progress: bool = True, layer_form: str = "fused") -> Prepared:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
    hashes = {p.relative_to(path).as_posix(): hub.file_sha256(p) for p in files}
    name = f"asset-{hub.source_key(hashes)[:12]}-{layer_form}-v{__version__}"
    fp32 = export_cached(Path(path), name, progress, layer_form)
    folder, why = fastest_passing(fp32, progress)
    return Prepared(folder, f"model {path} (asset folder); {why}")


def default_model(progress: bool = True) -> Prepared:
    """ChatTTS's real model when cached or downloadable, else the random default (said in one line)."""
    spec = hub.HubSpec(hub.CHATTTS_REPO)
    try:
        return from_hub(spec, progress, local_only=True)
    except hub.HubOffline:
        pass
    why_not = hub.unreachable(spec, timeout=PROBE_TIMEOUT)
    if why_not is None:
        _say(progress, f"downloading ChatTTS's weights ({spec}, about 1.1 GB) into the Hugging Face cache "
                       "(--model random: the random default model instead) ...")
        return from_hub(spec, progress)
    folder, why = demo_model(progress=progress)
    _say(progress, f"{spec} is not cached and {why_not}: speaking with the random default model (random weights, "
                   "ChatTTS's shape: not speech)")
    return Prepared(folder, f"model random (ChatTTS's shape, random weights); {why}")


def resolve_model(spec: Optional[str] = None, progress: bool = True) -> Prepared:
    """An export folder for `--model SPEC` (see the module docstring)."""
    if spec is None:
        return default_model(progress)
    s = str(spec)
    if s in ("random", "random-tiny"):
        folder, why = demo_model("full" if s == "random" else "tiny", progress)
        return Prepared(folder, f"model {s}; {why}")
    path = Path(os.path.expanduser(s))
    if (path / MANIFEST).is_file():
        return Prepared(path, f"model {path}")
    from .export.assets import is_asset_folder

    if is_asset_folder(path):
        return from_asset_folder(path, progress)
    parsed = hub.parse_spec(s)
    if parsed is not None:
        return from_hub(parsed, progress)
    if path.exists():
        raise AssetError(f"--model {s}: neither an export folder (no {MANIFEST}) nor a ChatTTS asset folder "
                         "(no gpt/config.json and Embed.safetensors)")
    raise AssetError(f"--model {s}: folder not found, and not a Hub model id (owner/name[@revision]) nor random")


def load_model(spec: Optional[str] = None, progress: bool = True, **load_options):
    """`Runtime.load` of what `--model SPEC` names (resolve_model): e.g. load_model("2Noise/ChatTTS") fetches,
    verifies, exports and quantizes ChatTTS's model once, then loads it. load_options go to Runtime.load."""
    from .runtime import Runtime

    prepared = resolve_model(spec, progress=progress)
    if progress:
        print(prepared.why, flush=True)
    return Runtime.load(prepared.folder, **load_options)
