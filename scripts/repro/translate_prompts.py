#!/usr/bin/env python3
"""<Translate> against the strongest prompt in words: per pair, chrF of the tag and of the
base model prompted two ways (a chat turn, as evaluate.py prompts it, and a plain
completion prompt), and the share of each method's outputs that a language identifier
(py3langid, restricted to the six languages) reads as the target language.

Everything goes through POST /predict of a `tagllm serve` on the given tags directory,
greedy, cut at the first newline, as evaluate.py does. Writes
scripts/repro/translate_prompts.json and the table between its markers in
docs/reproduction.md.

    python3 scripts/repro/translate_prompts.py --tags tags
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from evaluate import LANG_NAMES, Server, chat, clean, generate, into_page, load, write_atomic  # noqa: E402

PROMPTS = {
    "chat": lambda src, tgt: chat(f"Translate this {src} text to {tgt}: {{text}}"),
    "completion": lambda src, tgt: f"Translate from {src} to {tgt}.\n{src}: {{text}}\n{tgt}:",
}
OUT = Path("scripts/repro/translate_prompts.json")
PAGE = Path("docs/reproduction.md")
BEGIN = "<!-- translate prompts: begin (translate_prompts.py writes this part) -->\n"
END = "<!-- translate prompts: end -->\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", default="tags", type=Path)
    ap.add_argument("--port", default=8094, type=int)
    args = ap.parse_args()
    import py3langid
    import sacrebleu

    identify = py3langid.langid.LanguageIdentifier.from_pickled_model(py3langid.langid.MODEL_FILE, norm_probs=True)
    identify.set_languages(list(LANG_NAMES))
    test = load("data/translate/test.jsonl")
    names = lambda r: (LANG_NAMES[r["pair"][:2]], LANG_NAMES[r["pair"][3:]])
    server = Server(Path("runs"), args.port, tags=args.tags)
    try:
        outputs = {"<Translate>": generate(server, lambda r: r["template"], test, ["text"], 32)}
        for name, prompt in PROMPTS.items():
            print(f"prompt: {name} ...", file=sys.stderr, flush=True)
            outputs[f"prompted ({name})"] = generate(server, lambda r: prompt(*names(r)), test, ["text"], 32)
    finally:
        server.stop()
    R = {}
    for pair in sorted({r["pair"] for r in test}):
        idx = [i for i, r in enumerate(test) if r["pair"] == pair]
        refs = [[test[i]["target"] for i in idx]]
        target = pair[3:]
        row = {"n": len(idx)}
        for method, texts in outputs.items():
            hyp = [clean(texts[i]) for i in idx]
            in_target = sum(identify.classify(h)[0] == target for h in hyp if h) / len(hyp)
            row[method] = {"chrf": sacrebleu.corpus_chrf(hyp, refs).score, "in_target_language": in_target,
                           "examples": [(test[i]["text"], hyp[k]) for k, i in enumerate(idx[:3])]}
        R[pair] = row
    write_atomic(OUT, json.dumps(R, indent=1, ensure_ascii=False) + "\n")
    table = write_table(R)
    into_page(table, PAGE, BEGIN, END)
    print(table)


def write_table(R):
    methods = ["<Translate>"] + [f"prompted ({p})" for p in PROMPTS]
    lines = ["chrF (share of outputs identified as the target language); the best prompt per pair in bold.", "",
             "| pair | n | " + " | ".join(f"`{m}`" if m.startswith("<") else m for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for pair, row in R.items():
        best = max(methods[1:], key=lambda m: row[m]["chrf"])
        cells = []
        for m in methods:
            cell = f"{row[m]['chrf']:.1f} ({100 * row[m]['in_target_language']:.0f}%)"
            cells.append(f"**{cell}**" if m == best else cell)
        lines.append(f"| {pair} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
