#!/usr/bin/env bash
# llama.cpp (llama-cpp-python from PyPI, built here for this CPU) decoding the default
# GGUF on 2 threads (decoding at batch 1, prefill): the same-machine reference for
# `cargo bench --bench core`.
# Usage: scripts/llamacpp-decode.sh [MODEL.gguf] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
venv=.cache/llamacpp-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    python3 -m venv "$venv"
    # Built from source (~5 minutes on 2 cores), tuned to this CPU.
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q llama-cpp-python==0.3.16
fi
"$venv/bin/python" scripts/llamacpp_decode.py "$model" "${2:-2}"
