#!/usr/bin/env bash
# Runs the same produce -> lease -> complete pipeline against Lessor and its peers on loopback — beanstalkd,
# Redis Streams (consumer group, AOF on), NATS JetStream (work-queue stream, file storage) and a plain
# PostgreSQL `FOR UPDATE SKIP LOCKED` table queue — in two durability modes, and prints one table: items/s and
# end-to-end p99 per system, and each ratio to Lessor in the same mode, all measured in this one run.
#
#   scripts/peers-bench.sh [--duration SECONDS] [--rate ITEMS_PER_S] [--modes fsync,default]
#                          [--producers N] [--consumers N] [--batch N] [--payload BYTES] [--json-out FILE]
#
# Modes:
#   fsync    every system fsyncs before it acknowledges: lessor fjall `sync`, beanstalkd `-b DIR -f 0`, redis
#            `appendfsync always`, postgres fsync=on + synchronous_commit=on, nats `sync_interval: always` when
#            the installed nats-server knows it (2.10+; Debian's 2.9.10 does not, and its row says so).
#   default  persistence on with each system's default fsync policy: lessor fjall `interval` (100 ms; Lessor's
#            own default is `sync`) and lessor memory, beanstalkd `-b DIR` (fsync at most every 50 ms), redis AOF
#            `everysec`, nats file store (fsync every 2 min), postgres (its default is already fsync + synchronous
#            commit: the fsync run is reused when both modes run).
#
# Without --rate the producers run flat out: consumed/s is the throughput and end-to-end latency is mostly
# backlog. With --rate (e.g. 5000) every system gets the same paced load and p99 compares latency.
#
# Peers are driven by one Python driver (scripts/peers/peers_bench.py, a process per producer/consumer), which
# is usually their bottleneck; Lessor runs twice per mode, with `lessor bench` (Rust, protobuf: the reference
# of the ratios) and with the same Python driver (JSON: the like-for-like line). Needs root for apt-get (or the
# servers already installed) and pip. LESSOR_BIN uses a prebuilt binary instead of building one.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=10 PRODUCERS=4 CONSUMERS=4 BATCH=100 PAYLOAD=100 RATE=0 MODES=fsync,default JSON_OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --producers) PRODUCERS=$2; shift 2 ;;
    --consumers) CONSUMERS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --payload) PAYLOAD=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --json-out) JSON_OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for m in ${MODES//,/ }; do
  case "$m" in fsync|default) ;; *) echo "unknown mode: $m (fsync, default)" >&2; exit 2 ;; esac
done
log() { echo "peers-bench $(date +%T): $*" >&2; }

OUT=$(mktemp -d -t lessor-peers-XXXXXX)
# The PostgreSQL server runs as an unprivileged user when we are root: it must reach its directory in here.
chmod 755 "$OUT"
export LESSOR_PG_DIR="$OUT/pg" LESSOR_PG_DB=peers
SERVER_PID=
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
cleanup() {
  stop_server
  [ -d "$OUT/pg" ] && scripts/pg-test-cluster.sh stop >/dev/null 2>&1 || true
  rm -rf "$OUT"
}
trap cleanup EXIT

# ---- installs -------------------------------------------------------------------------------------------
need_install=()
command -v beanstalkd >/dev/null || need_install+=(beanstalkd)
command -v nats-server >/dev/null || need_install+=(nats-server)
command -v redis-server >/dev/null || need_install+=(redis-server)
if [ ${#need_install[@]} -gt 0 ]; then
  log "installing ${need_install[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >&2
  # The packages start system services; stop them so only our own instances run.
  for s in beanstalkd nats-server redis-server; do
    (command -v systemctl >/dev/null && systemctl stop "$s" 2>/dev/null) || service "$s" stop >/dev/null 2>&1 || true
  done
fi
# (scripts/pg-test-cluster.sh installs Debian's postgresql when there is none.)
python3 -c "import greenstalk, redis, nats, psycopg" 2>/dev/null ||
  python3 -m pip install -q greenstalk redis nats-py "psycopg[binary]" >&2

LESSOR_BIN=${LESSOR_BIN:-}
if [ -z "$LESSOR_BIN" ]; then
  cargo build -q -p lessor --release >&2
  LESSOR_BIN=target/release/lessor
fi

# ---- helpers --------------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on port $1"
  return 1
}
RATE_FLAG=()
if [ "$RATE" != 0 ]; then RATE_FLAG=(--rate "$RATE"); fi

# One row of the final table per line: mode, system, setting, result file, kind (native|python|skip), note.
MANIFEST="$OUT/manifest.tsv"
: >"$MANIFEST"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$MANIFEST"; }

# run_py MODE SYSTEM SETTING PORT [driver args]: the Python driver against a server on PORT.
run_py() {
  local mode=$1 system=$2 setting=$3 port=$4 file="$OUT/$1-$2.json"
  shift 4
  log "$mode: $system ($setting)"
  if python3 scripts/peers/peers_bench.py "$system" --port "$port" --producers "$PRODUCERS" \
      --consumers "$CONSUMERS" --batch "$BATCH" --payload "$PAYLOAD" --duration "$DURATION" --rate "$RATE" \
      --json-out "$file" "$@" >/dev/null; then
    row "$mode" "$system" "$setting" "$file" python ""
  else
    row "$mode" "$system" "$setting" "" skip "the driver failed (see stderr)"
  fi
}

# run_native MODE SETTING [lessor bench args]: `lessor bench` with its own in-process server.
run_native() {
  local mode=$1 setting=$2 file="$OUT/$1-lessor-native-$RANDOM.json"
  shift 2
  log "$mode: lessor bench ($setting)"
  # The same 5 s for the backlog after the producers stop as the Python driver gives its consumers.
  if "$LESSOR_BIN" bench --workload pipeline --producers "$PRODUCERS" --consumers "$CONSUMERS" --batch "$BATCH" \
      --payload "$PAYLOAD" --duration "${DURATION}s" --drain-timeout 5s "${RATE_FLAG[@]}" --quiet \
      --json-out "$file" "$@" >/dev/null; then
    row "$mode" lessor-native "$setting" "$file" native ""
  else
    row "$mode" lessor-native "$setting" "" skip "lessor bench failed"
  fi
}

# The start_* functions set PORT and SERVER_PID (no command substitution: the server must be our own child).
start_lessor() { # durability
  local dir="$OUT/lessor-data-$1"
  PORT=$(free_port)
  cat >"$OUT/lessor.yaml" <<YAML
address: 127.0.0.1:$PORT
queue-storage: { driver: fjall, config: { storage-dir: $dir, durability: $1 } }
partition-storage:
  - { name: disk-0, driver: fjall, affinity: 1, config: { storage-dir: $dir, durability: $1 } }
YAML
  "$LESSOR_BIN" server --config "$OUT/lessor.yaml" >"$OUT/lessor-$1.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
}

PG_PORT=
start_postgres() {
  [ -n "$PG_PORT" ] && return 0
  # The helper makes the cluster (and installs PostgreSQL if needed) but runs it with fsync off for tests:
  # stop it and start it again from its data directory with durable settings.
  LESSOR_PG_PORT=$(free_port) scripts/pg-test-cluster.sh start >/dev/null || return 1
  scripts/pg-test-cluster.sh halt || return 1
  local d="$OUT/pg" user bin port
  user=$(cat "$d/user") bin=$(cat "$d/bin") port=$(cat "$d/port")
  local run=()
  if [ "$user" != "$(id -un)" ]; then run=(runuser -u "$user" --); fi
  "${run[@]}" "$bin/pg_ctl" -D "$d/data" -l "$d/server.log" -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $port \
      -k $d/sock -c max_connections=100 -c fsync=on -c synchronous_commit=on -c full_page_writes=on" start >&2 ||
    return 1
  PG_PORT=$port
}

nats_sync_always() { # does this nats-server accept `sync_interval: always` (2.10+)?
  printf 'listen: 127.0.0.1:4222\njetstream { store_dir: "%s", sync_interval: always }\n' "$OUT/nats-probe" \
    >"$OUT/nats-probe.conf"
  nats-server -t -c "$OUT/nats-probe.conf" >/dev/null 2>&1
}

start_nats() { # extra jetstream settings
  PORT=$(free_port)
  rm -rf "$OUT/nats"
  printf 'listen: 127.0.0.1:%s\njetstream { store_dir: "%s" %s }\n' "$PORT" "$OUT/nats" "$1" >"$OUT/nats.conf"
  nats-server -c "$OUT/nats.conf" >"$OUT/nats.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
}

start_beanstalkd() { # extra flags
  PORT=$(free_port)
  rm -rf "$OUT/beanstalkd"
  mkdir -p "$OUT/beanstalkd"
  beanstalkd -l 127.0.0.1 -p "$PORT" -b "$OUT/beanstalkd" "$@" &
  SERVER_PID=$!
  wait_port "$PORT"
}

start_redis() { # extra flags
  PORT=$(free_port)
  rm -rf "$OUT/redis"
  mkdir -p "$OUT/redis"
  redis-server --port "$PORT" --bind 127.0.0.1 --dir "$OUT/redis" --save '' --appendonly yes "$@" \
    >"$OUT/redis.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
}

# start_and_run MODE SYSTEM SETTING START_COMMAND...: starts a server, runs the driver against it, stops it.
start_and_run() {
  local mode=$1 system=$2 setting=$3
  shift 3
  if "$@"; then
    run_py "$mode" "$system" "$setting" "$PORT"
  else
    row "$mode" "$system" "$setting" "" skip "the server did not start"
  fi
  stop_server
}

# ---- the runs -------------------------------------------------------------------------------------------
for mode in ${MODES//,/ }; do
  if [ "$mode" = fsync ]; then
    run_native fsync "fjall, durability sync" --backend fjall --durability sync
    start_and_run fsync lessor "fjall, durability sync" start_lessor sync
    start_and_run fsync beanstalkd "-b DIR -f 0" start_beanstalkd -f 0
    start_and_run fsync redis "AOF, appendfsync always" start_redis --appendfsync always
    if nats_sync_always; then
      start_and_run fsync nats "file storage, sync_interval always" start_nats "sync_interval: always"
    else
      row fsync nats "file storage" "" skip \
        "nats-server $(nats-server --version | sed 's/.*v//') has no sync_interval (2.10+), so no fsync-per-write"
    fi
    if start_postgres; then
      run_py fsync postgres "fsync on, synchronous_commit on" "$PG_PORT" --dbname peers
    else
      row fsync postgres "fsync on, synchronous_commit on" "" skip "the server did not start"
    fi
  else
    run_native default "memory" --backend memory
    run_native default "fjall, durability interval" --backend fjall --durability interval
    start_and_run default lessor "fjall, durability interval" start_lessor interval
    start_and_run default beanstalkd "-b DIR (fsync every 50 ms)" start_beanstalkd
    start_and_run default redis "AOF, appendfsync everysec" start_redis
    start_and_run default nats "file storage (fsync every 2 min)" start_nats ""
    fsync_pg=$(awk -F'\t' '$1=="fsync" && $2=="postgres" && $5=="python" {print $4}' "$MANIFEST")
    if [ -n "$fsync_pg" ]; then
      row default postgres "default: fsync on, synchronous_commit on" "$fsync_pg" python "the fsync run"
    elif start_postgres; then
      run_py default postgres "default: fsync on, synchronous_commit on" "$PG_PORT" --dbname peers
    else
      row default postgres "default" "" skip "the server did not start"
    fi
  fi
done

# ---- the table ------------------------------------------------------------------------------------------
python3 - "$MANIFEST" "$PRODUCERS" "$CONSUMERS" "$BATCH" "$PAYLOAD" "$DURATION" "$RATE" "$JSON_OUT" <<'PY'
import json, os, sys
manifest, producers, consumers, batch, payload, duration, rate, json_out = sys.argv[1:]
LABEL = {"lessor-native": "Lessor (`lessor bench`, Rust)", "lessor": "Lessor (Python, JSON)",
         "beanstalkd": "beanstalkd", "redis": "Redis Streams", "nats": "NATS JetStream",
         "postgres": "PostgreSQL SKIP LOCKED"}
rows = []
for line in open(manifest):
    mode, system, setting, path, kind, note = line.rstrip("\n").split("\t")
    r = {"mode": mode, "system": system, "setting": setting, "note": note or None}
    if kind == "native":
        d = json.load(open(path))["results"]
        r.update(produced_per_s=d["produce"]["items_per_s"], consumed_per_s=d["complete"]["items_per_s"],
                 p99_ms=d["end-to-end"]["latency_ms"]["p99"])
    elif kind == "python":
        d = json.load(open(path))
        r.update(produced_per_s=d["produce_items_per_s"], consumed_per_s=d["consume_items_per_s"],
                 p99_ms=d["e2e_p99_ms"])
    rows.append(r)

# Ratios against Lessor in the same mode: the native driver (fsync: fjall sync; default: fjall interval) and
# the Python driver (like for like with the peers).
def ref(mode, system):
    for r in rows:
        if r["mode"] == mode and r["system"] == system and r.get("consumed_per_s") and \
                (system != "lessor-native" or "fjall" in r["setting"]):
            return r
for r in rows:
    for key, system in (("native", "lessor-native"), ("py", "lessor")):
        l = ref(r["mode"], system)
        ok = l and r.get("consumed_per_s") is not None
        r[f"x_items_{key}"] = r["consumed_per_s"] / l["consumed_per_s"] if ok else None
        r[f"x_p99_{key}"] = r["p99_ms"] / l["p99_ms"] if ok and r.get("p99_ms") and l.get("p99_ms") else None

pace = f"paced at {int(float(rate)):,} items/s" if rate != "0" else "unpaced"
print(f"pipeline: {producers} producers / {consumers} consumers, batch {batch}, payload {payload} B, {duration} s "
      f"+ 5 s drain, {pace}, loopback, {os.cpu_count()} CPUs")
print("items/s = consumed (leased + completed) per second; p99 = produce-to-lease end-to-end; "
      "×Lessor = this row / Lessor in the same mode (items/s: higher is better; p99: lower is better)")
print()
head = ["mode", "system", "setting", "produced/s", "consumed/s", "e2e p99 ms", "items ×Lessor", "p99 ×Lessor",
        "items ×Lessor-py", "p99 ×Lessor-py"]
print("| " + " | ".join(head) + " |")
print("| " + " | ".join(["---"] * 3 + ["---:"] * 7) + " |")
num = lambda v, f: "-" if v is None else format(v, f)
for r in rows:
    p99 = r.get("p99_ms")
    cells = [r["mode"], LABEL.get(r["system"], r["system"]), r["setting"],
             num(r.get("produced_per_s"), ",.0f"), num(r.get("consumed_per_s"), ",.0f"),
             num(p99, ",.1f" if p99 and p99 >= 100 else ".2f"),
             num(r["x_items_native"], ".3f"), num(r["x_p99_native"], ".2f"),
             num(r["x_items_py"], ".2f"), num(r["x_p99_py"], ".2f")]
    if r.get("consumed_per_s") is None:
        cells[3] = f"not run: {r['note']}"
    elif r["note"]:
        cells[2] += f" ({r['note']})"
    print("| " + " | ".join(cells) + " |")
if json_out:
    with open(json_out, "w") as f:
        json.dump({"producers": int(producers), "consumers": int(consumers), "batch": int(batch),
                   "payload": int(payload), "duration_s": float(duration), "rate": float(rate) or None,
                   "rows": rows}, f, indent=2)
PY
