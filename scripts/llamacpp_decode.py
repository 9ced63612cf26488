#!/usr/bin/env python3
"""llama.cpp's speed on the same GGUF file and cores: the reference for `cargo bench --bench
core` (run through scripts/llamacpp-decode.sh). One JSON line per run:
- decoding at batch 1: greedy, the bench's kind of chat prompt, 64 new tokens;
- prefill of 64 tokens (one sequence), and of 32 x 64 tokens as one 2,048-token sequence
  (llama-cpp-python's API evaluates one sequence; its longer attention makes this a little
  harder than the bench's 32 separate sequences).
2 threads unless a second argument says otherwise.
"""
import json
import sys
import time

from llama_cpp import Llama

model = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]) if len(sys.argv) > 2 else 2,
              n_ctx=2304, n_batch=2048, n_ubatch=512, verbose=False)
prompt = "<|im_start|>user\nTell a long story about molecule number 0.<|im_end|>\n<|im_start|>assistant\n"
ids = model.tokenize(prompt.encode(), special=True)
text = model.tokenize(("The SMILES CC(=O)Oc1ccccc1C(=O)O is aspirin, a drug. " * 400).encode())


def report(bench, run, value, unit, **extra):
    print(json.dumps({"bench": bench, "run": run, "value": round(value, 2), "unit": unit, **extra}), flush=True)


for run in range(4):
    model.reset()
    model.eval(ids)
    started = time.perf_counter()
    for _ in range(64):
        model.eval([model.sample(temp=0.0)])
    secs = time.perf_counter() - started
    report("llamacpp_decode_b1", run, 64 / secs, "tokens/s", prompt_tokens=len(ids), seconds=secs)
    for tokens in (64, 2048):
        model.reset()
        started = time.perf_counter()
        model.eval(text[:tokens])
        secs = time.perf_counter() - started
        report(f"llamacpp_prefill_{tokens}", run, tokens / secs, "tokens/s", seconds=secs)
