#!/usr/bin/env bash
# One bounded check of a CUDA build on a machine with a GPU (about 5 minutes; every step
# under `timeout`). Prints JSON lines, also written to $OUT/gpu-check.jsonl:
#   info          the model on the device (`tagllm info --device cuda`)
#   hidden_states CPU vs device final hidden states (`tagllm embed`), max abs difference
#   greedy_ids    CPU vs device greedy chat generation, ids equal
#   train_job     a stage-2 job run by `tagllm worker --device cuda` from the job store
#                 that `tagllm serve` writes to: state, steps, seconds per step
#   serve         /predict with a shipped tag, 16 clients for 20 s: requests/s, p50, p99
#   pytorch       the same model shape in PyTorch (random weights) where torch and
#                 transformers import: prefill tokens/s, prompt-tuning step seconds
# Usage: scripts/gpu-check.sh [TAGLLM_BIN]   (default target/cuda/release/tagllm)
# Env: DEVICE (default cuda; `cpu` dry-runs the script anywhere), OUT (default .),
#      TAGLLM_MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf).
# The CUDA libraries must be on LD_LIBRARY_PATH (a PyTorch install's nvidia/cu13/lib, or
# scripts/build-cuda.sh's cache).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/cuda/release/tagllm}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-.}
export TAGLLM_MODEL=${TAGLLM_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
log="$OUT/gpu-check.jsonl"
: >"$log"
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; rm -rf "$work"' EXIT
emit() { echo "$1" | tee -a "$log"; }
fail() { emit "{\"check\": \"$1\", \"ok\": false, \"error\": $(printf '%s' "$2" | tail -c 400 | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"; }

# info
if out=$(timeout 120 "$BIN" info --device "$DEVICE" 2>&1); then
    emit "$(printf '%s' "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"check": "info", "ok": True, "device": d["device"], "name": d["name"]}))')"
else
    fail info "$out"; exit 1
fi

# hidden_states: 64 records through both devices.
python3 -c '
import json
for i in range(64):
    print(json.dumps({"text": "The molecule " + "CC(=O)Oc1ccccc1C(=O)O"[: 5 + i % 16] + " has druglikeness"}))' >"$work/text.jsonl"
for d in cpu "$DEVICE"; do
    timeout 120 "$BIN" embed --device "$d" --template "{text}" --data "$work/text.jsonl" >"$work/h-$d.jsonl" 2>"$work/h-$d.err" \
        || { fail hidden_states "$(cat "$work/h-$d.err")"; break; }
done
[ -s "$work/h-$DEVICE.jsonl" ] && emit "$(python3 - "$work/h-cpu.jsonl" "$work/h-$DEVICE.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
print(json.dumps({"check": "hidden_states", "ok": diff < 1e-3 and len(a) == len(b) == 64, "records": len(b), "max_abs_diff": diff}))
PY
)"

# greedy_ids
for d in cpu "$DEVICE"; do
    timeout 120 "$BIN" generate --device "$d" --json --max-new-tokens 24 "What is the capital of France?" >"$work/g-$d.json" 2>"$work/g-$d.err" \
        || { fail greedy_ids "$(cat "$work/g-$d.err")"; break; }
done
[ -s "$work/g-$DEVICE.json" ] && emit "$(python3 - "$work/g-cpu.json" "$work/g-$DEVICE.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
print(json.dumps({"check": "greedy_ids", "ok": a["ids"] == b["ids"], "cpu": a["text"], "device": b["text"]}))
PY
)"

# train_job and serve: one server (no embedded worker) and one worker, one SQLite store.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
db="sqlite://$work/jobs.db"
mkdir -p "$work/tags" && cp -r tags/QED tags/SMILES "$work/tags/" 2>/dev/null
"$BIN" serve --device "$DEVICE" --port "$port" --tags-dir "$work/tags" --data-dir "$work/data" --data-root "$work" \
    --database-url "$db" --no-worker --max-queue-ms 600000 >"$work/serve.log" 2>&1 &
pids+=($!)
python3 - "$port" <<'PY' || { fail serve "$(tail -5 "$work/serve.log")"; exit 1; }
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2); sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit(1)
PY
"$BIN" worker --device "$DEVICE" --tags-dir "$work/tags" --database-url "$db" >"$work/worker.log" 2>&1 &
pids+=($!)
emit "$(timeout 240 python3 - "$port" <<'PY' || echo '{"check": "train_job", "ok": false, "error": "timed out"}'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
records = [{"smiles": "C" * (1 + i % 12) + "O" * (i % 3), "qed": round(0.1 + 0.05 * (i % 12), 3)} for i in range(256)]
body = {"stage": 2, "tag": "GpuCheck", "template": "The molecule <SMILES> {smiles} has druglikeness <GpuCheck>",
        "target": "qed", "head": "regression", "dataset": {"records": records},
        "hyperparameters": {"steps": 60, "batch_size": 8, "eval_every": 0}}
req = urllib.request.Request(url + "/train", json.dumps(body).encode(), {"content-type": "application/json"})
job = json.load(urllib.request.urlopen(req))
while True:
    j = json.load(urllib.request.urlopen(f"{url}/jobs/{job['id']}"))
    if j["state"] in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(1)
secs = (j["finished_at"] - j["started_at"]) / 1e3 if j.get("finished_at") and j.get("started_at") else None
print(json.dumps({"check": "train_job", "ok": j["state"] == "succeeded", "state": j["state"], "steps": j["step"],
                  "seconds": secs, "seconds_per_step_incl_setup": secs / max(j["step"], 1) if secs else None,
                  "error": j.get("error")}))
PY
)"
emit "$(timeout 60 python3 - "$port" <<'PY' || echo '{"check": "serve", "ok": false, "error": "timed out"}'
import concurrent.futures as cf, json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/predict"
body = json.dumps({"function": "QED", "inputs": ["CC(=O)Oc1ccccc1C(=O)O"]}).encode()
def client(_):
    lat, end = [], time.time() + 20
    while time.time() < end:
        t = time.time()
        urllib.request.urlopen(urllib.request.Request(url, body, {"content-type": "application/json"})).read()
        lat.append(time.time() - t)
    return lat
with cf.ThreadPoolExecutor(16) as ex:
    lat = sorted(x for l in ex.map(client, range(16)) for x in l)
print(json.dumps({"check": "serve", "ok": True, "clients": 16, "requests_per_s": round(len(lat) / 20, 1),
                  "p50_ms": round(lat[len(lat) // 2] * 1e3, 1), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 1)}))
PY
)"

# pytorch: the same shape (SmolLM2-135M: 30 layers, d 576, 9 heads, 3 KV heads), random weights.
emit "$(timeout 180 python3 - <<'PY' 2>/dev/null || echo '{"check": "pytorch", "ok": false, "error": "torch/transformers unavailable or timed out"}'
import json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
m = LlamaForCausalLM(cfg).to(dev).eval()
ids = torch.randint(0, 49152, (32, 64), device=dev)
with torch.no_grad():
    for _ in range(2): m(ids)
    torch.cuda.synchronize() if dev == "cuda" else None
    t = time.time(); n = 5
    for _ in range(n): m(ids)
    torch.cuda.synchronize() if dev == "cuda" else None
prefill = 32 * 64 * n / (time.time() - t)
for p in m.parameters(): p.requires_grad_(False)
tag = torch.nn.Parameter(torch.randn(10, 576, device=dev) * 0.02)
head = torch.nn.Linear(576, 1).to(dev)
opt = torch.optim.AdamW([tag, *head.parameters()], lr=1e-3)
emb = m.get_input_embeddings()
x = torch.randint(0, 49152, (8, 54), device=dev); y = torch.randn(8, device=dev)
def step():
    e = torch.cat([emb(x[:, :44]), tag.expand(8, -1, -1), emb(x[:, 44:])], 1)
    h = m.model(inputs_embeds=e).last_hidden_state[:, 53]
    loss = ((head(h).squeeze(1) - y) ** 2).mean(); opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3): step()
torch.cuda.synchronize() if dev == "cuda" else None
t = time.time()
for _ in range(10): step()
torch.cuda.synchronize() if dev == "cuda" else None
print(json.dumps({"check": "pytorch", "ok": True, "device": dev, "torch": torch.__version__,
                  "prefill_tokens_per_s": round(prefill), "stage2_step_s_batch8x64": round((time.time() - t) / 10, 4)}))
PY
)"
