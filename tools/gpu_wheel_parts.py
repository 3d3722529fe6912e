#!/usr/bin/env python
"""Carry ONNX Runtime's GPU build to a lent device machine that reaches no package registry.

The device machine (see the workplace's device tool) takes at most 64 MiB of working tree per call and stays
warm ~30 s between calls. onnxruntime-gpu's wheel is ~255 MB, so:

    python tools/gpu_wheel_parts.py pack            # here: download the wheel, keep its shared libraries,
                                                    # compress (xz) and split into parts under .gpu_parts/
    python tools/gpu_wheel_parts.py commands        # print the device command for each part, then the last
                                                    # command that reassembles the libraries in /tmp/ortgpu
    python tools/gpu_wheel_parts.py unpack DIR      # (on the device, or here to check) reassemble + verify

.gpu_parts/ is git-ignored; carry one part per call (`carry: [".gpu_parts/part-NNN"]`), back to back, and
the reassembled /tmp/ortgpu/ survives while the machine stays warm. Then point chattts-ort at the library:
CHATTTS_ORT_LIBRARY=/tmp/ortgpu/libonnxruntime.so.<version>. The CUDA runtime, cuBLAS and cuDNN the library
needs come from the device image's own Python packages (nvidia-* for CUDA 13): add their lib folders to
LD_LIBRARY_PATH (the `commands` output does).

What is known of the device image (from the workplace's device notes, not verified by this project yet):
Python 3.12 at /opt/torch/.venv/bin/python3 with torch 2.11+cu130, onnxruntime 1.30 (CPU), nvidia-cublas,
nvidia-cudnn-cu13 and nvidia-cuda-runtime; driver 580; no registry access.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PART_BYTES = 60 * 2**20
KEEP = ("libonnxruntime.so", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_libraries(wheel: Path, out: Path) -> dict:
    """Shared libraries of the wheel -> tar.xz split into parts + parts.json (sha256 of every piece)."""
    buf = io.BytesIO()
    names = []
    with zipfile.ZipFile(wheel) as z, tarfile.open(fileobj=buf, mode="w") as tar:
        for info in z.infolist():
            base = Path(info.filename).name
            if "/capi/" in info.filename and any(base.startswith(k) for k in KEEP):
                data = z.read(info)
                ti = tarfile.TarInfo(base)
                ti.size = len(data)
                ti.mode = 0o755
                tar.addfile(ti, io.BytesIO(data))
                names.append(base)
    if not any(n.startswith("libonnxruntime.so") for n in names):
        raise SystemExit(f"{wheel} holds no libonnxruntime.so")
    packed = lzma.compress(buf.getvalue(), preset=6)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    parts = []
    for i in range(0, len(packed), PART_BYTES):
        p = out / f"part-{i // PART_BYTES:03d}"
        p.write_bytes(packed[i:i + PART_BYTES])
        parts.append({"file": p.name, "sha256": _sha(p.read_bytes()), "bytes": p.stat().st_size})
    meta = {"wheel": wheel.name, "libraries": names, "tar_xz_sha256": _sha(packed), "parts": parts}
    (out / "parts.json").write_text(json.dumps(meta, indent=2))
    return meta


def unpack(parts_dir: Path, dest: Path) -> list:
    meta = json.loads((parts_dir / "parts.json").read_text())
    blob = b""
    for p in meta["parts"]:
        data = (parts_dir / p["file"]).read_bytes()
        if _sha(data) != p["sha256"]:
            raise SystemExit(f"{p['file']}: sha256 mismatch (a part is damaged or missing)")
        blob += data
    if _sha(blob) != meta["tar_xz_sha256"]:
        raise SystemExit("reassembled archive: sha256 mismatch")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(blob))) as tar:
        tar.extractall(dest, filter="data")
    return sorted(p.name for p in dest.iterdir())


def download_wheel(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
           "--platform", "manylinux_2_17_x86_64", "-d", str(dest), f"onnxruntime-gpu=={version}"]
    subprocess.run(cmd, check=True)
    return next(dest.glob("onnxruntime_gpu-*.whl"))


def commands(parts_dir: Path) -> str:
    meta = json.loads((parts_dir / "parts.json").read_text())
    lines = ["# one device call per line, back to back (the machine stays warm ~30 s between calls)"]
    for p in meta["parts"]:
        lines.append(f'carry=[".gpu_parts/{p["file"]}", ".gpu_parts/parts.json"]  command: '
                     f'mkdir -p /tmp/ortparts && cp .gpu_parts/{p["file"]} .gpu_parts/parts.json /tmp/ortparts/')
    lines.append(
        'last call: python3 tools/gpu_wheel_parts.py unpack /tmp/ortparts --dest /tmp/ortgpu && '
        'export LD_LIBRARY_PATH=$(python3 -c "import nvidia,os;r=os.path.dirname(nvidia.__path__[0]);'
        'print(\':\'.join(os.path.join(d,\'lib\') for d in __import__(\'glob\').glob(r+\'/nvidia/*\')))")'
        ':$LD_LIBRARY_PATH && export CHATTTS_ORT_LIBRARY=$(ls /tmp/ortgpu/libonnxruntime.so.*) && ...')
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--version", default="1.31.1")
    a.add_argument("--wheel", default=None, help="use this wheel instead of downloading")
    a.add_argument("--out", default=".gpu_parts")
    b = sub.add_parser("unpack")
    b.add_argument("parts")
    b.add_argument("--dest", default="/tmp/ortgpu")
    c = sub.add_parser("commands")
    c.add_argument("--parts", default=".gpu_parts")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        with tempfile.TemporaryDirectory() as tmp:
            wheel = Path(args.wheel) if args.wheel else download_wheel(args.version, Path(tmp))
            meta = pack_libraries(wheel, Path(args.out))
        print(f"{len(meta['parts'])} parts in {args.out}: {', '.join(meta['libraries'])}")
    elif args.cmd == "unpack":
        print("\n".join(unpack(Path(args.parts), Path(args.dest))))
    else:
        print(commands(Path(args.parts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
