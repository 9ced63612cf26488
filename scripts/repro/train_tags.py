#!/usr/bin/env python3
"""Trains every tag of the reproduction with `tagllm train`, in dependency order.

Tags go to runs/tags/ (shipped ones are copied to tags/ by evaluate.py once tested);
each job keeps its loss curve (runs/logs/NAME.jsonl), its stderr and its final summary
(runs/logs/NAME.json). A job whose summary exists is skipped, so an interrupted run
picks up where it stopped.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BIN = "target/release/tagllm"
LR = "1e-3"  # 10x the paper's 1e-4: we run hundreds of steps, not tens of thousands

QED_TEMPLATE = "The molecule <SMILES> {smiles} has druglikeness <QED>"
DESCRIPTOR_TEMPLATE = "The protein <Protein> {protein} has BLOSUM index <Descriptor>"
BA_TEMPLATE = "The protein <Protein> {protein} binds the molecule <SMILES> {smiles} with affinity <BA>"
# The default; each record names its own (prepare_data.translate_template).
TRANSLATE_TEMPLATE = "<|im_start|>user\n<Translate><EN> text to<FR>: {text}<|im_end|>\n<|im_start|>assistant\n"
LANG_NAMES = {"EN": "English", "FR": "French", "DE": "German", "IT": "Italian", "ES": "Spanish", "PT": "Portuguese"}

# Stage-2 method (issue: tags that beat the baselines). The head starts as a ridge fit on
# the step-0 features and is refitted on the trained tag's features at the end (kept only
# if held-out loss improves). Before training, a sweep: 40-step runs from that same start
# at 3 learning rates x 2 batch sizes (curves in runs/logs/NAME.jsonl, lines with
# "sweep"); the run then trains 3 epochs with the pair of lowest held-out loss. The head's
# rate stays 1/100 of the tag's: its features have a few very large coordinates, and Adam
# moves every weight by about the rate. A tag whose sweep was already run (its curves are
# kept in scripts/repro/logs/NAME-sweep.jsonl) trains at the winner directly.
def function_method(eval_every, patience, winner=None, epochs=3):
    common = ["--epochs", str(epochs), "--head-init", "fit", "--eval-every", str(eval_every),
              "--patience", str(patience)]
    if winner is not None:
        lr, batch = winner
        return [*common, "--batch-size", str(batch), "--learning-rate", f"{lr:g}",
                "--head-learning-rate", f"{lr / 100:g}"]
    return [*common, "--batch-size", "16", "--learning-rate", "3e-4", "--head-learning-rate", "3e-6",
            "--sweep-learning-rates", "1e-4,3e-4,1e-3", "--sweep-batch-sizes", "16,32",
            "--sweep-steps", "40", "--sweep-eval-every", "20"]


# (name, stage, flags). Steps are sized for a 2-core CPU (see docs/reproduction.md).
JOBS = [
    ("SMILES", 1, ["--data", "data/smiles/text.jsonl", "--steps", "120"]),
    ("Protein", 1, ["--data", "data/protein/text.jsonl", "--steps", "120"]),
    # A language tag is one vector that starts as its language's name (" French") and
    # learns from sentences in that language at a gentle rate, so it still names it.
    *[(l, 1, ["--data", f"data/lang/{l.lower()}.jsonl", "--num-vectors", "1", "--init", f"text: {name}",
              "--learning-rate", "3e-4", "--batch-size", "16", "--steps", "60"]) for l, name in LANG_NAMES.items()],
    # The head starts as a ridge fit on the step-0 features (a linear probe, all 4,000
    # examples); the tag at a high rate, the head at a low one (its features have a few
    # very large coordinates, and Adam moves every weight by about the rate).
    # <QED> v3 learns from molecules of four collections (MOSES, ChEMBL, FreeSolv's small
    # molecules, NCI: data/qed/train_mixed.jsonl), its head over all 10 of its positions
    # (as <Descriptor>'s), fitted on every training molecule, then one epoch at v2's rates;
    # its answers are kept in QED's range, [0, 1].
    ("QED", 2, ["--template", QED_TEMPLATE, "--head", "regression", "--target", "qed", "--target-range", "0,1",
                "--data", "data/qed/train_mixed.jsonl", "--eval-data", "runs/data/qed_mixed_val.jsonl",
                "--head-positions", "10", "--epochs", "1", "--head-init", "fit", "--eval-every", "50",
                "--patience", "3", "--batch-size", "32", "--learning-rate", "3e-3",
                "--head-learning-rate", "1e-5"]),
    # <Descriptor> v5 learns from whole proteins and windows (data/descriptor/train_mixed.jsonl:
    # what users send, and what v4 learned from); its head reads all 10 of its positions
    # (a ridge on the step-0 features: validation MSE 0.0055 against 0.0073 for the last
    # position alone on windows), then one epoch at v4's sweep winner.
    ("Descriptor", 2, ["--template", DESCRIPTOR_TEMPLATE, "--head", "regression", "--target", "blosum1",
                       "--data", "data/descriptor/train_mixed.jsonl", "--eval-data", "runs/data/descriptor_mixed_val.jsonl",
                       "--head-positions", "10", *function_method(50, 3, winner=(1e-4, 32), epochs=1)]),
    ("BA", 3, ["--template", BA_TEMPLATE, "--head", "regression", "--target", "affinity",
               "--data", "data/ba/train.jsonl", "--eval-data", "runs/data/ba_val.jsonl",
               "--steps", "400", "--eval-every", "100"]),
    # <BA> on the warm re-split (every test protein and ligand occurs in training), where
    # the experts get signal; not shipped. Head fitted (over all 10 positions, as
    # <Descriptor>'s), then the tag at the function-tag rate.
    ("BAWarm", 3, ["--template", BA_TEMPLATE.replace("<BA>", "<BAWarm>"), "--head", "regression",
                   "--target", "affinity", "--data", "data/ba_warm/train.jsonl",
                   "--eval-data", "runs/data/ba_warm_val.jsonl", "--head-init", "fit", "--head-positions", "10",
                   "--batch-size", "16", "--learning-rate", "1e-4", "--head-learning-rate", "1e-6",
                   "--steps", "100", "--eval-every", "50"]),
    # <Translate> starts as the words "Translate this": step 0 is the base model prompted
    # in words; sentence pairs (Debian's and Django's catalogs) teach it from there.
    ("Translate", 3, ["--template", TRANSLATE_TEMPLATE, "--target", "target", "--num-vectors", "2",
                      "--init", "text:Translate this", "--batch-size", "16", "--learning-rate", "1e-3",
                      "--data", "data/translate/train.jsonl", "--eval-data", "runs/data/translate_val.jsonl",
                      "--steps", "400", "--eval-every", "50", "--patience", "4"]),
    # Ablations (not shipped): no domain tag; no head (the number generated as text).
    # 100 steps each (the budget ran out): compare with <QED>'s own curve at step 100.
    ("QEDNoDomain", 2, ["--template", "The molecule {smiles} has druglikeness <QEDNoDomain>",
                        "--head", "regression", "--target", "qed",
                        "--data", "data/qed/train.jsonl", "--eval-data", "runs/data/qed_val.jsonl",
                        "--steps", "100", "--eval-every", "50"]),
    ("QEDText", 2, ["--template", "The molecule <SMILES> {smiles} has druglikeness <QEDText>",
                    "--target", "qed_text",
                    "--data", "data/qed/train.jsonl", "--eval-data", "runs/data/qed_val.jsonl",
                    "--steps", "100", "--eval-every", "50"]),
]


def head(src, dst, n):
    """The first n lines of a validation file: model selection uses these only."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    lines = Path(src).read_text().splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="runs", type=Path)
    ap.add_argument("--only", nargs="*", help="train just these tags")
    args = ap.parse_args()
    runs = args.runs
    (runs / "logs").mkdir(parents=True, exist_ok=True)
    for name, n in [("qed", 200), ("descriptor", 200), ("ba", 200), ("ba_warm", 200), ("translate", 60)]:
        head(f"data/{name}/val.jsonl", runs / "data" / f"{name}_val.jsonl", n)
    head("data/qed/val_mixed.jsonl", runs / "data" / "qed_mixed_val.jsonl", 200)
    head("data/descriptor/val_mixed.jsonl", runs / "data" / "descriptor_mixed_val.jsonl", 200)
    for name, stage, flags in JOBS:
        if args.only and name not in args.only:
            continue
        summary = runs / "logs" / f"{name}.json"
        if summary.exists():
            print(f"{name}: done before, skipped", file=sys.stderr)
            continue
        curve = runs / "logs" / f"{name}.jsonl"
        curve.unlink(missing_ok=True)
        lr = [] if "--learning-rate" in flags else ["--learning-rate", LR]
        cmd = [BIN, "train", "--tags-dir", str(runs / "tags"), "--stage", str(stage), "--tag", name,
               *lr, "--log", str(curve), *flags]
        print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        started = time.time()
        with open(runs / "logs" / f"{name}.err", "w") as err:
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        if out.returncode != 0:
            sys.exit(f"{name} failed; see {runs / 'logs' / (name + '.err')}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["seconds"] = round(time.time() - started, 1)
        result["command"] = cmd
        summary.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {result['seconds']} s, eval {json.dumps(result['eval'])}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
