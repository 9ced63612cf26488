#!/usr/bin/env bash
# Re-vendors Swagger UI (served at /docs, embedded in the binary at build time) from a
# pinned PyPI wheel that ships its dist files: drf-spectacular-sidecar. Nothing is fetched
# at build or run time; the vendored files are checked in and checksummed
# (src/http/console/vendor/SHA256SUMS, verified by `cargo test`).
# Usage: scripts/vendor-swagger-ui.sh   (only to move to another version)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=drf_spectacular_sidecar-2026.10.1-py3-none-any.whl
WHEEL_SHA256=fe1d005d8ac9b5d0472f2fe5deeb2e7d6dcffaa24118044f22578b4b8c4b31f2
out=src/http/console/vendor/swagger-ui

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "drf-spectacular-sidecar==2026.10.1"
echo "$WHEEL_SHA256  $tmp/$WHEEL" | sha256sum -c --quiet
python3 -m zipfile -e "$tmp/$WHEEL" "$tmp/x"
dist="$tmp/x/drf_spectacular_sidecar/static/drf_spectacular_sidecar/swagger-ui-dist"
mkdir -p "$out"
for f in swagger-ui-bundle.js swagger-ui.css LICENSE; do
    cp "$dist/$f" "$out/$f"
done
(cd src/http/console/vendor && sha256sum swagger-ui/* >SHA256SUMS)
echo "vendored Swagger UI from $WHEEL into $out"
