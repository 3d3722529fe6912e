#!/usr/bin/env bash
# Builds the C++ core with AddressSanitizer and UndefinedBehaviorSanitizer and runs a short workload under
# them (tools/sanitize_workload.py: streams, batches, early breaks, bad inputs, close while streaming, both
# layer forms). Any report aborts with a non-zero exit. Usage: tools/sanitize.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
BUILD=build/sanitize
start=$(date +%s)
"$PY" -m pybind11 --cmakedir >/dev/null
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Debug -DCHATTTS_SANITIZE=ON \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build "$BUILD" -j"$(nproc)" >/dev/null
so=$(ls "$BUILD"/_core*.so)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The exports the workload runs (made by the ordinary build: torch stays out of the sanitized process).
exports="$work/exports"
"$PY" - "$exports" <<'PYEOF'
import sys
from chattts_ort.export.exporter import export_model
for form in ("fused", "portable"):
    export_model("random-tiny", f"{sys.argv[1]}/{form}", progress=False, layer_form=form)
export_model("random-tiny", f"{sys.argv[1]}/fused-2-per-graph", progress=False, layers_per_graph=2)
PYEOF
built=$(date +%s)
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
"$PY" tools/sanitize_workload.py "$exports" "$so"
end=$(date +%s)
echo "sanitize: build + exports $((built - start)) s, workload under ASan/UBSan $((end - built)) s"
