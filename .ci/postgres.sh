# A throwaway PostgreSQL server for the multi-worker search test (tests/search/test_workers.py).
# Source this file, then `start_test_postgres`: installs the Debian package when no server binaries are present,
# runs a fresh cluster in a temporary folder on 127.0.0.1 (a free port; the unix socket in the same folder; as
# the `postgres` user when we are root, since PostgreSQL refuses to run as root), and exports
# SECATEURS_TEST_POSTGRES (its URL) and SECATEURS_REQUIRE_POSTGRES=1 (the test may not skip).
# `stop_test_postgres` stops it and removes the folder. Locally:
#   source .ci/postgres.sh && start_test_postgres && .venv/bin/python -m pytest tests/search; stop_test_postgres

start_test_postgres() {
  local bin port
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$bin" ]; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  PG_BIN=$bin
  PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/secateurs-pg.XXXXXX")
  PG_AS=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$PG_DIR"
    PG_AS=(runuser -u postgres --)
  fi
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ${PG_AS[@]+"${PG_AS[@]}"} "$PG_BIN/initdb" -D "$PG_DIR/data" -U secateurs --auth=trust -E UTF8 >/dev/null
  ${PG_AS[@]+"${PG_AS[@]}"} "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -s \
    -o "-h 127.0.0.1 -p $port -k $PG_DIR -c fsync=off" start
  ${PG_AS[@]+"${PG_AS[@]}"} "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U secateurs secateurs_test
  export SECATEURS_TEST_POSTGRES="postgresql://secateurs@127.0.0.1:$port/secateurs_test"
  export SECATEURS_REQUIRE_POSTGRES=1
  echo "PostgreSQL test server: $SECATEURS_TEST_POSTGRES"
}

stop_test_postgres() {
  [ -n "${PG_DIR:-}" ] || return 0
  ${PG_AS[@]+"${PG_AS[@]}"} "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -s stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
  PG_DIR=""
}
