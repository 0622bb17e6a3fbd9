#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the postgres storage tests (local runs and CI).
#
#   eval "$(scripts/pg-test-cluster.sh start)"   # prints: export LESSOR_TEST_DATABASE_URL=postgres://...
#   cargo test -p lessor-storage --features postgres
#   scripts/pg-test-cluster.sh stop              # stops the server and deletes the cluster
#
# Other commands: `halt` stops the server but keeps the data (a later `start` brings the same cluster back),
# `restart` restarts it in place, `url` prints the export line of a running cluster.
#
# Only the export line goes to stdout, so `eval "$(... start)"` works; progress goes to stderr.
#
# Settings (environment):
#   LESSOR_PG_DIR   where the cluster lives (default: ${TMPDIR:-/tmp}/lessor-pg-test-<uid>)
#   LESSOR_PG_PORT  first TCP port to try (default 62329; the next free one is used when it is taken)
#                   Test ports lie above Linux's ephemeral range (32768-60999): a port in that range can be taken
#                   at any moment by the local end of some client connection, and the server then fails to bind.
#   LESSOR_PG_DB    database to create (default lessor_test)
#   LESSOR_PG_DURABLE  1: run with fsync, synchronous_commit and full_page_writes on (benchmarks); default off
#   LESSOR_PG_OPTIONS  more server options, e.g. "-c shared_preload_libraries=pg_stat_statements"
#
# initdb refuses to run as root, so as root the server runs as the `postgres` OS user (created by the Debian
# package), or as `nobody` when that user does not exist. When no PostgreSQL is installed, the script installs
# Debian's `postgresql` package. The cluster trusts every local connection and has fsync off unless
# LESSOR_PG_DURABLE=1: it is for tests and benchmarks only.
set -euo pipefail

PG_DIR="${LESSOR_PG_DIR:-${TMPDIR:-/tmp}/lessor-pg-test-$(id -u)}"
PG_PORT_START="${LESSOR_PG_PORT:-62329}"
PG_DB="${LESSOR_PG_DB:-lessor_test}"
# The database role; initdb creates it as the superuser, independent of the OS user that runs the server.
PG_ROLE="postgres"

log() { echo "pg-test-cluster: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# Finds the directory holding initdb and pg_ctl, installing PostgreSQL from Debian packages when there is none.
find_bin() {
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return
    fi
    # Debian keeps the server binaries out of PATH; take the newest major version.
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$d" && -x "$d/initdb" ]]; then
        echo "$d"
        return
    fi
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL is not installed and installing it needs root"
    log "installing PostgreSQL from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    [[ -n "$d" && -x "$d/initdb" ]] || die "PostgreSQL installed but initdb not found under /usr/lib/postgresql"
    echo "$d"
}

# The OS user the server runs as: ourselves, or an unprivileged user when we are root.
server_user() {
    if [[ "$(id -u)" != 0 ]]; then
        id -un
    elif id postgres >/dev/null 2>&1; then
        echo postgres
    else
        echo nobody
    fi
}

# Runs a command as the server user.
as_user() {
    local user="$1"
    shift
    if [[ "$user" == "$(id -un)" ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "$@"
    else
        # nobody has no login shell, so name one; the arguments are quoted for the shell.
        su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
    fi
}

port_in_use() {
    # A connection that succeeds means something listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() {
    local p="$PG_PORT_START"
    while port_in_use "$p"; do
        p=$((p + 1))
        ((p < PG_PORT_START + 100)) || die "no free port in $PG_PORT_START..$p"
    done
    echo "$p"
}

print_url() {
    local port
    port="$(cat "$PG_DIR/port")"
    echo "export LESSOR_TEST_DATABASE_URL=postgres://${PG_ROLE}@127.0.0.1:${port}/${PG_DB}"
}

is_running() {
    [[ -f "$PG_DIR/data/postmaster.pid" ]] && as_user "$(cat "$PG_DIR/user")" "$(cat "$PG_DIR/bin")/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1
}

# Starts the server of an initialised cluster, on its recorded port when free, otherwise on a new one.
start_server() {
    local bin user port
    bin="$(cat "$PG_DIR/bin")"
    user="$(cat "$PG_DIR/user")"
    port="$(cat "$PG_DIR/port")"
    if port_in_use "$port"; then
        port="$(pick_port)"
        echo "$port" >"$PG_DIR/port"
    fi
    local durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    if [[ "${LESSOR_PG_DURABLE:-0}" == 1 ]]; then
        durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    fi
    as_user "$user" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR/sock -c max_connections=300 $durability \
            ${LESSOR_PG_OPTIONS:-}" start >&2 ||
        {
            tail -n 30 "$PG_DIR/server.log" >&2 || true
            die "server did not start (log: $PG_DIR/server.log)"
        }
}

cmd_start() {
    if [[ -f "$PG_DIR/port" && -d "$PG_DIR/data" ]]; then
        if ! is_running; then
            log "starting the existing cluster in $PG_DIR"
            start_server
        fi
        print_url
        return
    fi
    local bin user port
    bin="$(find_bin)"
    user="$(server_user)"
    port="$(pick_port)"
    rm -rf "$PG_DIR"
    mkdir -p "$PG_DIR/sock"
    echo "$bin" >"$PG_DIR/bin"
    echo "$user" >"$PG_DIR/user"
    echo "$port" >"$PG_DIR/port"
    chown -R "$user" "$PG_DIR"
    # The server user must reach the directory: a private TMPDIR would stop it.
    chmod 755 "$PG_DIR"
    log "initdb in $PG_DIR as OS user $user ($bin)"
    as_user "$user" "$bin/initdb" -D "$PG_DIR/data" -U "$PG_ROLE" -A trust -E UTF8 --no-sync >"$PG_DIR/initdb.log" 2>&1 ||
        {
            cat "$PG_DIR/initdb.log" >&2
            die "initdb failed"
        }
    start_server
    port="$(cat "$PG_DIR/port")"
    # createdb talks over TCP, so it needs no particular OS user.
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$PG_ROLE" "$PG_DB" >&2
    log "ready on 127.0.0.1:$port, database $PG_DB"
    print_url
}

cmd_halt() {
    [[ -d "$PG_DIR/data" ]] || return 0
    if is_running; then
        as_user "$(cat "$PG_DIR/user")" "$(cat "$PG_DIR/bin")/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >&2
    fi
}

cmd_stop() {
    cmd_halt
    rm -rf "$PG_DIR"
    log "removed $PG_DIR"
}

cmd_restart() {
    [[ -d "$PG_DIR/data" ]] || die "no cluster in $PG_DIR"
    # -l again: without it the restarted server would log to (and hold open) our stderr.
    as_user "$(cat "$PG_DIR/user")" "$(cat "$PG_DIR/bin")/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -m fast -w restart >&2
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
halt) cmd_halt ;;
restart) cmd_restart ;;
url)
    is_running || die "no cluster running in $PG_DIR"
    print_url
    ;;
*) die "usage: $0 start|stop|halt|restart|url" ;;
esac
