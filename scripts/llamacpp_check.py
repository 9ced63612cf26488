#!/usr/bin/env python3
"""tagllm against llama.cpp (llama-cpp-python) on one GGUF: tokenization of 1,200 varied
strings (scripts, code, SMILES, protein sequences, whitespace runs, emoji, numbers) and
greedy continuations (32 tokens) of 24 chat prompts. A continuation may diverge only where
llama.cpp's own top-2 logit margin is under 0.5 (llama.cpp quantizes activations, which
moves logits by 0.1-0.3). Run through scripts/llamacpp-check.sh; writes a JSON report.

    python3 scripts/llamacpp_check.py MODEL.gguf TAGLLM_BINARY OUT.json
"""
import json
import random
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

NEAR_TIE = 0.5
SCRIPTS = [
    "The quick brown fox jumps over the lazy dog.", "Ça coûte 12,50 € — n'est-ce pas ?",
    "Größe, Übermaß und Straße", "¿Dónde está la biblioteca? ¡Allí!", "Съешь же ещё этих мягких булок",
    "Καλημέρα κόσμε", "日本語のテキストと漢字", "中文分词测试：模型、数据。", "한국어 문장입니다",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu",
    "İstanbul'da ılık bir gün", "Zażółć gęślą jaźń",
]
CODE = [
    "def f(x):\n    return x**2 + 1\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "fn main() {\n\tprintln!(\"{}\", 42);\n}", "SELECT id, name FROM users WHERE age >= 18;",
    "const x = arr.map((v) => v * 2).filter(Boolean);", "<div class=\"a\">&nbsp;</div>",
    "#include <stdio.h>\nint main(void){return 0;}", "if [ -f \"$1\" ]; then echo ok; fi",
    "{\"key\": [1, 2.5, null, true], \"k2\": \"v\"}", "x_1 = np.zeros((3, 4), dtype=np.float32)",
]
SMILES = [
    "CCO", "CC(=O)Oc1ccccc1C(=O)O", "C1=CC=CC=C1", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "O=C(O)C[C@@H](N)C(=O)O", "CC(C)Cc1ccc(cc1)[C@@H](C)C(=O)O", "Clc1ccc(Br)cc1[N+](=O)[O-]",
    "C#N", "[Na+].[Cl-]", "CC1=C(C(=O)OC1)c1ccccc1F",
]
AMINO = "ACDEFGHIKLMNPQRSTVWY"
EMOJI = ["😀", "🚀🚀", "👍🏽", "🇫🇷", "❤️", "🧬", "👨‍👩‍👧", "∑∫√∞", "→ ← ↑"]
WHITESPACE = [" ", "  ", "\t", "\n", "\n\n", "   \n\t ", "\r\n", "    "]
NUMBERS = ["0", "7", "42", "123", "2024", "3.14159", "1,000,000", "-17", "1e-9", "0x1F"]

PROMPTS = [
    "What is the capital of France?", "Write a Python function that reverses a string.",
    "Explain what a SMILES string is in one sentence.", "Translate to French: The cat is on the table.",
    "List three prime numbers.", "What does DNA stand for?", "Give a haiku about the sea.",
    "How many legs does a spider have?", "Write a SQL query that counts rows in a table named users.",
    "What is 17 times 23?", "Name a protein found in blood.", "Summarise: The sun is a star at the centre of the solar system.",
    "What is the boiling point of water in Celsius?", "Write a bash command that lists files by size.",
    "Is CCO ethanol?", "What language is spoken in Brazil?", "Explain recursion to a child.",
    "Complete: def add(a, b):", "What is the plural of mouse?", "Which planet is largest?",
    "Convert 5 kilometres to miles.", "Write a JavaScript arrow function that squares a number.",
    "What is photosynthesis?", "Name the author of Hamlet.",
]


def strings(n, seed=0):
    rng = random.Random(seed)
    pools = [SCRIPTS, CODE, SMILES, EMOJI, WHITESPACE, NUMBERS]
    out = list(SCRIPTS + CODE + SMILES + EMOJI + WHITESPACE + NUMBERS)
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:  # a protein sequence, sometimes long
            out.append("".join(rng.choice(AMINO) for _ in range(rng.choice([8, 30, 120, 400]))))
        elif kind == 1:  # a whitespace run inside text
            out.append(rng.choice(SCRIPTS) + rng.choice(WHITESPACE) * rng.randint(1, 6) + rng.choice(CODE))
        else:  # a mix of pieces
            out.append("".join(rng.choice(rng.choice(pools)) + rng.choice(["", " ", "\n"])
                               for _ in range(rng.randint(2, 6))))
    return out[:n]


def tagllm_lines(binary, model, args, texts):
    proc = subprocess.run([binary, *args, "--model", model, "-"], input="".join(json.dumps(t) + "\n" for t in texts),
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main():
    model_path, binary, out_path = sys.argv[1:4]
    llm = Llama(model_path=model_path, n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    texts = strings(1200)
    ours = tagllm_lines(binary, model_path, ["tokenize"], texts)
    theirs = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    token_mismatches = [{"text": t, "tagllm": o["ids"], "llamacpp": r}
                        for t, o, r in zip(texts, ours, theirs) if o["ids"] != r]
    generations = tagllm_lines(binary, model_path, ["generate", "--json", "--max-new-tokens", "32"], PROMPTS)
    results = []
    for prompt, ours_gen in zip(PROMPTS, generations):
        # llama.cpp continues the very ids tagllm fed (its chat template, rendered by tagllm).
        llm.reset()
        llm.eval(ours_gen["prompt_ids"])
        ids, margins = [], []
        for _ in range(len(ours_gen["ids"]) or 1):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            top = np.argsort(logits)[-2:]
            ids.append(int(top[1]))
            margins.append(float(logits[top[1]] - logits[top[0]]))
            if llm.token_eos() == ids[-1] or len(ids) >= 32:
                break
            llm.eval([ids[-1]])
        first = next((i for i, (a, b) in enumerate(zip(ours_gen["ids"], ids)) if a != b), None)
        equal = first is None and len(ours_gen["ids"]) == len(ids)
        results.append({"prompt": prompt, "equal": equal, "first_divergence": first,
                        "margin_there": None if first is None else margins[first],
                        "near_tie": first is not None and margins[first] < NEAR_TIE,
                        "tagllm": ours_gen["text"], "llamacpp": llm.detokenize(ids).decode(errors="replace")})
    report = {
        "model": model_path,
        "tokenization": {"strings": len(texts), "equal": len(texts) - len(token_mismatches),
                         "mismatches": token_mismatches[:20]},
        "greedy": {"prompts": len(PROMPTS), "equal": sum(r["equal"] for r in results),
                   "diverged_at_near_tie": sum(r["near_tie"] for r in results),
                   "diverged_otherwise": sum(not r["equal"] and not r["near_tie"] for r in results),
                   "results": results},
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    t, g = report["tokenization"], report["greedy"]
    print(f"tokenization: {t['equal']}/{t['strings']} equal; greedy: {g['equal']}/{g['prompts']} equal, "
          f"{g['diverged_at_near_tie']} diverged at a near-tie (< {NEAR_TIE}), {g['diverged_otherwise']} otherwise")


if __name__ == "__main__":
    main()
