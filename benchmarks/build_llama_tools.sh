#!/usr/bin/env bash
# Build llama.cpp's llama-perplexity, llama-quantize and llama-imatrix from the source that the
# pinned llama-cpp-python sdist vendors (so the benchmark measures the same llama.cpp the tests use).
# Usage: benchmarks/build_llama_tools.sh [BUILD_DIR]   (default: benchmarks/work/llama.cpp)
# Env:   LLAMA_CPP_PYTHON_VERSION (default 0.3.36)
#        LLAMA_SDIST_DIR  an already unpacked sdist to use instead of downloading (development only)
#        JOBS             parallel build jobs (default 2)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build_dir="${1:-$here/work/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
jobs="${JOBS:-2}"
targets=(llama-perplexity llama-quantize llama-imatrix)

mkdir -p "$build_dir"
build_dir="$(cd "$build_dir" && pwd)"
bin_dir="$build_dir/build/bin"

have_all=1
for t in "${targets[@]}"; do [[ -x "$bin_dir/$t" ]] || have_all=0; done
if [[ $have_all == 1 ]]; then
    echo "llama.cpp tools already built in $bin_dir"
    exit 0
fi

if [[ -n "${LLAMA_SDIST_DIR:-}" ]]; then
    src_root="$LLAMA_SDIST_DIR"
else
    src_root="$build_dir/llama_cpp_python-$version"
    if [[ ! -d "$src_root/vendor/llama.cpp" ]]; then
        echo "downloading llama-cpp-python==$version sdist"
        python -m pip download --no-deps --no-binary :all: --dest "$build_dir/sdist" \
            "llama-cpp-python==$version"
        tarball="$(ls "$build_dir"/sdist/llama_cpp_python-"$version".tar.gz)"
        tar -xzf "$tarball" -C "$build_dir"
    fi
fi
src="$src_root/vendor/llama.cpp"
[[ -f "$src/CMakeLists.txt" ]] || { echo "error: no llama.cpp source at $src" >&2; exit 1; }

echo "configuring llama.cpp from $src"
cmake -S "$src" -B "$build_dir/build" \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
echo "building ${targets[*]} with -j$jobs"
cmake --build "$build_dir/build" --config Release -j"$jobs" --target "${targets[@]}"
for t in "${targets[@]}"; do
    [[ -x "$bin_dir/$t" ]] || { echo "error: $t was not built" >&2; exit 1; }
done
echo "llama.cpp tools built in $bin_dir"
