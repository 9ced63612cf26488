#!/usr/bin/env bash
# tagllm's tokenization and greedy decoding against llama.cpp's on one catalogue model
# (scripts/llamacpp_check.py). Needs `cargo build --release`; builds llama-cpp-python once
# (~5 minutes on 2 cores) into .cache/llamacpp-venv, as scripts/llamacpp-decode.sh does.
# Usage: scripts/llamacpp-check.sh [NAME] -> scripts/llamacpp-check/NAME.json
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-smollm2-135m}
python3 scripts/pull_model.py "$name" >/dev/null
file=$(python3 -c 'import json,sys; print(next(m["file"] for m in json.load(open("src/model/catalogue.json"))["models"] if m["name"] == sys.argv[1]))' "$name")
venv=.cache/llamacpp-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    python3 -m venv "$venv"
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q llama-cpp-python==0.3.16
fi
"$venv/bin/pip" install -q numpy
mkdir -p scripts/llamacpp-check
"$venv/bin/python" scripts/llamacpp_check.py "models/$file" target/release/tagllm "scripts/llamacpp-check/$name.json"
