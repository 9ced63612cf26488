#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis (pinned, from
# PyPI): a real `tagllm serve` on the project's tiny model with one trained tag, run twice,
# without keys and with an API key + admin key. Fails on any 5xx, any status, content type
# or body the document does not describe, and any schema-invalid request that is accepted.
# Usage: scripts/fuzz-api.sh [SECONDS_PER_RUN]   (default 60; run from any directory)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-60}
SCHEMATHESIS="schemathesis==4.32.5"
VENV=.cache/fuzz-venv

if [ ! -x "$VENV/bin/st" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$SCHEMATHESIS"
fi
cargo build -q --bin tagllm
bin=target/debug/tagllm

work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# The tiny model and a domain tag trained on it, so that composition is exercised too.
"$bin" tiny-model --out "$work/tiny.gguf" >/dev/null
printf '{"text": "the cat sat on the mat"}\n{"text": "CCO and c1ccccc1"}\n' >"$work/text.jsonl"
"$bin" train --model "$work/tiny.gguf" --tags-dir "$work/tags" --stage 1 --tag Lang \
    --data "$work/text.jsonl" --steps 2 >/dev/null 2>&1
# A generation tag named as the /v1 routes' examples name it, so they reach the engine.
printf '{"text": "the cat", "out": "sat"}\n{"text": "CCO", "out": "c1ccccc1"}\n' >"$work/gen.jsonl"
"$bin" train --model "$work/tiny.gguf" --tags-dir "$work/tags" --stage 2 --tag Translate \
    --template '<Lang> {text} <Translate>' --target out --data "$work/gen.jsonl" --steps 2 >/dev/null 2>&1

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"

summarise() { # NAME TALLY: requests, 2xx and 5xx per operation (written by fuzz_hooks.py)
    echo "fuzz ($1): requests per operation (2xx / 4xx / 5xx)"
    python3 - "$2" <<'PY'
import collections, sys
counts = collections.defaultdict(collections.Counter)
try:
    lines = open(sys.argv[1], encoding="utf-8").read().split("\n")
except FileNotFoundError:
    lines = []
for line in filter(None, lines):
    method, path, status = line.rsplit(" ", 2)
    counts[f"{method} {path}"][status[0] + "xx"] += 1
for op in sorted(counts):
    c = counts[op]
    print(f"  {op:34} {sum(c.values()):6}  {c['2xx']:5} / {c['4xx']:5} / {c['5xx']:3}")
if not counts:
    print("  (no tally: the hook did not run)")
PY
}

fuzz() { # NAME [serve flags...] -- [st flags...]
    local name=$1; shift
    local serve=() st=()
    while [ "$1" != "--" ]; do serve+=("$1"); shift; done; shift
    st=("$@")
    rm -rf "$work/data"
    "$bin" serve --model "$work/tiny.gguf" --tags-dir "$work/tags" --data-dir "$work/data" \
        --port "$port" --max-concurrent-requests 64 "${serve[@]}" >"$work/serve-$name.log" 2>&1 &
    server=$!
    python3 - "$url/ready" <<'PY' || { cat "$work/serve-$name.log"; exit 1; }
import sys, time, urllib.request
for _ in range(150):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.2)
sys.exit("the server did not become ready")
PY
    echo "fuzzing ($name) for ${SECONDS_PER_RUN} s"
    local rc=0
    FUZZ_TALLY="$work/tally-$name.txt" PYTHONPATH=scripts SCHEMATHESIS_HOOKS=fuzz_hooks "$VENV/bin/st" run "$url/openapi.json" --max-time "$SECONDS_PER_RUN" --workers 2 \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
        --request-timeout 30 --suppress-health-check all --seed 1 "${st[@]}" || rc=$?
    kill "$server"; wait "$server" 2>/dev/null || true; server=""
    summarise "$name" "$work/tally-$name.txt"
    if [ "$rc" != 0 ]; then
        echo "fuzz ($name) failed; server log:"; tail -50 "$work/serve-$name.log"; exit "$rc"
    fi
}

fuzz open --
fuzz keys --api-key fuzz-key --admin-api-key fuzz-admin -- -H "Authorization: Bearer fuzz-admin"
echo "fuzzing found nothing"
