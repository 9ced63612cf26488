#!/usr/bin/env python3
"""QED on molecules of several collections: each source's own test split, every method
trained on the same mixed training set (data/qed/train_mixed.jsonl: MOSES, ChEMBL by
scaffold, FreeSolv's small molecules, NCI; see prepare_data.other_molecules).

Rows: the training mean; ridge, k-NN and gradient boosting on Morgan fingerprints (chosen
on the same 200 validation molecules as the tag); the tags, through POST /predict of a
`tagllm serve` on each tags directory given (the shipped v2, trained on MOSES alone, and
the one in runs/tags). Writes scripts/repro/qed_sources.json and the table between its
markers in docs/reproduction.md.

    python3 scripts/repro/qed_sources.py --tags "QED v2 (MOSES only)=tags" "QED v3 (mixed)=runs/tags"
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from evaluate import Server, expert_baselines, fmt, head_values, into_page, load, morgan, regression, write_atomic  # noqa: E402

SPLITS = {
    "moses": ("MOSES test", "data/qed/test.jsonl"),
    "chembl_scaffold": ("ChEMBL, unseen scaffolds", "data/qed/test_chembl_scaffold.jsonl"),
    "small": ("small molecules (FreeSolv)", "data/qed/test_small.jsonl"),
    "nci": ("NCI compounds", "data/qed/test_nci.jsonl"),
    "chembl27": ("ChEMBL27 sample (pydebiaseddta)", "data/qed/test_chembl.jsonl"),
}
OUT = Path("scripts/repro/qed_sources.json")
PAGE = Path("docs/reproduction.md")
BEGIN = "<!-- qed sources: begin (qed_sources.py writes this part) -->\n"
END = "<!-- qed sources: end -->\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", nargs="*", default=["QED v3 (mixed)=runs/tags"],
                    help="LABEL=TAGS_DIR: a server per directory, its <QED> evaluated (none: rewrite the table)")
    ap.add_argument("--port", default=8093, type=int)
    args = ap.parse_args()
    train, val = load("data/qed/train_mixed.jsonl"), load("data/qed/val_mixed.jsonl")[:200]
    tests = {k: load(path) for k, (_, path) in SPLITS.items()}
    R = json.loads(OUT.read_text()) if OUT.exists() else {}
    if "experts" not in R:
        print("experts ...", file=sys.stderr, flush=True)
        fp = lambda rows: morgan([r["smiles"] for r in rows])
        R["experts"] = expert_baselines("QED", (train, val, tests, "qed", fp))
    for spec in args.tags:
        label, tags = spec.split("=", 1)
        print(f"{label} ...", file=sys.stderr, flush=True)
        server = Server(Path("runs"), args.port, tags=Path(tags))
        try:
            manifest = json.loads((Path(tags) / "QED" / "manifest.json").read_text())
            R.setdefault("tags", {})[label] = {
                "version": manifest["version"],
                "head": manifest["head"],
                **{k: regression(head_values(server, "QED", rows, ["smiles"]), [r["qed"] for r in rows])
                   for k, rows in tests.items()},
            }
        finally:
            server.stop()
    write_atomic(OUT, json.dumps(R, indent=1) + "\n")
    table = write_table(R)
    into_page(table, PAGE, BEGIN, END)
    print(table)


def write_table(R):
    names = {"mean": "training mean", "ridge": "expert: ridge", "k-NN": "expert: k-NN",
             "gradient boosting": "expert: gradient boosting"}
    head = "| method | " + " | ".join(f"{title} (n {len(load(p))})" for title, p in SPLITS.values()) + " |"
    lines = ["MSE against RDKit's QED (R² in parentheses); every method trained on `train_mixed.jsonl`, "
             "except the tag marked MOSES only.", "", head, "|---|" + "---|" * len(SPLITS)]
    rows = [(names[k], v) for k, v in R["experts"].items()] + [(f"**tagllm: {k}**", v) for k, v in R.get("tags", {}).items()]
    for name, v in rows:
        cells = [f"{fmt(v[s]['mse'])} ({v[s]['r2']:.2f})" if s in v else "—" for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
