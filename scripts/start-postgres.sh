#!/usr/bin/env bash
# Installs (Debian's postgresql) and starts a throwaway local Postgres for the test suite,
# then prints the URL the tests use (TAGLLM_TEST_DATABASE_URL). Loopback only.
set -euo pipefail
port=${PGPORT:-55432}
dir=${PGDATA_DIR:-/tmp/tagllm-pg}
url="postgres://tagllm@127.0.0.1:$port/postgres"
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  echo "$url"
  exit 0
fi
# Postgres refuses to run as root: run it as the postgres user when we are root.
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
rm -rf "$dir"
mkdir -p "$dir"
[ "$(id -u)" = 0 ] && chown postgres "$dir"
as_pg "'$bin/initdb' -D '$dir' -U tagllm --auth=trust" >/dev/null
as_pg "'$bin/pg_ctl' -D '$dir' -o '-p $port -k /tmp -c listen_addresses=127.0.0.1' -l '$dir/log' -w start" >/dev/null
echo "$url"
