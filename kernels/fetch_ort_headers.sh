#!/usr/bin/env bash
# Fetch onnxruntime's C/C++ API headers (not in the PyPI wheels) from Debian's libonnxruntime-dev
# (suite trixie, 1.21.0, ORT_API_VERSION 21) and unpack them into DEST (default build/kernels/ort).
#
# Nothing is installed and no system configuration is touched: `apt-get update` and
# `apt-get download` run against a temporary sources list, state, cache and lists dirs; the mirror
# URI (and keyring) come from the machine's own Debian sources. The .deb is unpacked with `dpkg -x`.
# Idempotent: exits at once when DEST/usr/include/onnxruntime/onnxruntime_lite_custom_op.h exists.
#
# Usage: kernels/fetch_ort_headers.sh [DEST]        (prints the include dir on success)
set -euo pipefail

PACKAGE=libonnxruntime-dev
SUITE=trixie
DEST=${1:-build/kernels/ort}
INCLUDE="$DEST/usr/include/onnxruntime"

if [[ -f "$INCLUDE/onnxruntime_lite_custom_op.h" ]]; then
    echo "$INCLUDE"
    exit 0
fi

for tool in apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "fetch_ort_headers: '$tool' not found (needs a Debian/Ubuntu machine)" >&2; exit 1; }
done

# The mirror: $RESPIN_DEBIAN_MIRROR, else the first Debian (non-security) URI of the system sources
# (deb822 files first, then sources.list), else deb.debian.org. Same for the archive keyring.
mirror=${RESPIN_DEBIAN_MIRROR:-} keyring=""
if [[ -z "$mirror" ]]; then
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        read -r mirror keyring < <(awk '
            /^[[:space:]]*$/ { if (uri != "") exit; next }
            /^URIs:/        { for (i = 2; i <= NF; i++) if ($i ~ /debian/ && $i !~ /security/) { uri = $i; break } }
            /^Signed-By:/   { key = $2 }
            END             { if (uri != "") print uri, key }' "$f") || true
        [[ -n "$mirror" ]] && break
    done
fi
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
    mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\// && $i ~ /debian/ && $i !~ /security/) { print $i; exit } }' \
        /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
if [[ -z "$keyring" || ! -f "$keyring" ]]; then
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
fi
if [[ ! -f "$keyring" ]]; then
    echo "fetch_ort_headers: no Debian archive keyring ($keyring): install debian-archive-keyring" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/state/lists/partial" "$tmp/cache/archives/partial" "$tmp/download"
cat > "$tmp/sources.list" <<SOURCES
deb [signed-by=$keyring] $mirror $SUITE main
SOURCES
touch "$tmp/state/status"

apt_opts=(
    -o "Dir::Etc::SourceList=$tmp/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State=$tmp/state"
    -o "Dir::State::Lists=$tmp/state/lists"
    -o "Dir::State::status=$tmp/state/status"
    -o "Dir::Cache=$tmp/cache"
    -o "Dir::Cache::archives=$tmp/cache/archives"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=$(id -un)"
    -o "Acquire::Languages=none"
)

if ! apt-get "${apt_opts[@]}" -qq update >"$tmp/log" 2>&1; then
    echo "fetch_ort_headers: apt-get update for $mirror $SUITE failed: $(grep -E '^(E|W):' "$tmp/log" | head -1)" >&2
    exit 1
fi
if ! (cd "$tmp/download" && apt-get "${apt_opts[@]}" -qq download "$PACKAGE" >"$tmp/log" 2>&1); then
    echo "fetch_ort_headers: apt-get download $PACKAGE ($SUITE) failed: $(grep -E '^(E|W):' "$tmp/log" | head -1)" >&2
    exit 1
fi

mkdir -p "$DEST"
dpkg -x "$tmp"/download/"$PACKAGE"_*.deb "$DEST"
if [[ ! -f "$INCLUDE/onnxruntime_lite_custom_op.h" ]]; then
    echo "fetch_ort_headers: $PACKAGE unpacked but $INCLUDE/onnxruntime_lite_custom_op.h is missing" >&2
    exit 1
fi
echo "$INCLUDE"
