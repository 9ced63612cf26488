#!/usr/bin/env python3
"""The hardening issue's reproducers, timed: each is sent to `target/release/tagllm serve`
(default model and tags, no training worker) while `/health` is polled every 20 ms and
the server's RSS sampled. Prints one JSON line per reproducer (status, whether the body
is a JSON error, milliseconds), then one for `/health` and RSS, then one for SIGTERM
with an open job event stream. Exits 1 if a reproducer is not answered with a 4xx JSON
error within 100 ms (those that are valid requests since their fix: served, 200, within
the 2 s an admitted request has), `/health` ever took 100 ms or more, or shutdown waited
on the stream. Run from
the repository root after `cargo build --release` and scripts/setup-model.sh.
"""
import json, signal, subprocess, sys, tempfile, threading, time, urllib.error, urllib.request

PORT = 8098
URL = f"http://127.0.0.1:{PORT}"
data_dir = tempfile.mkdtemp(prefix="tagllm-probe-")
srv = subprocess.Popen(["target/release/tagllm", "serve", "--port", str(PORT), "--no-worker",
                        "--data-dir", data_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def call(method, path, body=None, timeout=60):
    """(status, parsed JSON body or None, milliseconds)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(URL + path, data, {"content-type": "application/json"}, method=method)
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    ms = (time.perf_counter() - t) * 1e3
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return status, parsed, ms


for _ in range(240):
    try:
        if call("GET", "/ready", timeout=1)[0] == 200:
            break
    except OSError:
        pass
    time.sleep(0.5)
else:
    sys.exit("the server did not become ready")

health, rss_peak, polling = [], 0, True


def rss_mb():
    return int(open(f"/proc/{srv.pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024


def poll():
    global rss_peak
    while polling:
        health.append(call("GET", "/health", timeout=10)[2])
        rss_peak = max(rss_peak, rss_mb())
        time.sleep(0.02)


poller = threading.Thread(target=poll)
poller.start()

chem = "The SMILES of the molecule is <SMILES> {smiles}. The druglikeness is <QED>"
train = {"stage": 2, "tag": "Probe", "template": "<SMILES> {smiles} <Probe>", "target": "qed",
         "head": "regression", "dataset": {"records": [{"smiles": "CCO", "qed": 0.5}] * 8}}
with_hp = lambda **hp: {**train, "hyperparameters": hp}
cases = [
    ("1 template of 1,000,000 '<'", "POST", "/predict", {"template": "<" * 1_000_000 + "{x}", "inputs": ["a"]}),
    ("1 template of 2,000,000 '<'", "POST", "/predict", {"template": "<" * 2_000_000 + "{x}", "inputs": ["a"]}),
    ("2 24 generations of ~1,000 tokens", "POST", "/predict",
     {"template": "{x}", "inputs": ["word " * 1000] * 24, "parameters": {"max_new_tokens": 4}}),
    ("3 batch_size 2^63", "POST", "/train", with_hp(batch_size=2**63)),
    ("3 steps 10^12", "POST", "/train", with_hp(steps=10**12)),
    ("3 grad_accum 2^63", "POST", "/train", with_hp(grad_accum=2**63)),
    ("3 learning_rate 1e308", "POST", "/train", with_hp(learning_rate=1e308)),
    ("3 batch_size 1e9", "POST", "/train", b'{"stage": 2, "tag": "Probe", "template": "<SMILES> {smiles} <Probe>", '
     b'"target": "qed", "head": "regression", "dataset": {"records": [{"smiles": "CCO", "qed": 0.5}]}, '
     b'"hyperparameters": {"batch_size": 1e9}}'),
    ("3 steps 2^64-1", "POST", "/train", with_hp(steps=2**64 - 1)),
    ("4 tag '..'", "POST", "/train", {"stage": 1, "tag": "..", "dataset": {"records": [{"text": "a b"}]}}),
    ("4 tag '.'", "POST", "/train", {"stage": 1, "tag": ".", "dataset": {"records": [{"text": "a b"}]}}),
    ("7 empty template, object input", "POST", "/predict", {"template": "", "inputs": [{}]}),
    ("7 empty input", "POST", "/predict", {"template": "{x}", "inputs": [""]}),
    ("10 limit=abc", "GET", "/jobs?limit=abc", None),
    ("10 inputs []", "POST", "/predict", {"function": "QED", "inputs": []}),
    ("10 functions QED twice", "POST", "/predict", {"functions": ["QED", "QED"], "inputs": ["CCO"]}),
]
# Valid requests since their fix (a vanishing temperature or top_p decodes greedily): served.
served = [
    ("7 temperature 1e-300", "POST", "/predict",
     {"template": "{x}", "inputs": ["a"], "parameters": {"temperature": 1e-300}}),
    ("7 top_p 1e-300", "POST", "/predict",
     {"template": "{x}", "inputs": ["a"], "parameters": {"temperature": 1, "top_p": 1e-300}}),
]
failed = False
for (name, method, path, body), is_served in [(c, False) for c in cases] + [(c, True) for c in served]:
    status, answer, ms = call(method, path, body)
    is_error = isinstance(answer, dict) and "error" in answer and "error_type" in answer
    if is_served:
        ok = status == 200 and ms < 2000
    else:
        ok = 400 <= status < 500 and is_error and ms < 100
    failed |= not ok
    print(json.dumps({"reproducer": name, "status": status, "json_error": is_error, "ms": round(ms, 1),
                      "ok": ok, "error": (answer or {}).get("error", "")[:100] if is_error else None}))

# Two 2 MB templates at once (the probe's: /health took 22 s).
both = [threading.Thread(target=call, args=("POST", "/predict", {"template": "<" * 2_000_000 + "{x}", "inputs": ["a"]}))
        for _ in range(2)]
t = time.perf_counter()
for th in both:
    th.start()
for th in both:
    th.join()
print(json.dumps({"reproducer": "1 two 2 MB templates at once", "ms": round((time.perf_counter() - t) * 1e3, 1)}))

polling = False
poller.join()
health.sort()
health_ok = health[-1] < 100
failed |= not health_ok
print(json.dumps({"health_polls": len(health), "health_p50_ms": round(health[len(health) // 2], 1),
                  "health_max_ms": round(health[-1], 1), "rss_peak_mb": rss_peak, "ok": health_ok}))

# Item 8: SIGTERM while a job's event stream is open; the server must not wait for its client.
status, accepted, _ = call("POST", "/train", {"stage": 1, "tag": "ProbeDomain", "template": "<ProbeDomain> {text}",
                                               "dataset": {"records": [{"text": "a small probe text"}] * 8}})
if status == 202:
    stream = urllib.request.urlopen(URL + f"/jobs/{accepted['id']}/events", timeout=60)
    time.sleep(0.5)
    t = time.perf_counter()
    srv.send_signal(signal.SIGTERM)
    try:
        srv.wait(timeout=10)
        exit_s = time.perf_counter() - t
    except subprocess.TimeoutExpired:
        exit_s = None
    stream.close()
    ok = exit_s is not None and exit_s < 2
    failed |= not ok
    print(json.dumps({"reproducer": "8 SIGTERM with an event stream open", "exit_s": exit_s and round(exit_s, 2), "ok": ok}))
else:
    failed = True
    print(json.dumps({"reproducer": "8 SIGTERM with an event stream open", "ok": False,
                      "error": f"the job was not accepted: {status} {accepted}"}))
srv.kill()
srv.wait()
sys.exit(1 if failed else 0)
