#!/usr/bin/env bash
# The console (/) and the API docs (/docs) in a real browser: headless Chromium from
# Debian's packages, driven by Selenium (scripts/console-requirements.txt, pinned) against a real `tagllm serve`
# on the project's tiny model, with an API key and an admin key. Chromium may reach only
# the server (every other host fails to resolve), so the pages must work offline.
# Usage: scripts/console-test.sh [SCREENSHOT_DIR]   (default: a temporary directory;
#        `scripts/console-test.sh docs/console` refreshes docs/console.md's screenshots)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/console-venv
shots=${1:-}

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import selenium' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r scripts/console-requirements.txt
fi
cargo build -q --bin tagllm
bin=target/debug/tagllm

work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
[ -n "$shots" ] || shots="$work/shots"
mkdir -p "$shots"

# The tiny model, a domain tag and a regression function tag trained on it, and one
# bundle that fails validation (the Tags page must show it with its reason).
"$bin" tiny-model --out "$work/tiny.gguf" >/dev/null
python3 - "$work" <<'PY'
import json, random, sys
work = sys.argv[1]
rng = random.Random(0)
words = ["the", "cat", "sat", "on", "mat", "CCO", "c1ccccc1", "dog", "ran", "far"]
with open(f"{work}/text.jsonl", "w") as f:
    for _ in range(40):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(6))}) + "\n")
for name, n in [("train", 64), ("eval", 16)]:
    with open(f"{work}/{name}.jsonl", "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words) for _ in range(5))
            f.write(json.dumps({"text": text, "score": text.count("cat") + 0.5 * text.count("CCO")}) + "\n")
PY
"$bin" train --model "$work/tiny.gguf" --tags-dir "$work/tags" --stage 1 --tag Lang \
    --data "$work/text.jsonl" --steps 4 >/dev/null 2>&1
"$bin" train --model "$work/tiny.gguf" --tags-dir "$work/tags" --stage 2 --tag Score \
    --template '<Lang> {text} is worth <Score>' --head regression --target score \
    --data "$work/train.jsonl" --eval-data "$work/eval.jsonl" --steps 10 >/dev/null 2>&1
mkdir -p "$work/tags/Broken"
echo '{"name": "Broken", "kind": "domain", "version": "one"}' >"$work/tags/Broken/manifest.json"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
"$bin" serve --model "$work/tiny.gguf" --tags-dir "$work/tags" --data-dir "$work/data" \
    --port "$port" --api-key console-reader --admin-api-key console-admin >"$work/serve.log" 2>&1 &
server=$!

rc=0
"$VENV/bin/python" scripts/console_test.py "$url" "$work" "$shots" || rc=$?
if [ "$rc" != 0 ]; then
    echo "console test failed; server log:"; tail -40 "$work/serve.log"; exit "$rc"
fi
echo "console test passed; screenshots in $shots"
