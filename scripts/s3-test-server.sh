#!/usr/bin/env bash
# A throwaway S3-compatible server (moto_server, from PyPI) for the backup tests that write to object storage.
#
#   eval "$(scripts/s3-test-server.sh start)"   # prints: export LESSOR_TEST_S3_ENDPOINT=http://127.0.0.1:<port>
#   cargo test -p lessor --test backup s3
#   scripts/s3-test-server.sh stop
#
# Only the export line goes to stdout; progress goes to stderr. moto_server is installed with pip (pinned) when it
# is missing; that takes about 20 s once, starting it about 2 s.
#
# Settings (environment):
#   LESSOR_S3_DIR   where the pid and log live (default: ${TMPDIR:-/tmp}/lessor-s3-test-<uid>)
#   LESSOR_S3_PORT  first TCP port to try (default 62339; the next free one is used when it is taken)
#                   (above the ephemeral range 32768-60999, where client connections can take a port at any time)
set -euo pipefail

S3_DIR="${LESSOR_S3_DIR:-${TMPDIR:-/tmp}/lessor-s3-test-$(id -u)}"
S3_PORT_START="${LESSOR_S3_PORT:-62339}"
MOTO_VERSION="5.2.1"

log() { echo "s3-test-server: $*" >&2; }

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    if ! command -v moto_server >/dev/null 2>&1; then
        log "installing moto[server]==$MOTO_VERSION with pip"
        if ! python3 -m pip --version >/dev/null 2>&1; then
            log "installing python3-pip from Debian's packages"
            apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >&2
        fi
        # Debian marks its Python as externally managed; a user install of a test tool is what is wanted here.
        python3 -m pip install --quiet --user "moto[server]==$MOTO_VERSION" >&2 ||
            python3 -m pip install --quiet --user --break-system-packages "moto[server]==$MOTO_VERSION" >&2
        export PATH="$HOME/.local/bin:$PATH"
    fi
    mkdir -p "$S3_DIR"
    if [ -f "$S3_DIR/pid" ] && kill -0 "$(cat "$S3_DIR/pid")" 2>/dev/null; then
        echo "export LESSOR_TEST_S3_ENDPOINT=$(cat "$S3_DIR/endpoint")"
        return
    fi
    local port=$S3_PORT_START
    while ! port_free "$port"; do port=$((port + 1)); done
    nohup moto_server -H 127.0.0.1 -p "$port" >"$S3_DIR/log" 2>&1 &
    echo $! >"$S3_DIR/pid"
    echo "http://127.0.0.1:$port" >"$S3_DIR/endpoint"
    for _ in $(seq 1 100); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then
            log "ready on 127.0.0.1:$port"
            echo "export LESSOR_TEST_S3_ENDPOINT=http://127.0.0.1:$port"
            return
        fi
        sleep 0.1
    done
    log "moto_server did not start; its log:"
    cat "$S3_DIR/log" >&2
    exit 1
}

stop() {
    if [ -f "$S3_DIR/pid" ]; then
        kill "$(cat "$S3_DIR/pid")" 2>/dev/null || true
        rm -f "$S3_DIR/pid" "$S3_DIR/endpoint"
        log "stopped"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
