#!/usr/bin/env bash
# A throwaway S3-compatible server for the tests that write to object storage: moto_server (from PyPI, the default
# and what CI runs) or s3s-fs (a Rust S3 server over a directory, `LESSOR_S3_SERVER=s3s-fs`).
#
#   eval "$(scripts/s3-test-server.sh start)"   # prints: export LESSOR_TEST_S3_ENDPOINT=http://127.0.0.1:<port>
#   cargo test -p lessor --test backup s3
#   scripts/s3-test-server.sh stop
#
# Only the export lines go to stdout; progress goes to stderr. moto_server is installed with pip (pinned) when it
# is missing; that takes about 20 s once, starting it about 2 s. moto keeps objects in RAM.
#
# s3s-fs keeps each bucket as a directory and each object as a file (written to a temporary file and renamed; it
# does not fsync), so it measures a server that writes to disk. It requires signed requests (access key `test`,
# secret `test`, as the tests use) and creates no bucket on an unsigned PUT: the script also exports
# LESSOR_TEST_S3_ROOT, and lessor-testkit creates a bucket as a directory there. It is installed with
# `cargo install` (pinned; about 2 minutes on 2 cores) into LESSOR_S3S_ROOT when missing. CI does not use it.
# The payload-offload tests (storage, HTTP, conformance, crash) pass on both. The backup test's "missing bucket"
# case does not on s3s-fs: it creates a bucket's directory on the first PUT instead of answering NoSuchBucket.
#
# Settings (environment):
#   LESSOR_S3_SERVER  moto (default) or s3s-fs
#   LESSOR_S3_DIR     where the pid, log and (s3s-fs) data live (default: ${TMPDIR:-/tmp}/lessor-s3-test-<uid>)
#   LESSOR_S3_PORT    first TCP port to try (default 62339; the next free one is used when it is taken)
#                     (above the ephemeral range 32768-60999, where client connections can take a port at any time)
#   LESSOR_S3S_ROOT   cargo install root of s3s-fs (default: ${TMPDIR:-/tmp}/s3s-root); an s3s-fs on PATH is used
#                     first
set -euo pipefail

S3_DIR="${LESSOR_S3_DIR:-${TMPDIR:-/tmp}/lessor-s3-test-$(id -u)}"
S3_PORT_START="${LESSOR_S3_PORT:-62339}"
MOTO_VERSION="5.2.1"
S3_SERVER="${LESSOR_S3_SERVER:-moto}"
# 0.15 and later need rustc 1.96.
S3S_VERSION="0.14.1"
S3S_ROOT="${LESSOR_S3S_ROOT:-${TMPDIR:-/tmp}/s3s-root}"

log() { echo "s3-test-server: $*" >&2; }

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

s3s_binary() {
    if command -v s3s-fs >/dev/null 2>&1; then
        command -v s3s-fs
    elif [ -x "$S3S_ROOT/bin/s3s-fs" ]; then
        echo "$S3S_ROOT/bin/s3s-fs"
    else
        log "installing s3s-fs $S3S_VERSION with cargo into $S3S_ROOT"
        cargo install s3s-fs --version "$S3S_VERSION" --features binary --locked --root "$S3S_ROOT" >&2
        echo "$S3S_ROOT/bin/s3s-fs"
    fi
}

start_s3s() {
    local bin
    bin=$(s3s_binary)
    mkdir -p "$S3_DIR/data"
    if [ -f "$S3_DIR/pid" ] && kill -0 "$(cat "$S3_DIR/pid")" 2>/dev/null; then
        echo "export LESSOR_TEST_S3_ENDPOINT=$(cat "$S3_DIR/endpoint") LESSOR_TEST_S3_ROOT=$S3_DIR/data"
        return
    fi
    local port=$S3_PORT_START
    while ! port_free "$port"; do port=$((port + 1)); done
    nohup "$bin" --host 127.0.0.1 --port "$port" --access-key test --secret-key test "$S3_DIR/data" \
        >"$S3_DIR/log" 2>&1 &
    echo $! >"$S3_DIR/pid"
    echo "http://127.0.0.1:$port" >"$S3_DIR/endpoint"
    for _ in $(seq 1 100); do
        # Unsigned requests get 403: any HTTP answer means it is up.
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" 2>/dev/null)" != "000" ]; then
            log "s3s-fs ready on 127.0.0.1:$port (data in $S3_DIR/data)"
            echo "export LESSOR_TEST_S3_ENDPOINT=http://127.0.0.1:$port LESSOR_TEST_S3_ROOT=$S3_DIR/data"
            return
        fi
        sleep 0.1
    done
    log "s3s-fs did not start; its log:"
    cat "$S3_DIR/log" >&2
    exit 1
}

start() {
    case "$S3_SERVER" in
        moto) ;;
        s3s-fs)
            start_s3s
            return
            ;;
        *)
            log "LESSOR_S3_SERVER=$S3_SERVER: not one of (moto, s3s-fs)"
            exit 2
            ;;
    esac
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
        # s3s-fs's objects: throwaway like moto's.
        rm -rf "$S3_DIR/data"
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
