"""Memory: what loading an export folder costs, against the bytes of its weights (`chattts-ort memory`)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .format import iter_graphs, read_manifest

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
    data = [str(folder / e["data"]["file"]) for _, e in iter_graphs(manifest) if "data" in e]
    weights = sum(Path(f).stat().st_size for f in files + data)
    return RSSReport(folder, via, not disable_prepacking, weights, got["before"], got["after"], got["peak"])


_HOLD_PROBE = r"""
import json, sys
args = json.loads(sys.argv[1])
import numpy, onnxruntime
keep = None
if args["folder"]:
    from chattts_ort import Runtime
    keep = Runtime.load(args["folder"], threads=1, max_context=args["max_context"], audio=args["audio"])
print("ready", flush=True)
sys.stdin.readline()  # hold the loaded model until the parent has measured every process
"""


def _smaps_rollup(pid: int) -> dict:
    """Rss, Pss and private bytes of a live process (the kernel's own accounting of shared pages)."""
    got = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"):
                got[k] = int(v.split()[0]) * 1024
    return {"rss": got["Rss"], "pss": got["Pss"], "private": got["Private_Clean"] + got["Private_Dirty"],
            "shared": got["Shared_Clean"] + got["Shared_Dirty"]}


def _mapped_from(pid: int, folder: Path) -> dict:
    """Bytes of `folder`'s files resident in PID's mappings: Rss (shared with every process mapping them) and
    Private_Dirty (pages the process wrote, so no longer the file's)."""
    root, rss, dirty, current = str(Path(folder).resolve()) + "/", 0, 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: range perms offset dev inode path
                parts = line.split()
                current = len(parts) >= 6 and parts[5].startswith(root)
            elif current and first == "Rss:":
                rss += int(line.split()[1]) * 1024
            elif current and first == "Private_Dirty:":
                dirty += int(line.split()[1]) * 1024
    return {"mapped_rss": rss, "mapped_private_dirty": dirty}


@dataclass
class SharedReport:
    folder: Optional[Path]   # None: the baseline (interpreter, numpy, onnxruntime; no model)
    processes: int
    each: list               # _smaps_rollup of every process while all of them hold the model

    @property
    def pss_total(self) -> int:
        """What the N processes together cost the machine: the sum of their proportional set sizes."""
        return sum(e["pss"] for e in self.each)

    def to_json(self) -> dict:
        return {"folder": str(self.folder) if self.folder else None, "processes": self.processes,
                "pss_total": self.pss_total, "each": self.each}


def shared_memory(folder, processes: int = 4, max_context: int = 16, audio: Optional[bool] = None,
                  timeout: float = 600) -> SharedReport:
    """Load `folder` in PROCESSES fresh processes at once and measure, while all of them hold it, each one's
    Rss / Pss / private bytes (Linux /proc/PID/smaps_rollup). Pss splits every shared page among the processes
    that map it, so the sum of Pss is what the N processes cost together; a model whose weights are shared
    (`chattts-ort share-weights`) adds its weights once, not N times. folder None: the baseline (no model)."""
    if not Path("/proc/self/smaps_rollup").exists():
        raise RuntimeError("shared_memory reads /proc/PID/smaps_rollup (Linux only)")
    if not isinstance(processes, int) or not 1 <= processes <= 64:
        raise ValueError(f"processes must be an integer in [1, 64], got {processes!r}")
    if folder is not None:
        read_manifest(folder)  # a clear error before N processes fail the same way
    args = json.dumps({"folder": str(folder) if folder else None, "max_context": int(max_context), "audio": audio})
    procs = [subprocess.Popen([sys.executable, "-c", _HOLD_PROBE, args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    try:
        for p in procs:
            line = _readline(p, timeout)
            if line.strip() != "ready":
                raise RuntimeError(f"shared_memory: loading {folder} failed:\n{p.stderr.read()[-2000:]}")
        each = [_smaps_rollup(p.pid) for p in procs]
        if folder is not None:
            for e, p in zip(each, procs):
                e.update(_mapped_from(p.pid, Path(folder)))
    finally:
        for p in procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return SharedReport(Path(folder) if folder else None, processes, each)


def _readline(p: subprocess.Popen, timeout: float) -> str:
    import select

    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        p.kill()
        raise RuntimeError(f"shared_memory: a process did not finish loading in {timeout:.0f} s")
    return p.stdout.readline()
