#!/usr/bin/env python3
"""How much serving at a quantized precision (`tagllm serve --precision`) changes the
shipped tags' test metrics: every shipped head tag and <Translate>, evaluated through
`POST /predict` of a server on tags/ at each precision, exactly as evaluate.py does at f32.
Writes scripts/repro/precision_drift.json and prints a table. f32 is evaluated too, so the
comparison is between the same tag versions through the same code.

Run after `make build` and `prepare_data.py --check`:
    python3 scripts/repro/precision_drift.py [--precisions f32 q8_0]
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import evaluate as ev  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--precisions", nargs="*", default=["f32", "q8_0"])
    ap.add_argument("--runs", default="runs/drift", type=Path)
    ap.add_argument("--port", default=8093, type=int)
    ap.add_argument("--out", default="scripts/repro/precision_drift.json", type=Path)
    args = ap.parse_args()
    tags = Path("tags")
    versions = {t: json.loads((tags / t / "manifest.json").read_text())["version"]
                for t in ["QED", "Descriptor", "BA", "Translate"]}
    qed = ev.load("data/qed/test.jsonl")
    desc = ev.load("data/descriptor/test.jsonl")
    ba = ev.load("data/ba/test.jsonl")
    trans = ev.load("data/translate/test.jsonl")
    out = {"tag_versions": versions, "results": {}}
    for precision in args.precisions:
        started = time.time()
        server = ev.Server(args.runs, args.port, tags=tags, precision=precision)
        try:
            r = {}
            for name, rows, slots, target in [("QED", qed, ["smiles"], "qed"), ("Descriptor", desc, ["protein"], "blosum1"),
                                              ("BA", ba, ["protein", "smiles"], "affinity")]:
                r[name] = ev.regression(ev.head_values(server, name, rows, slots), [x[target] for x in rows])
            import sacrebleu
            texts = ev.generate(server, lambda x: x["template"], trans, ["text"], 32)
            r["Translate"] = {}
            for pair in sorted({x["pair"] for x in trans}):
                idx = [i for i, x in enumerate(trans) if x["pair"] == pair]
                r["Translate"][pair] = sacrebleu.corpus_chrf([ev.clean(texts[i]) for i in idx],
                                                             [[trans[i]["target"] for i in idx]]).score
        finally:
            server.stop()
        r["seconds"] = round(time.time() - started)
        out["results"][precision] = r
        print(precision, json.dumps(r), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    base = out["results"].get("f32")
    print("| precision | QED MSE | Descriptor MSE | BA MSE | chrF (mean of pairs) | seconds |")
    print("|---|---|---|---|---|---|")
    for precision, r in out["results"].items():
        chrf = sum(r["Translate"].values()) / len(r["Translate"])
        cells = []
        for name in ["QED", "Descriptor", "BA"]:
            v = r[name]["mse"]
            rel = f" ({(v / base[name]['mse'] - 1) * 100:+.1f}%)" if base and precision != "f32" else ""
            cells.append(f"{v:.4f}{rel}")
        rel = ""
        if base and precision != "f32":
            b = sum(base["Translate"].values()) / len(base["Translate"])
            rel = f" ({(chrf / b - 1) * 100:+.1f}%)"
        print(f"| {precision} | {' | '.join(cells)} | {chrf:.1f}{rel} | {r['seconds']} |")


if __name__ == "__main__":
    main()
