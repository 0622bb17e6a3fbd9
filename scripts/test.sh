#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy (warnings are errors; unwrap() denied outside tests), then every test:
# unit, conformance (memory, fjall, postgres), black-box HTTP, crash and two-server tests. Arguments go to
# `cargo test`.
#
# PostgreSQL: when LESSOR_TEST_DATABASE_URL is set, the postgres tests use that database (each test makes its own
# tables). Otherwise this script starts a throwaway cluster (installing PostgreSQL from Debian's packages when it is
# missing) and removes it afterwards.
#
# Browser: installs chromium and chromium-driver when missing and sets LESSOR_REQUIRE_BROWSER=1, so the dashboard's
# browser tests (crates/lessor-server/tests/ui_browser.rs) cannot silently skip.
#
# S3: when LESSOR_TEST_S3_ENDPOINT is set, the backup and payload-offload tests that use object storage use that
# server; otherwise this script starts a throwaway moto_server (installing it with pip when it is missing) and stops
# it afterwards (`LESSOR_S3_SERVER=s3s-fs` starts s3s-fs instead; see scripts/s3-test-server.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT
if [ -z "${LESSOR_TEST_DATABASE_URL:-}" ]; then
    eval "$(scripts/pg-test-cluster.sh start)"
    cleanup+=('scripts/pg-test-cluster.sh stop >/dev/null 2>&1 || true')
fi
export LESSOR_TEST_DATABASE_URL
if [ -z "${LESSOR_TEST_S3_ENDPOINT:-}" ]; then
    eval "$(scripts/s3-test-server.sh start)"
    cleanup+=('scripts/s3-test-server.sh stop >/dev/null 2>&1 || true')
fi
export LESSOR_TEST_S3_ENDPOINT

# The dashboard's browser tests need headless Chromium and its WebDriver; install them from Debian's packages when
# missing, and make the tests fail rather than skip if they still cannot run.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >&2
fi
export LESSOR_REQUIRE_BROWSER=1

cargo fmt --all -- --check
cargo clippy --workspace --all-features --all-targets -- -D warnings
cargo test --workspace --all-features "$@"
