#!/usr/bin/env bash
# Device side of scripts/gpu-pack.sh: rebuilds target/cuda/release/tagllm and the model
# from target/gpu-stage/ and target/gpu-carry/b/, then prints the LD_LIBRARY_PATH that holds
# the machine's CUDA 13 libraries (a PyTorch install's): `export LD_LIBRARY_PATH=$(...)`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p target/cuda/release models
python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("target/gpu-stage/tagllm.xz"), open("target/cuda/release/tagllm", "wb"))'
chmod +x target/cuda/release/tagllm
cat target/gpu-stage/model.a target/gpu-carry/b/model.b >"$MODEL"
echo "$(cat target/gpu-carry/b/model.sha256)  $MODEL" | sha256sum -c --quiet >&2
python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/nvidia/lib64"]
dirs = set()
for r in roots:
    for name in ("libcublas.so*", "libcurand.so*", "libcudart.so*", "libnvrtc.so*"):
        for f in glob.glob(os.path.join(r, "nvidia", "**", name), recursive=True) + glob.glob(os.path.join(r, name)):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs) + [os.environ.get("LD_LIBRARY_PATH", "")]))
PY
