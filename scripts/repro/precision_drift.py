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
    ap.add_argument("--tasks", nargs="*", default=["QED", "Descriptor", "BA", "Translate"])
    # One generation at a time: q8_0 serves decoding steps of one or two sequences, so a
    # busier batch would measure f32.
    ap.add_argument("--workers", default=1, type=int, help="concurrent generation requests")
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
                if name in args.tasks:
                    r[name] = ev.regression(ev.head_values(server, name, rows, slots), [x[target] for x in rows])
            import sacrebleu
            params = {"max_new_tokens": 32, "temperature": 0, "stop": ["\n"]}  # as evaluate.py
            bodies = [{"template": x["template"], "inputs": [{"text": x["text"]}], "parameters": params}
                      for x in (trans if "Translate" in args.tasks else [])]
            texts = [p[0]["text"] for p in server.predict_all(bodies, workers=args.workers)]
            r["Translate"] = {}
            for pair in sorted({x["pair"] for x in trans}) if texts else []:
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
    heads = [t for t in ["QED", "Descriptor", "BA"] if t in args.tasks]
    print("| " + " | ".join(["precision", *(f"{t} MSE" for t in heads), "chrF (mean of pairs)", "seconds"]) + " |")
    print("|---|" + "---|" * (len(heads) + 2))
    for precision, r in out["results"].items():
        cells = []
        for name in heads:
            v = r[name]["mse"]
            rel = f" ({(v / base[name]['mse'] - 1) * 100:+.1f}%)" if base and precision != "f32" else ""
            cells.append(f"{v:.4f}{rel}")
        chrf, rel = "—", ""
        if r["Translate"]:
            c = sum(r["Translate"].values()) / len(r["Translate"])
            chrf = f"{c:.1f}"
            if base and precision != "f32":
                b = sum(base["Translate"].values()) / len(base["Translate"])
                rel = f" ({(c / b - 1) * 100:+.1f}%)"
        print("| " + " | ".join([precision, *cells, chrf + rel, str(r["seconds"])]) + " |")


if __name__ == "__main__":
    main()
