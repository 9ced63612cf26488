#!/usr/bin/env bash
# Makes the Debian bookworm base image `tagllm/debian:bookworm` from Debian's own package
# mirror with debootstrap + `docker import`, for machines that cannot pull images (no
# registry). Where `debian:bookworm-slim` can be pulled, nothing here is needed: the
# Dockerfiles default to the official images. Idempotent: an existing image is kept
# (delete it with `docker rmi tagllm/debian:bookworm` to rebuild).
set -euo pipefail
IMAGE=${TAGLLM_BASE_IMAGE:-tagllm/debian:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE: present" >&2
    exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }

root=$(mktemp -d /tmp/tagllm-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm (minbase) into $root" >&2
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$MIRROR" >&2
# What the official slim image also does: no docs or caches in every layer after this.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
cat > "$root/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
tar -C "$root" --numeric-owner -c . |
    docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$IMAGE" >&2
echo "$IMAGE: built" >&2
