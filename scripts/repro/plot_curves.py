#!/usr/bin/env python3
"""Draws the learning curves of trained tags from their `tagllm train --log` files.

For each NAME given: runs/logs/NAME.jsonl -> scripts/repro/curves/NAME.png, the training
loss per step (smoothed) and the validation metric at each evaluation, step 0 (the
initialisation, with the fitted head) included, and the published step marked; when the
log holds a learning-rate / batch sweep (`tagllm train --sweep-...`), also NAME-sweep.png,
each sweep run's held-out loss from the shared step 0. `--sweep-only NAME` draws just that
(a sweep run without a training run to summarise).
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="+")
    ap.add_argument("--runs", default="runs", type=Path)
    ap.add_argument("--out", default=Path(__file__).parent / "curves", type=Path)
    ap.add_argument("--metric", default="mse")
    ap.add_argument("--sweep-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        rows = [json.loads(line) for line in open(args.runs / "logs" / f"{name}.jsonl")]
        sweep = [r for r in rows if "sweep" in r]
        rows = [r for r in rows if "sweep" not in r]
        if sweep:
            plot_sweep(name, sweep, args.out)
        if args.sweep_only:
            continue
        summary = json.loads((args.runs / "logs" / f"{name}.json").read_text())
        steps = [r["step"] for r in rows]
        loss = [r["loss"] for r in rows]
        k = max(1, len(loss) // 50)
        smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
        # Evaluations: step 0 from the summary, then each step whose eval changed.
        evals = [(0, summary["eval"]["step0"][args.metric])] if "step0" in summary["eval"] else []
        last = summary["eval"].get("step0")  # the log's first rows repeat it
        for r in rows:
            if r["eval"] is not None and r["eval"] != last:
                evals.append((r["step"], r["eval"][args.metric]))
                last = r["eval"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, smooth, color="tab:gray", label="training loss (smoothed)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="tab:blue", label=f"validation {args.metric}")
        best = summary["best_step"]
        ax2.axvline(best, color="tab:green", ls="--", label=f"published: step {best}")
        ax2.set_ylabel(f"validation {args.metric}")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax2.legend(lines, labels, loc="upper right", fontsize=8)
        ax.set_title(f"<{name}>: {summary['steps_run']} steps, {summary['seconds']:.0f} s")
        fig.tight_layout()
        fig.savefig(args.out / f"{name}.png", dpi=100)
        print(args.out / f"{name}.png")


def plot_sweep(name, rows, out):
    """Held-out loss (standardised targets) of every sweep run against its step."""
    step0 = rows[0]["eval"]["loss"]  # every run starts from the same evaluated point
    runs = {}
    for r in rows:
        key = (r["sweep"]["batch_size"], r["sweep"]["learning_rate"])
        runs.setdefault(key, [(0, step0)])
        if r.get("eval_loss") is not None:
            runs[key].append((r["step"], r["eval_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for (batch, lr), pts in sorted(runs.items()):
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=f"lr {lr:g}, batch {batch}")
    ax.axhline(step0, color="tab:gray", ls=":", label="step 0 (fitted head)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (standardised MSE)")
    tag = name.replace("-sweep", "")
    ax.set_title(f"<{tag}>: learning-rate / batch sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{tag}-sweep.png"
    fig.savefig(path, dpi=100)
    print(path)


if __name__ == "__main__":
    main()
