#!/usr/bin/env python3
"""llama.cpp's batch-1 decode speed on the same GGUF file and cores: the reference for
`cargo bench --bench core -- decode` (run through scripts/llamacpp-decode.sh).

Greedy, the bench's kind of chat prompt, 64 new tokens, 2 threads; one JSON line per run.
"""
import json
import sys
import time

from llama_cpp import Llama

model = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]) if len(sys.argv) > 2 else 2,
              n_ctx=512, verbose=False)
prompt = "<|im_start|>user\nTell a long story about molecule number 0.<|im_end|>\n<|im_start|>assistant\n"
ids = model.tokenize(prompt.encode(), special=True)
for run in range(4):
    model.reset()
    model.eval(ids)
    started = time.perf_counter()
    for _ in range(64):
        model.eval([model.sample(temp=0.0)])
    secs = time.perf_counter() - started
    print(json.dumps({"bench": "llamacpp_decode_b1", "run": run, "value": round(64 / secs, 2),
                      "unit": "tokens/s", "prompt_tokens": len(ids), "seconds": secs}), flush=True)
