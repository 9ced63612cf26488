#!/usr/bin/env bash
# Stage-2 training speed at batch 8 and 64, from `tagllm train --log` (the first quarter of
# the steps left out): seconds per step and examples per second, as JSON lines (also in
# $OUT/train-speed.jsonl). 8,192 synthetic SMILES (no example repeats, so the prefix cache
# never hits), `--head-init random`. Env: BIN (default target/cuda/release/tagllm), DEV
# (default cuda), BATCHES (default "8 64"), STEPS. CUDA libraries on LD_LIBRARY_PATH.
set -u
cd "$(dirname "$0")/.."

BIN=${BIN:-target/cuda/release/tagllm}
DEV=${DEV:-cuda}
w=$(mktemp -d); mkdir -p "$w/tags"; cp -r tags/SMILES "$w/tags/"
python3 - "$w" <<'PY'
import json, random, sys
rng = random.Random(0)
atoms = ["C", "C", "C", "N", "O", "c1ccccc1", "(=O)", "Cl", "F", "S"]
with open(sys.argv[1] + "/train.jsonl", "w") as f:
    for i in range(8192):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(8, 24)))
        f.write(json.dumps({"smiles": s, "qed": round(rng.random(), 3)}) + "\n")
PY
for b in ${BATCHES:-8 64}; do
  steps=$(( b == 8 ? 80 : 40 ))
  timeout 200 "$BIN" train --device "$DEV" --tags-dir "$w/tags" --stage 2 --tag "Speed$b" \
     --template "The molecule <SMILES> {smiles} has druglikeness <Speed$b>" --head regression --target qed \
     --head-init random --data "$w/train.jsonl" --steps "${STEPS:-$steps}" --batch-size "$b" --log "$w/log$b.jsonl" \
     >/dev/null 2>"$w/err$b" || { tail -5 "$w/err$b"; continue; }
  python3 - "$w/log$b.jsonl" "$b" "$DEV" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
b, k = int(sys.argv[2]), len(rows) // 4
per = (rows[-1]["seconds"] - rows[k]["seconds"]) / (rows[-1]["step"] - rows[k]["step"])
print(json.dumps({"check": "train_speed", "device": sys.argv[3], "batch_size": b, "steps": rows[-1]["step"],
                  "seconds_per_step": round(per, 4), "examples_per_s": round(b / per, 1),
                  "first_step_s": round(rows[0]["seconds"], 2)}))
PY
done | tee "${OUT:-.}/train-speed.jsonl"
