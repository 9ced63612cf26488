#!/usr/bin/env python3
"""Evaluates the reproduction on held-out test splits and writes the results table.

- Non-LLM baselines (scikit-learn): the training mean; ridge, k-NN and gradient boosting on
  Morgan fingerprints (molecules), amino-acid / dipeptide composition (proteins), both
  concatenated (binding affinity).
- A linear probe: ridge on the frozen base model's last hidden state (`tagllm embed`).
- Everything with tags, and the base model prompted in words, through the HTTP API of a
  `tagllm serve` started here on runs/tags (POST /predict), as a user would call it.

Writes runs/results.json and runs/results.md, records the test metrics in the manifests
of the shipped tags and copies those into tags/.
"""
import argparse
import concurrent.futures as cf
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

BIN = "target/release/tagllm"
SHIPPED = ["SMILES", "Protein", "EN", "FR", "DE", "IT", "ES", "PT", "QED", "Descriptor", "BA", "Translate"]
LANG_NAMES = {"en": "English", "fr": "French", "de": "German", "it": "Italian", "es": "Spanish", "pt": "Portuguese"}
PROBE_TRAIN = 1000  # training examples the linear probe fits on (features cost a forward each)
PROMPTED_N = 100  # test examples the base model is prompted on in words (generation is slow)
TEXT_N = 200  # test examples for the no-head ablation (generation)


def load(path):
    return [json.loads(l) for l in open(path, encoding="utf-8")]


def regression(pred, y):
    pred, y = np.asarray(pred, float), np.asarray(y, float)
    mse = float(np.mean((pred - y) ** 2))
    out = {"n": len(y), "mse": mse, "r2": 1 - mse / float(np.var(y))}
    if np.ptp(pred) > 1e-12:
        from scipy.stats import pearsonr, spearmanr

        out["pearson"] = float(pearsonr(pred, y)[0])
        out["spearman"] = float(spearmanr(pred, y)[0])
    else:
        out["pearson"] = out["spearman"] = 0.0
    out["ci"] = concordance_index(pred, y)
    return out


def concordance_index(pred, y):
    pred, y = np.asarray(pred, float), np.asarray(y, float)
    dy = y[:, None] - y[None, :]
    dp = pred[:, None] - pred[None, :]
    pairs = dy > 0
    score = (dp > 0) + 0.5 * (dp == 0)
    return float(score[pairs].sum() / pairs.sum())


# ---------------------------------------------------------------- non-LLM baselines

def morgan(smiles, bits=2048):
    from rdkit import Chem, DataStructs, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=bits)
    out = np.zeros((len(smiles), bits), dtype=np.float32)
    for i, s in enumerate(smiles):
        m = Chem.MolFromSmiles(s)
        if m is not None:
            DataStructs.ConvertToNumpyArray(gen.GetFingerprint(m), out[i])
    return out


AA = "ACDEFGHIKLMNPQRSTVWY"


def composition(seqs, k=1):
    import itertools

    kmers = {"".join(p): i for i, p in enumerate(itertools.product(AA, repeat=k))}
    out = np.zeros((len(seqs), len(kmers)), dtype=np.float32)
    for i, s in enumerate(seqs):
        for j in range(len(s) - k + 1):
            idx = kmers.get(s[j : j + k])
            if idx is not None:
                out[i, idx] += 1
        out[i] /= max(1, len(s) - k + 1)
    return out


def fit_select(models, Xtr, ytr, Xva, yva):
    """Each family's best setting by validation MSE (test data never seen here)."""
    best = None
    for name, make in models:
        m = make().fit(Xtr, ytr)
        mse = float(np.mean((m.predict(Xva) - yva) ** 2))
        if best is None or mse < best[0]:
            best = (mse, name, m)
    return best


def expert_baselines(task, data):
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor

    tr, va, te, target, featurize = data
    X = {"train": featurize(tr), "val": featurize(va), **{split: featurize(rows) for split, rows in te.items()}}
    y = {"train": [r[target] for r in tr], "val": [r[target] for r in va], **{s: [r[target] for r in rows] for s, rows in te.items()}}
    ytr, yva = np.array(y["train"]), np.array(y["val"])
    # k-NN compares fingerprints as bit sets (Jaccard); compositions stay real-valued.
    bits = task != "Descriptor"
    families = {
        "ridge": [(f"alpha={a}", lambda a=a: Ridge(alpha=a)) for a in [0.01, 0.1, 1, 10, 100]],
        "k-NN": [(f"k={k}", lambda k=k: KNeighborsRegressor(n_neighbors=k, metric="jaccard" if bits else "euclidean",
                                                                     weights="distance"))
                 for k in [5, 10, 20]],
        "gradient boosting": [(f"lr={lr}", lambda lr=lr: HistGradientBoostingRegressor(learning_rate=lr, max_iter=300, random_state=0))
                              for lr in [0.05, 0.1]],
    }
    out = {"mean": {split: regression([ytr.mean()] * len(rows), y[split]) for split, rows in te.items()}}
    for fam, models in families.items():
        view = (lambda M: M > 0) if fam == "k-NN" and bits else (lambda M: M)
        _, setting, model = fit_select(models, view(X["train"]), ytr, view(X["val"]), yva)
        out[fam] = {split: {**regression(model.predict(view(X[split])), y[split]), "setting": setting} for split in te}
    return out


# ---------------------------------------------------------------- the API

class Server:
    def __init__(self, runs, port, tags=None, precision="f32"):
        self.url = f"http://127.0.0.1:{port}"
        (runs / "logs").mkdir(parents=True, exist_ok=True)
        log = open(runs / "logs" / "serve.log", "w")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--tags-dir", str(tags or runs / "tags"), "--data-dir", str(runs / "serve"), "--no-worker",
             "--no-watch", "--port", str(port), "--max-batch-inputs", "256", "--precision", precision,
             # An offline evaluation wants its requests queued, not refused with 429.
             "--max-queue-ms", "3600000"],
            stdout=log, stderr=log)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/ready", timeout=2)
                return
            except Exception:
                time.sleep(1)
        raise SystemExit("the server did not become ready; see runs/logs/serve.log")

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"content-type": "application/json"})
        for _ in range(100):
            try:
                with urllib.request.urlopen(req, timeout=3600) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                if e.code != 429:
                    raise SystemExit(f"{path}: {e.code} {e.read().decode()}")
                time.sleep(float(e.headers.get("retry-after", "1")))
        raise SystemExit(f"{path}: still refused (429) after 100 tries")

    def predict_all(self, requests, workers=4):
        """POSTs /predict bodies concurrently (the engine batches them); results in order."""
        with cf.ThreadPoolExecutor(workers) as ex:
            return list(ex.map(lambda b: self.post("/predict", b)["predictions"], requests))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


class Memo:
    """Results of finished steps (keyed by what they depend on, tag versions included), so
    that a rerun after a crash or a retrained tag redoes only what changed."""

    def __init__(self, path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, key, compute):
        if key not in self.data:
            self.data[key] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        return self.data[key]


def tag_key(runs, *tags):
    return ",".join(f"{t}@{json.loads((runs / 'tags' / t / 'manifest.json').read_text())['version']}" for t in tags)


def chunks(rows, n):
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def head_values(server, function, rows, slots):
    bodies = [{"function": function, "inputs": [{s: r[s] for s in slots} for r in c]} for c in chunks(rows, 32)]
    return [p["value"] for preds in server.predict_all(bodies) for p in preds]


def generate(server, template_of, rows, slots, max_new_tokens, stop=("\n",)):
    """One request per template (per record for per-record templates), greedy."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "stop": list(stop)}
    bodies = [{"template": template_of(r), "inputs": [{s: r[s] for s in slots}], "parameters": params} for r in rows]
    return [preds[0]["text"] for preds in server.predict_all(bodies, workers=8)]


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
SPECIAL = re.compile(r"<\|[^|]*\|>.*", re.S)


def clean(text):
    """The answer: up to the first special token (`<|im_end|>` ends a chat turn)."""
    return SPECIAL.sub("", text).strip()


def parse_numbers(texts, fallback):
    vals, ok = [], 0
    for t in texts:
        m = NUMBER.search(clean(t))
        v = float(m.group()) if m else float("nan")
        if m and math.isfinite(v):
            ok += 1
        else:
            v = fallback
        vals.append(v)
    return vals, ok / max(1, len(texts))


def chat(question):
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- the run

def ba_feat(rows):
    """A pair as its ligand's fingerprint and its protein's 2-mer composition."""
    return np.hstack([morgan([r["smiles"] for r in rows], 1024), composition([r["protein"] for r in rows], 2)])


def warm_baselines(ba_warm, val200):
    """The experts on the warm re-split of the KIBA sample (prepare_data.warm_split)."""
    return expert_baselines("BA warm", (ba_warm["train"], val200(ba_warm), {"test": ba_warm["test"]}, "affinity", ba_feat))


def descriptor_experts(desc, val200):
    return expert_baselines("Descriptor", (desc["train"], val200(desc), {"test": desc["test"], "whole": desc["test_whole"]}, "blosum1",
                                           lambda rows: composition([r["protein"] for r in rows])))


def baselines(R, runs, qed, desc, ba, val200, skip_probe):
    # Non-LLM experts.
    print("baselines ...", file=sys.stderr, flush=True)
    fp = lambda rows: morgan([r["smiles"] for r in rows])
    R["QED"] = expert_baselines("QED", (qed["train"], val200(qed), {"test": qed["test"], "chembl": qed["test_chembl"]}, "qed", fp))
    R["Descriptor"] = descriptor_experts(desc, val200)
    R["BA"] = expert_baselines("BA", (ba["train"], val200(ba), {"test": ba["test"]}, "affinity", ba_feat))

    # Linear probe on the frozen model's last hidden state.
    probes = {
        "QED": ("The molecule {smiles} has druglikeness", qed, "qed", {"test": "test", "chembl": "test_chembl"}),
        "Descriptor": ("The protein {protein} has BLOSUM index", desc, "blosum1", {"test": "test"}),
        "BA": ("The protein {protein} binds the molecule {smiles} with affinity", ba, "affinity", {"test": "test"}),
    }
    if not skip_probe:
        from sklearn.linear_model import Ridge

        for task, (template, d, target, tests) in probes.items():
            print(f"linear probe {task} ...", file=sys.stderr, flush=True)
            feats = {}
            for split, rows in [("train", d["train"][:PROBE_TRAIN]), ("val", val200(d))] + [(k, d[v]) for k, v in tests.items()]:
                path = runs / "data" / f"probe_{task}_{split}.jsonl"
                with open(path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                out = subprocess.run([BIN, "embed", "--tags-dir", str(runs / "tags"), "--template", template, "--data", str(path)],
                                     check=True, capture_output=True, text=True).stdout
                feats[split] = (np.array([json.loads(l) for l in out.splitlines()]), np.array([r[target] for r in rows]))
            mu, sd = feats["train"][0].mean(0), feats["train"][0].std(0) + 1e-6
            z = lambda X: (X - mu) / sd
            _, setting, model = fit_select([(f"alpha={a}", lambda a=a: Ridge(alpha=a)) for a in [1, 10, 100, 1000, 10000]],
                                           z(feats["train"][0]), feats["train"][1], z(feats["val"][0]), feats["val"][1])
            R[task]["linear probe"] = {k: {**regression(model.predict(z(feats[k][0])), feats[k][1]), "setting": setting} for k in tests}



def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default="runs", type=Path)
    ap.add_argument("--port", default=8091, type=int)
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--baselines-only", action="store_true", help="compute runs/baselines.json and stop")
    ap.add_argument("--only", nargs="*", help="re-evaluate just these tags; every other row (baselines "
                    "included) is taken from --previous, e.g. after retraining one tag")
    ap.add_argument("--previous", default="scripts/repro/results.json", type=Path)
    args = ap.parse_args()
    runs = args.runs
    R = {}
    started = time.time()

    qed = {s: load(f"data/qed/{s}.jsonl") for s in ["train", "val", "test", "test_chembl", "test_chembl_scaffold",
                                                     "test_small", "test_nci"]}
    desc = {s: load(f"data/descriptor/{s}.jsonl") for s in ["train", "val", "test", "test_whole"]}
    # The splits of other sources and shapes (issue 30: inputs of the kind users send);
    # scripts/repro/qed_sources.py compares every method on them.
    qed_tests = {"test": "test", "chembl": "test_chembl", "chembl_scaffold": "test_chembl_scaffold",
                 "small": "test_small", "nci": "test_nci"}
    ba = {s: load(f"data/ba/{s}.jsonl") for s in ["train", "val", "test"]}
    ba_warm = {s: load(f"data/ba_warm/{s}.jsonl") for s in ["train", "val", "test"]}
    val200 = lambda d: d["val"][:200]  # what model selection saw, for every method alike

    cached = runs / "baselines.json"  # experts and probes do not depend on the tags: computed once
    if args.only:
        R = json.loads(args.previous.read_text())
        R.pop("seconds", None)
    elif cached.exists():
        R = json.loads(cached.read_text())
    else:
        baselines(R, runs, qed, desc, ba, val200, args.skip_probe)
        cached.write_text(json.dumps(R, indent=1) + "\n")
    if args.only and "Descriptor" in args.only:
        # Its training file grew (prepare_data: every labelled protein); the experts train
        # on the same rows as the tag. The linear probe keeps its PROBE_TRAIN rows.
        R["Descriptor"].update(descriptor_experts(desc, val200))
    if "BA warm" not in R:  # results from before the warm split existed
        R["BA warm"] = warm_baselines(ba_warm, val200)
    if args.baselines_only:
        return

    memo = Memo(runs / "evaluation_cache.json")
    present = {p.name for p in (runs / "tags").iterdir()}  # what the server below loads
    server = Server(runs, args.port)
    try:
        # Tags with heads (and the no-domain ablation).
        for task, tag, d, slots, target, tests in [
            ("QED", "QED", qed, ["smiles"], "qed", qed_tests),
            ("QED", "QEDNoDomain", qed, ["smiles"], "qed", {"test": "test", "chembl": "test_chembl"}),
            ("Descriptor", "Descriptor", desc, ["protein"], "blosum1", {"test": "test", "whole": "test_whole"}),
            ("BA", "BA", ba, ["protein", "smiles"], "affinity", {"test": "test"}),
            ("BA warm", "BAWarm", ba_warm, ["protein", "smiles"], "affinity", {"test": "test"}),
        ]:
            if tag not in present:
                print(f"{tag}: not trained, skipped", file=sys.stderr)
                continue
            if args.only and tag not in args.only:
                continue
            print(f"<{tag}> ...", file=sys.stderr, flush=True)
            R[task][f"<{tag}>"] = memo(tag_key(runs, tag), lambda: {
                k: regression(head_values(server, tag, d[v], slots), [r[target] for r in d[v]]) for k, v in tests.items()})

        # No head: the function tag generates the number as text.
        wanted = lambda name: not args.only or name in args.only
        if "QEDText" in present and wanted("QEDText"):
            print("<QEDText> ...", file=sys.stderr, flush=True)
            rows = qed["test"][:TEXT_N]
            texts = memo(tag_key(runs, "QEDText"), lambda: generate(
                server, lambda r: "The molecule <SMILES> {smiles} has druglikeness <QEDText>", rows, ["smiles"], 8))
            vals, parsed = parse_numbers(texts, float(np.mean([r["qed"] for r in qed["train"]])))
            R["QED"]["<QEDText> (no head)"] = {"test": {**regression(vals, [r["qed"] for r in rows]), "parsed": parsed,
                                                         "examples": texts[:5]}}

        # The base model prompted in words (no tags), chat template, greedy.
        print("prompted base model ...", file=sys.stderr, flush=True)
        for task, d, slots, target, question in [] if args.only else [
            ("QED", qed, ["smiles"], "qed", "What is the QED drug-likeness score (a number between 0 and 1) of the molecule with SMILES {smiles}? Answer with the number only."),
            ("Descriptor", desc, ["protein"], "blosum1", "What is the first BLOSUM index (a number between -1 and 1) of the protein sequence {protein}? Answer with the number only."),
            ("BA", ba, ["protein", "smiles"], "affinity", "What is the KIBA binding affinity score (a number between 10 and 15) of the molecule {smiles} to the protein {protein}? Answer with the number only."),
        ]:
            rows = d["test"][:PROMPTED_N]
            # The answer is begun for the model, so that it goes straight to a number.
            texts = memo(f"prompted {task} v2", lambda: generate(server, lambda r: chat(question) + "The answer is ", rows, slots, 8))
            vals, parsed = parse_numbers(texts, float(np.mean([r[target] for r in d["train"]])))
            R[task]["base model prompted"] = {"test": {**regression(vals, [r[target] for r in rows]), "parsed": parsed, "examples": texts[:5]}}

        # Translation, including zero-shot pairs.
        if "Translate" in present and wanted("Translate"):
            import sacrebleu

            print("translation ...", file=sys.stderr, flush=True)
            test = load("data/translate/test.jsonl")
            tagged = memo(tag_key(runs, "Translate", *[l.upper() for l in LANG_NAMES]),
                          lambda: generate(server, lambda r: r["template"], test, ["text"], 32))
            base = memo("prompted Translate", lambda: generate(server, lambda r: chat(f"Translate this {LANG_NAMES[r['pair'][:2]]} text to {LANG_NAMES[r['pair'][3:]]}: {{text}}"),
                            test, ["text"], 32))
            R["Translate"] = {}
            for pair in sorted({r["pair"] for r in test}):
                idx = [i for i, r in enumerate(test) if r["pair"] == pair]
                refs = [[test[i]["target"] for i in idx]]
                R["Translate"][pair] = {
                    "n": len(idx),
                    "<Translate>": sacrebleu.corpus_chrf([clean(tagged[i]) for i in idx], refs).score,
                    "base model prompted": sacrebleu.corpus_chrf([clean(base[i]) for i in idx], refs).score,
                    "examples": [(test[i]["text"], tagged[i], base[i], test[i]["target"]) for i in idx[:3]],
                }
    finally:
        server.stop()

    R["seconds"] = round(time.time() - started)
    (runs / "results.json").write_text(json.dumps(R, indent=1) + "\n")
    write_table(R, runs / "results.md")
    into_page((runs / "results.md").read_text(), Path("docs/reproduction.md"))
    ship(runs, R)
    print((runs / "results.md").read_text())


NAMES = {
    "mean": "training mean",
    "ridge": "expert: ridge",
    "k-NN": "expert: k-NN",
    "gradient boosting": "expert: gradient boosting",
    "linear probe": "linear probe on the frozen last hidden state",
    "base model prompted": "base model prompted in words",
    "<QED>": "**tagllm: `<SMILES>` + `<QED>` (regression head)**",
    "<Descriptor>": "**tagllm: `<Protein>` + `<Descriptor>` (regression head)**",
    "<BA>": "**tagllm: `<Protein>` + `<SMILES>` + `<BA>` (regression head)**",
    "<BAWarm>": "**tagllm: `<Protein>` + `<SMILES>` + `<BAWarm>` (regression head, warm training split)**",
    "<QEDNoDomain>": "ablation: no domain tag (function tag + head = prompt tuning with a head)",
    "<QEDText> (no head)": "ablation: no head (`<QEDText>` generates the number)",
}


def fmt(x, d=4):
    return "—" if x is None else f"{x:.{d}f}"


TABLES_BEGIN = "<!-- results: begin (evaluate.py writes this part from runs/results.md) -->\n"
TABLES_END = "<!-- results: end -->\n"


def into_page(tables, page, begin=TABLES_BEGIN, end=TABLES_END):
    """A page's tables, replaced between their markers (written atomically)."""
    text = page.read_text()
    start, stop = text.index(begin) + len(begin), text.index(end)
    write_atomic(page, text[:start] + tables.strip() + "\n" + text[stop:])


def write_atomic(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(R, path):
    lines = []
    for task, split, key, paper in [
        ("QED", "test", "mse", "QED MSE 0.008 (LLaMA-7B, other data)"),
        ("QED", "chembl", "mse", "—"),
        ("Descriptor", "test", "mse", "Descriptor MSE 0.005 (LLaMA-7B, other data)"),
        ("Descriptor", "whole", "mse", "—"),
        ("BA", "test", "pearson", "BA Pearson r 0.527 (LLaMA-7B, BindingDB: other data)"),
        ("BA warm", "test", "pearson", "—"),
    ]:
        if task not in R:
            continue
        title = {"QED": "QED on MOSES test (1,000)", "Descriptor": "Descriptor on UniProt windows (1,000)",
                 "BA": "Binding affinity, KIBA sample test (1,000; cold: no test protein or ligand in training)",
                 "BA warm": "Binding affinity, KIBA sample re-split warm (1,000; every test protein and ligand occurs in training)"}[task]
        if split == "chembl":
            title = "QED on ChEMBL molecules (not MOSES)"
        if split == "whole":
            title = "Descriptor on whole proteins (927, up to 1,000 residues; the window test's proteins)"
        lines += [f"**{title}** — paper: {paper}", "", "| method | MSE | R² | Pearson r | CI | n |", "|---|---|---|---|---|---|"]
        for method, res in R[task].items():
            if split not in res:
                continue
            m = res[split]
            extra = f" (parsed {m['parsed']:.0%})" if "parsed" in m else ""
            lines.append(f"| {NAMES.get(method, method)}{extra} | {fmt(m['mse'])} | {fmt(m['r2'], 3)} | {fmt(m.get('pearson'), 3)} | {fmt(m.get('ci'), 3)} | {m['n']} |")
        lines.append("")
    if "Translate" in R:
        lines += ["**Translation, chrF** (django UI strings; `<Translate>` trained on en↔fr, en↔de, en↔it)", "",
                  "| pair | `<Translate>` | base model prompted | n |", "|---|---|---|---|"]
        for pair, m in R["Translate"].items():
            note = " (zero-shot)" if pair in ("it-fr", "es-pt") else ""
            lines.append(f"| {pair}{note} | {m['<Translate>']:.1f} | {m['base model prompted']:.1f} | {m['n']} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def ship(runs, R):
    """Test metrics into the shipped manifests (written atomically), then copy to tags/."""
    test = {
        "QED": {("moses_test" if k == "test" else k): v for k, v in R["QED"].get("<QED>", {}).items()},
        "Descriptor": {("test" if k == "test" else "whole_proteins"): v for k, v in R["Descriptor"].get("<Descriptor>", {}).items()},
        "BA": {"test": R["BA"].get("<BA>", {}).get("test")},
        "Translate": {p: {"chrf": m["<Translate>"], "n": m["n"]} for p, m in R.get("Translate", {}).items()},
    }
    for name in SHIPPED:
        src = runs / "tags" / name
        if not src.exists():
            print(f"{name}: not trained, not shipped", file=sys.stderr)
            continue
        manifest = json.loads((src / "manifest.json").read_text())
        if name in test:
            validation = manifest.get("metrics", {}).get("validation", manifest.get("metrics"))
            manifest["metrics"] = {"validation": validation, "test": test[name]}
        data = manifest.setdefault("provenance", {})
        summary = runs / "logs" / f"{name}.json"
        if summary.exists():
            cmd = json.loads(summary.read_text())["command"]
            data["command"] = " ".join(cmd)
            files = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--data", "--eval-data")]
            data["data_sha256"] = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
        # A retrained tag ships as the next version of the one it replaces.
        shipped = Path("tags") / name / "manifest.json"
        if shipped.exists():
            before = json.loads(shipped.read_text())
            if before.get("tensors_sha256") == manifest.get("tensors_sha256"):
                manifest["version"] = before["version"]
            else:
                manifest["version"] = max(manifest["version"], before["version"] + 1)
        tmp = src / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, src / "manifest.json")
        dst = Path("tags") / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "*.tmp"))


if __name__ == "__main__":
    main()
