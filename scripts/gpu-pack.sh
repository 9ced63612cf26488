#!/usr/bin/env bash
# Packs the CUDA build and the default model for a device machine, whose calls carry at
# most 64 MiB each (the model alone is 98 MB): target/gpu-carry/a (the xz'd binary and the
# model's first 46 MB) for a first call that moves it to target/gpu-stage/, and
# target/gpu-carry/b (the rest) for a second call, within the
# 30 s the machine stays warm, that runs
#   export LD_LIBRARY_PATH=$(scripts/gpu-unpack.sh) && OUT=$OUT scripts/gpu-check.sh
# (or scripts/gpu-train-speed.sh). First call's command:
#   mkdir -p target/gpu-stage && mv target/gpu-carry/a/* target/gpu-stage/
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf target/gpu-carry && mkdir -p target/gpu-carry/a target/gpu-carry/b
xz -T0 -6 -c target/cuda/release/tagllm >target/gpu-carry/a/tagllm.xz
head -c 46000000 "$MODEL" >target/gpu-carry/a/model.a
tail -c +46000001 "$MODEL" >target/gpu-carry/b/model.b
sha256sum "$MODEL" | cut -d' ' -f1 >target/gpu-carry/b/model.sha256
du -sh target/gpu-carry/a target/gpu-carry/b
