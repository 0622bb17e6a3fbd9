#!/usr/bin/env bash
# Runs the same pipeline workload against Lessor and its peers (beanstalkd, Redis Streams, NATS JetStream) on
# loopback and prints items/s and p99 latency per system, one line each.
#
#   scripts/peers-bench.sh [--duration SECONDS] [--producers N] [--consumers N] [--batch N] [--payload BYTES]
#                          [--rate ITEMS_PER_S]
#
# Without --rate the producers run flat out and end-to-end latency is mostly backlog (queueing) time; give
# --rate (e.g. 5000) for a latency comparison at a load every system sustains.
#
# Needs root for apt-get (or the three servers already on PATH) and pip. Lessor is measured twice: with
# `lessor bench` (native Rust driver, protobuf) and with the same Python driver as the peers (JSON), so the
# peers can be compared like for like. Set LESSOR_BIN to use a prebuilt binary instead of building one.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=10 PRODUCERS=4 CONSUMERS=4 BATCH=100 PAYLOAD=100 RATE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --producers) PRODUCERS=$2; shift 2 ;;
    --consumers) CONSUMERS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --payload) PAYLOAD=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

OUT=$(mktemp -d -t lessor-peers-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$OUT"
}
trap cleanup EXIT

need_install=()
command -v beanstalkd >/dev/null || need_install+=(beanstalkd)
command -v nats-server >/dev/null || need_install+=(nats-server)
command -v redis-server >/dev/null || need_install+=(redis-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >&2
  # The packages start system services; stop them so only our own instances run.
  for s in beanstalkd nats-server redis-server; do
    (command -v systemctl >/dev/null && systemctl stop "$s" 2>/dev/null) || service "$s" stop >/dev/null 2>&1 || true
  done
fi
python3 -c "import greenstalk, redis, nats" 2>/dev/null || python3 -m pip install -q greenstalk redis nats-py >&2

LESSOR_BIN=${LESSOR_BIN:-}
if [ -z "$LESSOR_BIN" ]; then
  cargo build -q -p lessor --release >&2
  LESSOR_BIN=target/release/lessor
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}
DRIVER=(python3 scripts/peers/peers_bench.py --producers "$PRODUCERS" --consumers "$CONSUMERS" --batch "$BATCH"
        --payload "$PAYLOAD" --duration "$DURATION" --rate "$RATE")
RATE_FLAG=()
if [ "$RATE" != 0 ]; then RATE_FLAG=(--rate "$RATE"); fi

run_peer() { # name port
  "${DRIVER[@]}" "$1" --port "$2" --json-out "$OUT/$1.json" >/dev/null
}

# Lessor, native driver (starts its own in-process memory server).
"$LESSOR_BIN" bench --backend memory --workload pipeline --producers "$PRODUCERS" --consumers "$CONSUMERS" \
  --batch "$BATCH" --payload "$PAYLOAD" --duration "${DURATION}s" "${RATE_FLAG[@]}" --quiet \
  --json-out "$OUT/lessor-bench.json" >/dev/null

# Lessor, Python driver: a memory server of its own.
port=$(free_port)
cat >"$OUT/lessor.yaml" <<YAML
address: 127.0.0.1:$port
queue-storage: { driver: memory }
partition-storage:
  - { name: memory-0, driver: memory, affinity: 1 }
YAML
"$LESSOR_BIN" server --config "$OUT/lessor.yaml" >"$OUT/lessor.log" 2>&1 & PIDS+=($!)
wait_port "$port" && run_peer lessor "$port"

port=$(free_port)
beanstalkd -l 127.0.0.1 -p "$port" & PIDS+=($!)
wait_port "$port" && run_peer beanstalkd "$port"

port=$(free_port)
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 & PIDS+=($!)
wait_port "$port" && run_peer redis "$port"

port=$(free_port)
nats-server -a 127.0.0.1 -p "$port" -js -sd "$OUT/nats" >"$OUT/nats.log" 2>&1 & PIDS+=($!)
wait_port "$port" && run_peer nats "$port"

python3 - "$OUT" "$PRODUCERS" "$CONSUMERS" "$BATCH" "$PAYLOAD" "$DURATION" "$RATE" <<'PY'
import json, os, sys
out, producers, consumers, batch, payload, duration, rate = sys.argv[1:]
pace = f"paced at {rate} items/s" if rate != "0" else "unpaced"
print(f"pipeline, {producers} producers / {consumers} consumers, batch {batch}, payload {payload} B, {duration} s, {pace}, "
      f"loopback, {os.cpu_count()} cpus")
print(f"{'system':<26} {'produced/s':>12} {'consumed/s':>12} {'e2e p50 ms':>11} {'e2e p99 ms':>11}")
def row(name, p, c, p50, p99):
    f = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"{name:<26} {p:>12,.0f} {c:>12,.0f} {f(p50):>11} {f(p99):>11}")
try:
    d = json.load(open(f"{out}/lessor-bench.json"))["results"]
    row("lessor (lessor bench)", d["produce"]["items_per_s"], d["complete"]["items_per_s"],
        d["end-to-end"]["latency_ms"]["p50"], d["end-to-end"]["latency_ms"]["p99"])
except (OSError, KeyError) as e:
    print(f"lessor (lessor bench): no result ({e})")
for name, label in [("lessor", "lessor (python, JSON)"), ("beanstalkd", "beanstalkd (python)"),
                    ("redis", "redis streams (python)"), ("nats", "nats jetstream (python)")]:
    try:
        d = json.load(open(f"{out}/{name}.json"))
        row(label, d["produce_items_per_s"], d["consume_items_per_s"], d["e2e_p50_ms"], d["e2e_p99_ms"])
    except OSError as e:
        print(f"{label}: no result ({e})")
PY
