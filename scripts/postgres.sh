#!/usr/bin/env bash
# A real, throwaway PostgreSQL server for the tests: Debian's packaged binaries (installed with
# apt-get when absent), a cluster in .postgres/ run as the postgres user, trust auth on
# 127.0.0.1 only, unix socket inside the data directory, fsync on. The port is
# $TOLLGATE_PG_PORT when set, else a free port picked when the cluster first starts and kept in
# the data directory (a stop and a start within one test run keep the URL), picked anew when
# another program has taken it meanwhile: two runs on one host never collide.
#
#   scripts/postgres.sh start   install, initdb and start as needed; prints the URL
#   scripts/postgres.sh stop    fast shutdown (nothing to do when it is not running)
#   scripts/postgres.sh url     prints the URL
#   scripts/postgres.sh reset   start, then drop and recreate the database; prints the URL
#
# Only the URL goes to stdout. start/stop/reset need root. TOLLGATE_PG_DIR overrides the data
# directory; by default it is .postgres/ in the repo, or a directory under /tmp when the
# postgres user cannot reach the repo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR_OVERRIDE="${TOLLGATE_PG_DIR:+$(realpath -m "$TOLLGATE_PG_DIR")}"
DB=tollgate
cd /  # the postgres user may not be allowed into the caller's working directory

say() { echo "postgres.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }

# The bin directory of the newest installed server (initdb is in postgresql-N, not the client).
newest_bin() {
    local initdb
    initdb="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)"
    [[ -n "$initdb" ]] && dirname "$initdb"
}

apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >&2; }

# Sets PGDATA: the override, .postgres/ in the repo, or a per-checkout directory under /tmp.
data_dir() {
    if [[ -n "$DIR_OVERRIDE" ]]; then
        PGDATA="$DIR_OVERRIDE"
        mkdir -p "$(dirname "$PGDATA")"
        as_pg test -x "$(dirname "$PGDATA")" ||
            die "the postgres user cannot reach $(dirname "$PGDATA") (TOLLGATE_PG_DIR)"
    elif as_pg test -x "$ROOT"; then
        PGDATA="$ROOT/.postgres"
    else
        PGDATA="/tmp/tollgate-postgres-$(printf %s "$ROOT" | sha256sum | cut -c1-8)"
        say "the postgres user cannot reach $ROOT; using $PGDATA instead"
    fi
}

# Sets BIN to the binaries matching the cluster in PGDATA (or the newest, for a new cluster).
cluster_bin() {
    if [[ -f "$PGDATA/PG_VERSION" ]]; then
        local version
        version="$(cat "$PGDATA/PG_VERSION")"
        BIN="/usr/lib/postgresql/$version/bin"
        [[ -x "$BIN/pg_ctl" ]] || die "$PGDATA was made by PostgreSQL $version, which is not" \
            "installed; delete $PGDATA or install postgresql-$version"
    else
        BIN="$(newest_bin)"
    fi
}

running() { as_pg "$BIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1; }

# Whether nothing listens on 127.0.0.1:$1. SO_REUSEADDR as a server binds: connections of the
# server we just stopped linger in TIME_WAIT on its port and must not make it look taken.
port_free() {
    python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

# Sets PORT: the running server's, else TOLLGATE_PG_PORT, else the one kept in PGDATA while it
# is free, else a new free one (kept for the next start).
choose_port() {
    local kept="$PGDATA/tollgate-port"
    if running; then
        PORT="$(sed -n 4p "$PGDATA/postmaster.pid")"
    elif [[ -n "${TOLLGATE_PG_PORT:-}" ]]; then
        PORT="$TOLLGATE_PG_PORT"
    elif [[ -f "$kept" ]] && port_free "$(cat "$kept")"; then
        PORT="$(cat "$kept")"
    else
        PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    fi
    echo "$PORT" >"$kept"
}

url() { echo "postgres://postgres@127.0.0.1:$PORT/$DB"; }
psql_() { "$BIN/psql" -X -v ON_ERROR_STOP=1 -q "postgres://postgres@127.0.0.1:$PORT/postgres" "$@"; }

start() {
    if ! newest_bin >/dev/null; then
        say "PostgreSQL server not found under /usr/lib/postgresql; installing it with apt-get"
        apt_install || { say "retrying after apt-get update"; apt-get update >&2 && apt_install; } ||
            die "apt-get could not install postgresql"
        newest_bin >/dev/null || die "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb"
    fi
    data_dir
    cluster_bin
    if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
        say "creating a cluster in $PGDATA with $BIN/initdb"
        install -d -o postgres -g postgres -m 700 "$PGDATA"
        as_pg "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-locale --encoding=UTF8 >/dev/null
        cat >>"$PGDATA/postgresql.conf" <<EOF

# scripts/postgres.sh (the port is given on the command line: TOLLGATE_PG_PORT)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PGDATA'
fsync = on
EOF
        cat >"$PGDATA/pg_hba.conf" <<EOF
# scripts/postgres.sh: trust, from this machine only
local all all              trust
host  all all 127.0.0.1/32 trust
EOF
    fi
    choose_port
    if running; then
        [[ -z "${TOLLGATE_PG_PORT:-}" || "$PORT" == "$TOLLGATE_PG_PORT" ]] ||
            die "the server in $PGDATA is running on port $PORT, not $TOLLGATE_PG_PORT; stop it first"
        say "already running: $PGDATA on port $PORT"
    else
        say "starting the server in $PGDATA on 127.0.0.1:$PORT (log: $PGDATA/server.log)"
        as_pg "$BIN/pg_ctl" start -w -D "$PGDATA" -l "$PGDATA/server.log" -o "-p $PORT" >&2 || {
            tail -n 20 "$PGDATA/server.log" >&2
            die "the server did not start; see $PGDATA/server.log"
        }
    fi
    if [[ -z "$(psql_ -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]]; then
        psql_ -c "CREATE DATABASE $DB" >&2
    fi
}

stop() {
    newest_bin >/dev/null || return 0
    data_dir
    [[ -f "$PGDATA/PG_VERSION" ]] || return 0
    cluster_bin
    if running; then
        as_pg "$BIN/pg_ctl" stop -w -m fast -D "$PGDATA" >&2
    else
        say "not running: $PGDATA"
    fi
}

reset() {  # WITH (FORCE), PostgreSQL 13+: also ends open connections
    start
    say "recreating database $DB"
    psql_ -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >&2
}

case "${1:-}" in
    start | stop | reset) ((EUID == 0)) || die "$1 needs root (apt-get, and runuser to the postgres user)" ;;&
    start) start; url ;;
    stop) stop ;;
    reset) reset; url ;;
    url)
        data_dir
        [[ -f "$PGDATA/PG_VERSION" ]] || die "no cluster in $PGDATA yet: run start first"
        cluster_bin
        choose_port
        url
        ;;
    *) die "usage: scripts/postgres.sh start|stop|url|reset" ;;
esac
