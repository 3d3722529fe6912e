"""Less RAM than the weights: decode under a memory limit, plain export against its shared-weights form.

    sudo python bench/low_memory.py [--model full] [--precisions int8] [--limits-mb 0 1024 768 512 384 256]

A `chattts-ort share-weights` export keeps every block's weights (with ONNX Runtime's pre-packed forms) in a data
file that the process maps: those pages are file-backed, so under memory pressure the kernel can drop the blocks
not in use and read them back when their turn comes, i.e. only some blocks stay resident. A plain export packs its
weights into the process's own heap, which (without swap) cannot shrink. This script runs the decode probe of
bench/decode_probe.py in a fresh memory cgroup per run (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`;
needs root) with each limit (0 = none), after evicting the export's files from the page cache (so no earlier run's
cached pages ride along uncharged), and reports whether it completed, ms/step (median, p99), the load time, the
cgroup's peak memory and how often the limit was hit. A run that takes longer than --timeout is stopped and
reported as such. Results: bench/results/DATE-low-memory-MODEL.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_probe import _PROBE, write_results  # noqa: E402

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def _cgroup_root():
    """(kind, parent folder) of a memory cgroup hierarchy this process may create groups in, or (None, why)."""
    if os.geteuid() != 0:
        return None, "needs root (it creates memory cgroups)"
    if (V2 / "cgroup.controllers").is_file() and "memory" in (V2 / "cgroup.controllers").read_text().split():
        return "v2", V2
    if (V1 / "memory.limit_in_bytes").is_file():
        return "v1", V1
    return None, "no writable memory cgroup hierarchy (/sys/fs/cgroup)"


class MemoryGroup:
    """A fresh memory cgroup with a limit; `preexec` moves a child process into it before it runs anything."""

    def __init__(self, kind: str, root: Path, name: str, limit_mb: int):
        self.kind, self.path = kind, root / name
        self.path.mkdir()
        if limit_mb:
            b = str(limit_mb * 2**20)
            if kind == "v2":
                (self.path / "memory.max").write_text(b)
                if (self.path / "memory.swap.max").exists():
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(b)

    def preexec(self):
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        if self.kind == "v2":
            peak = self.path / "memory.peak"
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return {"peak_mb": int(peak.read_text()) / 2**20 if peak.exists() else None,
                    "limit_hits": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}
        return {"peak_mb": int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20,
                "limit_hits": int((self.path / "memory.failcnt").read_text()), "oom_kills": None}

    def remove(self):
        for _ in range(50):  # the group empties a moment after its last process exits
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (clean pages that no process maps)."""
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_limited(kind, root, export: str, limit_mb: int, steps: int, timeout: float) -> dict:
    import json

    evict(Path(export))
    group = MemoryGroup(kind, root, f"chattts-low-memory-{os.getpid()}-{time.monotonic_ns()}", limit_mb)
    t0 = time.perf_counter()
    try:
        p = subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps({"export": export, "steps": steps,
                                                                         "threads": 2, "audio": False})],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=group.preexec)
        try:
            out, err = p.communicate(timeout=timeout)
            status = "ok" if p.returncode == 0 else ("killed (out of memory)" if p.returncode < 0
                                                     else f"failed (exit {p.returncode})")
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            status = f"stopped after {timeout:.0f} s"
        row = {"status": status, "wall_s": time.perf_counter() - t0, **group.stats()}
        if status == "ok":
            row.update(json.loads(out.strip().splitlines()[-1]))
        elif status.startswith("failed"):
            row["error"] = err[-500:]
        return row
    finally:
        group.remove()


def main(argv=None) -> int:
    from shared_weights import shared_for
    from streams import cpu_name, export_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="full", choices=["full", "tiny"])
    ap.add_argument("--precisions", nargs="+", default=["int8"])
    ap.add_argument("--limits-mb", nargs="+", type=int, default=[0, 1024, 768, 512, 384, 256])
    ap.add_argument("--forms", nargs="+", choices=["plain", "shared"], default=["plain", "shared"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    kind, root = _cgroup_root()
    if kind is None:
        print(f"bench/low_memory.py: {root}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc)
    rows = []
    for prec in args.precisions:
        plain = export_for(args.model, prec)
        forms = {"plain": plain, "shared": shared_for(plain)}
        for form in args.forms:
            folder = Path(forms[form])
            on_disk = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            gpt = sum(p.stat().st_size for p in folder.iterdir()
                      if not p.name.startswith(("audio_", "decoder", "vocos"))) / 2**20
            for limit in args.limits_mb:
                row = {"precision": prec, "form": form, "limit_mb": limit, "gpt_files_mb": gpt,
                       "folder_mb": on_disk, **run_limited(kind, root, str(folder), limit, args.steps, args.timeout)}
                rows.append(row)
                speed = (f"{row['median']:.2f} ms/step (p99 {row['p99']:.2f}), load {row['load_s']:.1f} s"
                         if row["status"] == "ok" else "")
                print(f"{prec} {form:6s} limit {limit or 'none':>5} MB: {row['status']:24s} {speed} "
                      f"peak {row['peak_mb']:.0f} MB, limit hit {row['limit_hits']} times", flush=True)
    res = {"date": stamp.isoformat(timespec="seconds"), "machine": cpu_name(), "model": args.model, "cgroup": kind,
           "steps": args.steps, "rows": rows,
           "command": "python bench/low_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [f"#### Decode under a memory limit ({args.model} model), {res['date']} on {res['machine']}", "",
             "The GPT's graph and data files (what a codes-only load maps or reads; the audio graphs are not "
             "loaded) against the cgroup's limit; each run in a fresh cgroup after evicting the files from the "
             "page cache.", "",
             "| precision | form | GPT files MB | limit MB | result | ms/step median | p99 | load s | peak MB | "
             "limit hit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = (f"{r['median']:.2f} | {r['p99']:.2f} | {r['load_s']:.1f}" if r["status"] == "ok" else "- | - | -")
        lines.append(f"| {r['precision']} | {r['form']} | {r['gpt_files_mb']:.0f} | {r['limit_mb'] or 'none'} | "
                     f"{r['status']} | {speed} | {r['peak_mb']:.0f} | {r['limit_hits']} |")
    lines += ["", f"Command: `{res['command']}`"]
    write_results(Path(args.out) / f"{stamp:%Y-%m-%d}-low-memory-{args.model}", res, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
