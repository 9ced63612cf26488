#!/usr/bin/env bash
# Builds tagllm with `--features cuda` on a machine with no GPU and no CUDA install: the
# CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels (pinned), unpacked into a cache folder.
# candle loads the driver (libcuda.so.1) and the CUDA libraries at run time (cudarc's
# dynamic loading), so nothing here links against a GPU driver.
#
# Usage: scripts/build-cuda.sh [--stage-docker] [cargo build args...]
#        scripts/build-cuda.sh --toolkit-only   (fetch the toolkit wheels, build nothing)
#   default: --release --bin tagllm  ->  target/cuda/release/tagllm
#   --stage-docker: also stage docker/cuda, the build context of
#   docker/Dockerfile.cuda (`docker compose --profile gpu build`).
# Env: CUDA_COMPUTE_CAP (default 90: H100/H200; 80 A100, 89 L4/4090), TAGLLM_CUDA_DIR
# (default .cache/cuda-13.0). The build goes to target/cuda so the CPU build is untouched.
# Running the binary needs the same CUDA 13 libraries (cudart, cublas, cublasLt, curand,
# nvrtc) on LD_LIBRARY_PATH: this cache's nvidia/cu13/lib, or a PyTorch install's.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
prefix=${TAGLLM_CUDA_DIR:-.cache/cuda-13.0}
wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
stamp="$prefix/.installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    rm -rf "$prefix"
    python3 -m pip install -q --no-deps --target "$prefix/site" "${wheels[@]}"
    touch "$stamp"
fi
# --toolkit-only: just the download above (CI fetches it while it compiles other things).
[ "${1:-}" != --toolkit-only ] || exit 0
cuda=$(cd "$prefix/site/nvidia/cu13" && pwd)
# The wheels ship versioned libraries only; tools that look for the plain names find links.
for lib in "$cuda"/lib/lib*.so.*; do
    plain="${lib%%.so.*}.so"
    [ -e "$plain" ] || ln -s "$(basename "$lib")" "$plain"
done
# cudarc links the driver API (-lcuda), which only a GPU machine's driver provides: the
# linker gets a stub that defines every driver function cudarc declares (the wheels ship
# none). The binary then needs the real libcuda.so.1 at run time, as any CUDA program does.
mkdir -p "$cuda/lib/stubs"
if [ ! -e "$cuda/lib/stubs/libcuda.so" ]; then
    cargo fetch --locked -q
    cudarc=$(cargo metadata --locked --format-version 1 --features cuda | python3 -c '
import json, os, sys
pkgs = json.load(sys.stdin)["packages"]
print(os.path.dirname(next(p["manifest_path"] for p in pkgs if p["name"] == "cudarc")))')
    grep -ohE "^ *fn cu[A-Za-z0-9_]+\(" "$cudarc/src/driver/sys/mod.rs" | sed -E 's/ *fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' |
        sort -u >"$cuda/lib/stubs/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda.c"
fi
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_TOOLKIT_ROOT_DIR="$cuda"
export PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CPATH="$cuda/include:$cuda/include/cccl${CPATH:+:$CPATH}"
nvcc --version | tail -2
stage=false
args=()
for a in "$@"; do
    if [ "$a" = --stage-docker ]; then stage=true; else args+=("$a"); fi
done
[ ${#args[@]} -gt 0 ] || args=(--release --bin tagllm)
cargo build --locked --features cuda --target-dir target/cuda "${args[@]}"
if $stage; then
    # docker/Dockerfile.cuda's build context: the build, the runtime libraries it loads, and
    # the model and tags the images share. The folder is committed (its .gitignore keeps it
    # empty in git) so that compose validates on a machine that never staged it;
    # .dockerignore keeps it out of the api image's context.
    ctx=docker/cuda
    rm -rf "$ctx/Dockerfile" "$ctx/tagllm" "$ctx/cuda-lib" "$ctx/models" "$ctx/tags"
    mkdir -p "$ctx/cuda-lib" "$ctx/models"
    cp docker/Dockerfile.cuda "$ctx/Dockerfile"
    cp target/cuda/release/tagllm "$ctx/tagllm"
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 \
        libnvrtc-builtins.so.13.0; do
        cp -L "$cuda/lib/$lib" "$ctx/cuda-lib/"
    done
    scripts/setup-model.sh >/dev/null
    cp -l models/SmolLM2-135M-Instruct.Q4_1.gguf "$ctx/models/" 2>/dev/null || cp models/SmolLM2-135M-Instruct.Q4_1.gguf "$ctx/models/"
    cp -r tags "$ctx/tags"
    echo "staged $ctx for docker/Dockerfile.cuda (docker compose --profile gpu build)"
fi
