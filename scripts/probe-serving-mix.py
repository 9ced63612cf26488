#!/usr/bin/env python3
"""The serving-mix issue's scenarios against a running server (as `make serve` starts it, with
the shipped tags), as a new user would meet them. Prints one JSON line per scenario:

  generations   N clients each ask for a 64-token generation at once: statuses, aggregate
                generated tokens/s (N = 1, 16, 64)
  head_idle     one-input <QED> of "CCO" on an idle server: wall and x-inference-time p50
  head_during   a one-input <QED> sent while one request of 8 inputs x ~1,000 prompt tokens
                generates: status and latency
  storm         C clients sending one-input <QED> requests for S seconds (no back-off): served
                inputs/s against one request of C inputs on the same server, and the
                engine's pace in /info before and after
  storm_polite  the same with clients that wait as long as a 429's Retry-After says

Usage: scripts/probe-serving-mix.py [URL] [--storm-seconds S] [--only NAME]
"""
import argparse
import concurrent.futures as cf
import json
import statistics
import time

import requests

SMILES = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "CCN(CC)CC", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
          "OC(=O)CCC(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C1CCCCC1"]


def post(url, body, session=None, timeout=600):
    s = session or requests
    t = time.perf_counter()
    r = s.post(url + "/predict", json=body, timeout=timeout)
    return r, time.perf_counter() - t


def generations(url, n):
    body = lambda i: {"template": "<|im_start|>user\nTell a long story about {x}.<|im_end|>\n<|im_start|>assistant\n",
                      "inputs": [f"molecule number {i}"], "parameters": {"max_new_tokens": 64}}
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: post(url, body(i)), range(n)))
    wall = time.perf_counter() - t
    statuses = {}
    tokens = 0
    for r, _ in results:
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.ok:
            tokens += len(r.json()["predictions"][0]["ids"])
    return {"scenario": "generations", "clients": n, "statuses": statuses,
            "tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}


def head_idle(url, runs=15):
    s = requests.Session()
    post(url, {"function": "QED", "inputs": ["CCO"]}, s)  # warm-up
    wall, inference = [], []
    for _ in range(runs):
        r, secs = post(url, {"function": "QED", "inputs": ["CCO"]}, s)
        assert r.ok, r.text
        wall.append(secs * 1e3)
        inference.append(float(r.headers.get("x-inference-time", "nan")))
    return {"scenario": "head_idle", "wall_p50_ms": round(statistics.median(wall), 1),
            "x_inference_time_p50_ms": statistics.median(inference),
            "x_queue_time_p50_ms": None}


def head_during(url):
    words = "the quick brown fox jumps over the lazy dog and " * 120

    long_input = " ".join(words.split()[:900])
    big = {"template": "{x}", "inputs": [long_input] * 8, "parameters": {"max_new_tokens": 64}}
    with cf.ThreadPoolExecutor(2) as pool:
        gen = pool.submit(post, url, big)
        time.sleep(1.0)
        r, secs = post(url, {"function": "QED", "inputs": ["CCO"]})
        g, gsecs = gen.result()
    return {"scenario": "head_during", "head_status": r.status_code, "head_seconds": round(secs, 3),
            "head_body": r.text[:200] if not r.ok else None,
            "generation_status": g.status_code, "generation_seconds": round(gsecs, 1)}


def storm(url, clients, seconds, polite=False):
    one = {"function": "QED", "inputs": [SMILES[i % len(SMILES)] for i in range(clients)]}
    r, secs = post(url, one)
    assert r.ok, r.text
    batch_rate = clients / secs
    pace_before = requests.get(url + "/info").json()["limits"]["pace_units_per_second"]
    stop = time.perf_counter() + seconds
    def client(c):
        s = requests.Session()
        ok = refused = other = 0
        while time.perf_counter() < stop:
            r, _ = post(url, {"function": "QED", "inputs": [SMILES[c % len(SMILES)]]}, s)
            if r.status_code == 200:
                ok += 1
            elif r.status_code == 429:
                refused += 1
                if polite:
                    time.sleep(float(r.headers.get("retry-after", "1")))
            else:
                other += 1
        return ok, refused, other
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t
    pace_after = requests.get(url + "/info").json()["limits"]["pace_units_per_second"]
    ok = sum(r[0] for r in res)
    return {"scenario": "storm_polite" if polite else "storm", "clients": clients, "seconds": round(wall, 1), "served": ok,
            "refused": sum(r[1] for r in res), "other": sum(r[2] for r in res),
            "served_per_s": round(ok / wall, 2), "one_request_inputs_per_s": round(batch_rate, 2),
            "ratio": round(ok / wall / batch_rate, 3),
            "pace_before": round(pace_before, 1), "pace_after": round(pace_after, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url", nargs="?", default="http://127.0.0.1:8080")
    ap.add_argument("--storm-seconds", type=float, default=30)
    ap.add_argument("--only")
    a = ap.parse_args()
    runs = [("head_idle", lambda: head_idle(a.url))]
    runs += [(f"generations", lambda n=n: generations(a.url, n)) for n in (1, 16, 64)]
    runs += [("head_during", lambda: head_during(a.url)),
             ("storm", lambda: storm(a.url, 64, a.storm_seconds)),
             ("storm_polite", lambda: storm(a.url, 64, a.storm_seconds, polite=True))]
    for name, run in runs:
        if a.only and a.only != name:
            continue
        print(json.dumps(run()), flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
