#!/usr/bin/env bash
# The clients people use, against a real `tagllm serve` on the default model and the
# shipped tags (copied: the training test publishes a tag): the official `openai` package
# on the /v1 routes, and the project's own client (clients/python) on predictions,
# generation and a small training job. Pinned in clients/python/test-requirements.txt.
# Usage: scripts/python-clients-test.sh [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/python-clients-venv
REQS=clients/python/test-requirements.txt

if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQS" "$VENV/requirements.txt"; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$REQS"
    cp "$REQS" "$VENV/requirements.txt"
fi
# The client as a user installs it, from the checkout, afresh each run.
"$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall ./clients/python
rm -rf clients/python/build clients/python/*.egg-info
scripts/setup-model.sh >/dev/null
cargo build -q --bin tagllm
bin=target/debug/tagllm

work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cp -r tags "$work/tags"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export TAGLLM_URL="http://127.0.0.1:$port" TAGLLM_API_KEY=py-reader TAGLLM_ADMIN_KEY=py-admin
"$bin" serve --tags-dir "$work/tags" --data-dir "$work/data" --port "$port" \
    --api-key "$TAGLLM_API_KEY" --admin-api-key "$TAGLLM_ADMIN_KEY" >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    curl -sf "$TAGLLM_URL/ready" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
    sleep 1
done
if ! "$VENV/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests "$@"; then
    echo "--- server log (tail) ---"; tail -50 "$work/serve.log"
    exit 1
fi
