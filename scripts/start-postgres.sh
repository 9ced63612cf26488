#!/usr/bin/env bash
# Installs (Debian's postgresql) and starts a throwaway local Postgres for the test suite,
# then prints the URL the tests use (TAGLLM_TEST_DATABASE_URL). Loopback only.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
dir=${PGDATA_DIR:-/tmp/tagllm-pg}
port=${PGPORT:-55432}
if ! "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
  rm -rf "$dir"
  mkdir -p "$dir"
  chown postgres "$dir" 2>/dev/null || true
  as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else sh -c "$*"; fi; }
  as_pg "$bin/initdb -D $dir -U tagllm --auth=trust >/dev/null"
  as_pg "$bin/pg_ctl -D $dir -o '-p $port -k /tmp -c listen_addresses=127.0.0.1' -l $dir/log -w start >/dev/null"
fi
echo "postgres://tagllm@127.0.0.1:$port/postgres"
