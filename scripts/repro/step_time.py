#!/usr/bin/env python3
"""Do the training logs' seconds per step match `cargo bench --bench train`?

For each named run (runs/logs/NAME.jsonl with its summary NAME.json), the steady seconds
per step is the median time between consecutive logged steps of one run, leaving out steps
that also evaluated (their time includes the held-out pass) and the first step of each run
(set-up). Its shape (examples per step, padded positions per example) comes from the log's
`examples` and `positions` fields. The benchmark is then run at that shape and stage
(TAGLLM_BENCH_BATCH, TAGLLM_BENCH_TOKENS, 12 steps) and the two medians are compared;
the issue asks that they agree within 30%. Results go to scripts/repro/step_time.json.

    python3 scripts/repro/step_time.py QED Descriptor
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.30
# Steps per benchmark run: its steady time is the median of the 10 after the first epoch
# (single steps here vary by 2x at times: other load, the host's steal time).
BENCH_STEPS = 12


def steady(log: Path):
    """(median seconds per step, median examples, median positions, steps measured)."""
    runs = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        runs.setdefault(json.dumps(r.get("sweep")), []).append(r)
    secs, examples, positions = [], [], []
    for lines in runs.values():
        for prev, cur in zip(lines, lines[1:]):
            if "positions" not in cur:
                continue  # a log from before the trainer recorded its work
            if cur["step"] != prev["step"] + 1 or cur.get("eval_loss") is not None:
                continue
            secs.append(cur["seconds"] - prev["seconds"])
            examples.append(cur["examples"])
            positions.append(cur["positions"])
    if not secs:
        return None
    return statistics.median(secs), statistics.median(examples), statistics.median(positions), len(secs)


def stage_of(summary: Path) -> int:
    cmd = json.loads(summary.read_text())["command"]
    return int(cmd[cmd.index("--stage") + 1])


def bench(stage: int, batch: int, tokens: int) -> dict:
    name = f"train_stage{stage}"
    env = dict(os.environ, TAGLLM_BENCH_BATCH=str(batch), TAGLLM_BENCH_TOKENS=str(tokens),
               TAGLLM_BENCH_STEPS=str(BENCH_STEPS))
    out = subprocess.run(["cargo", "bench", "--bench", "train", "--", name], env=env,
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():
        if line.startswith("{") and json.loads(line).get("bench") == name:
            return json.loads(line)
    sys.exit(f"the benchmark printed no {name} line:\n{out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+")
    ap.add_argument("--logs", type=Path, default=Path("runs/logs"))
    ap.add_argument("--out", type=Path, default=HERE / "step_time.json")
    args = ap.parse_args()
    results = []
    for name in args.names:
        measured = steady(args.logs / f"{name}.jsonl")
        if measured is None:
            print(f"{name}: no steps with recorded work in its log (retrain with this trainer)", file=sys.stderr)
            continue
        secs, examples, positions, n = measured
        batch, tokens = int(examples), round(positions / examples)
        stage = stage_of(args.logs / f"{name}.json")
        b = bench(stage, batch, tokens)
        ratio = secs / b["seconds_per_step"]
        row = {"tag": name, "stage": stage, "batch": batch, "tokens_per_example": tokens,
               "log_seconds_per_step": round(secs, 3), "steps_measured": n,
               "bench_seconds_per_step": b["seconds_per_step"], "log_over_bench": round(ratio, 3),
               "within_30_percent": abs(ratio - 1) <= TOLERANCE}
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not all(r["within_30_percent"] for r in results):
        sys.exit("some logs do not match the benchmark within 30%")


if __name__ == "__main__":
    main()
