#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers from Debian's libonnxruntime-dev package into DEST/include.
#
# Why: the onnxruntime wheel ships the library but not its headers. Debian trixie packages them
# (1.21.0, C API 21); the API is ABI-stable, and API-21 headers work against the newer library that
# the wheel carries, because the core loads it with ORT_API_MANUAL_INIT and asks for API 21.
#
# How: a private apt source list and state directory, so the system's apt configuration is untouched.
# The mirror URI is read from the system's own sources (we never hard-code a host name).
# The result is cached: a second call with the headers present does nothing.
#
# Usage: tools/fetch_ort_headers.sh DEST        (headers land in DEST/include)
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST}
version=${ORT_DEB_VERSION:-1.21.0+dfsg-1}
suite=${ORT_DEB_SUITE:-trixie}

if [ -f "$dest/include/onnxruntime_cxx_api.h" ]; then
  exit 0
fi
for tool in apt-get dpkg-deb; do
  command -v $tool >/dev/null || {
    echo "fetch_ort_headers: '$tool' not found. On a non-Debian host, set ORT_INCLUDE_DIR (environment or" \
         "CMake variable) to the include folder of an ONNX Runtime release." >&2; exit 1; }
done

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/{print $2; exit}' "$f" | grep -v security || true)
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "fetch_ort_headers: no Debian mirror found in /etc/apt/sources*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/etc/parts"
echo "deb [trusted=yes] $mirror $suite main" > "$work/etc/sources.list"
: > "$work/etc/preferences"
opts=(-o Dir::Etc::SourceList="$work/etc/sources.list" -o Dir::Etc::SourceParts="$work/etc/parts"
      -o Dir::Etc::Preferences="$work/etc/preferences" -o Dir::Etc::PreferencesParts="$work/etc/parts"
      -o Dir::State="$work/state" -o Dir::Cache="$work/cache"
      -o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1 -o APT::Get::List-Cleanup=0
      -o Acquire::Languages=none -o APT::Architecture=amd64)
echo "fetch_ort_headers: downloading libonnxruntime-dev=$version ($suite)" >&2
apt-get "${opts[@]}" -qq update >&2
(cd "$work" && apt-get "${opts[@]}" -qq download "libonnxruntime-dev=$version" >&2)
deb=$(ls "$work"/libonnxruntime-dev_*.deb)
dpkg-deb -x "$deb" "$work/x"
hdr=$(dirname "$(find "$work/x" -name onnxruntime_cxx_api.h | head -n 1)")
[ -f "$hdr/onnxruntime_cxx_api.h" ] || { echo "fetch_ort_headers: headers not found in $deb" >&2; exit 1; }
mkdir -p "$dest.tmp.$$/include"
cp "$hdr"/*.h "$dest.tmp.$$/include/"
rm -rf "$dest"; mkdir -p "$(dirname "$dest")"; mv "$dest.tmp.$$" "$dest"
echo "fetch_ort_headers: headers in $dest/include" >&2
