#!/usr/bin/env python3
"""Overload probe (issue: hardening): 128 clients send /predict in a tight loop for 30 s
against `target/release/tagllm serve` on the default model and tags, while /health is
polled every 100 ms and the server's RSS sampled; then the 24 x 1,000-token generation
that once took 2.2 GB. Prints one JSON line. Run from the repository root.

The poller is a process of its own: as a thread beside the 128 clients it timed the wait
for Python's interpreter lock as much as the server (/health p50 44 ms, max 217 ms, where
the server's own histogram put every answer within 1 ms).
"""
import concurrent.futures as cf, json, multiprocessing, subprocess, sys, time, urllib.request
port = 8097
srv = subprocess.Popen(["target/release/tagllm", "serve", "--port", str(port), "--no-worker", "--data-dir", "/tmp/probe-data"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}"
for _ in range(120):
    try: urllib.request.urlopen(url + "/ready", timeout=1); break
    except Exception: time.sleep(0.5)
def rss():
    return int(open(f"/proc/{srv.pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024
stop = time.time() + 30
codes = {}
def client(i):
    body = json.dumps({"function": "QED", "inputs": ["CC(=O)Oc1ccccc1C(=O)O" + "C" * (i % 7)]}).encode()
    while time.time() < stop:
        try:
            r = urllib.request.urlopen(urllib.request.Request(url + "/predict", body, {"content-type": "application/json"}), timeout=60)
            r.read(); c = r.status
        except urllib.error.HTTPError as e:
            e.read(); c = e.code
        except Exception:
            c = "err"
        codes[c] = codes.get(c, 0) + 1
def poll(out):
    lat, peak = [], rss()
    while time.time() < stop:
        t = time.time(); urllib.request.urlopen(url + "/health", timeout=10).read(); lat.append(time.time() - t)
        peak = max(peak, rss()); time.sleep(0.1)
    out.put((lat, peak))
results = multiprocessing.Queue()
poller = multiprocessing.Process(target=poll, args=(results,)); poller.start()
with cf.ThreadPoolExecutor(128) as ex: list(ex.map(client, range(128)))
health, peak = results.get(); poller.join()
# The probe's item 2: 24 generations of ~1,000 tokens (now refused by the generation limit).
big = json.dumps({"template": "{x}", "inputs": ["word " * 1000] * 24, "parameters": {"max_new_tokens": 4}}).encode()
t = time.time()
try: urllib.request.urlopen(urllib.request.Request(url + "/predict", big, {"content-type": "application/json"})); big_code = 200
except urllib.error.HTTPError as e: big_code = (e.code, json.loads(e.read())["error"][:90])
big_ms = (time.time() - t) * 1e3
health.sort()
print(json.dumps({"clients": 128, "seconds": 30, "status_counts": codes, "health_p50_ms": round(health[len(health)//2]*1e3, 1),
                  "health_max_ms": round(health[-1]*1e3, 1), "health_polls": len(health), "rss_peak_mb": peak, "big_generation": big_code, "big_generation_ms": round(big_ms, 1)}))
srv.terminate(); srv.wait()
