#!/usr/bin/env bash
# Throughput of 1..N Lessor servers sharing PostgreSQL, over one database or partitions spread over two, with
# fsync and synchronous_commit on; the measurements behind docs/scaling.md.
#
#   cargo build --release -p lessor
#   scripts/pg-scale-bench.sh [--servers "1 2 3"] [--databases "1 2"] [--duration 10s] [--partitions 4]
#                             [--workload pipeline|produce] [--out DIR]
#
# For each (databases, servers) pair: fresh databases, N `lessor server` processes with the same config, one queue
# of --partitions partitions, and one `lessor bench --queue` process per server (4 producers + 4 consumers each,
# batch 100, 100-byte payloads) all started together. Per run it prints the summed produce and consume rates and
# what the database did (from pg_stat_statements and pg_stat_wal): WAL bytes and statement time per item, round
# trips (statement calls) per 100 items, lock waits seen by sampling pg_stat_activity every 100 ms, and the CPU
# used by the Lessor servers, PostgreSQL and the bench processes (from /proc, between 2 s and 8 s into the run). Results also go to DIR/results.tsv.
# The throwaway clusters come from scripts/pg-test-cluster.sh (LESSOR_PG_DURABLE=1) and are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS="1 2 3"
DATABASES="1 2"
DURATION=10s
PARTITIONS=4
WORKLOAD=pipeline
OUT="${TMPDIR:-/tmp}/lessor-pg-scale"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --servers) SERVERS="$2"; shift 2 ;;
    --databases) DATABASES="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --partitions) PARTITIONS="$2"; shift 2 ;;
    --workload) WORKLOAD="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
LESSOR="${LESSOR:-target/release/lessor}"
[[ -x "$LESSOR" ]] || { echo "build first: cargo build --release -p lessor" >&2; exit 1; }
mkdir -p "$OUT"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for i in 1 2; do
        LESSOR_PG_DIR="$OUT/pg$i" scripts/pg-test-cluster.sh stop >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

# Two durable clusters with pg_stat_statements, ports above the ephemeral range.
URL=()
for i in 1 2; do
    eval "$(LESSOR_PG_DIR="$OUT/pg$i" LESSOR_PG_PORT=$((62400 + 10 * i)) LESSOR_PG_DB=lessor_scale \
        LESSOR_PG_DURABLE=1 LESSOR_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements -c max_wal_size=4GB" \
        scripts/pg-test-cluster.sh start)"
    URL[$i]="$LESSOR_TEST_DATABASE_URL"
    psql -qAt "${URL[$i]}" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
done

# CPU ticks (user + system) of the given processes.
ticks() {
    local total=0 p
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] || continue
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# The postmasters of both clusters and their children.
pg_pids() {
    local i pm
    for i in 1 2; do
        pm=$(head -1 "$OUT/pg$i/data/postmaster.pid" 2>/dev/null) || continue
        echo "$pm"
        pgrep -P "$pm" || true
    done
}

printf "databases\tservers\tproduce/s\tconsume/s\tWAL B/item\tdb us/item\tcalls/100 items\tlock waits\tlessor cpu%%\tpg cpu%%\tbench cpu%%\n" |
    tee "$OUT/results.tsv"
for dbs in $DATABASES; do
    for n in $SERVERS; do
        run="$OUT/run-${dbs}db-${n}s"
        mkdir -p "$run"
        for i in $(seq 1 "$dbs"); do
            psql -qAt "${URL[$i]}" -c "DROP SCHEMA public CASCADE" -c "CREATE SCHEMA public" \
                -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null 2>&1
        done
        {
            echo "queue-storage:"
            echo "  driver: postgres"
            echo "  config: { connection-string: '${URL[1]}' }"
            echo "partition-storage:"
            for i in $(seq 1 "$dbs"); do
                echo "  - { name: pg-$i, driver: postgres, affinity: 1, config: { connection-string: '${URL[$i]}' } }"
            done
        } >"$run/config.yaml"
        PIDS=()
        for s in $(seq 1 "$n"); do
            "$LESSOR" server --config "$run/config.yaml" --address "127.0.0.1:$((62500 + s))" \
                >"$run/server$s.log" 2>&1 &
            PIDS+=($!)
        done
        for s in $(seq 1 "$n"); do
            for _ in $(seq 1 100); do
                curl -fs "http://127.0.0.1:$((62500 + s))/health" >/dev/null 2>&1 && break
                sleep 0.1
            done
        done
        for i in $(seq 1 "$dbs"); do
            psql -qAt "${URL[$i]}" -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset_shared('wal')" \
                >/dev/null
        done
        locks=0
        (
            w=0
            while [[ ! -f "$run/done" ]]; do
                for i in $(seq 1 "$dbs"); do
                    c=$(psql -qAt "${URL[$i]}" -c "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'" 2>/dev/null || echo 0)
                    w=$((w + c))
                done
                echo "$w" >"$run/locks"
                sleep 0.1
            done
        ) &
        sampler=$!
        bench=()
        for s in $(seq 1 "$n"); do
            "$LESSOR" bench --endpoint "http://127.0.0.1:$((62500 + s))" --queue scale --partitions "$PARTITIONS" --workload "$WORKLOAD" \
                --duration "$DURATION" --producers 4 --consumers 4 --batch 100 --payload 100 --quiet \
                --drain-timeout 3s --json-out "$run/bench$s.json" >"$run/bench$s.txt" 2>&1 &
            bench+=($!)
        done
        # CPU in the steady middle of the run (from 2 s to 8 s), when producers and consumers both work.
        sleep 2
        declare -A pg0=()
        for p in $(pg_pids); do pg0[$p]=$(ticks "$p"); done
        l0=$(ticks "${PIDS[@]}"); b0=$(ticks "${bench[@]}"); t0=$(date +%s.%N)
        sleep 6
        t1=$(date +%s.%N); l1=$(ticks "${PIDS[@]}"); b1=$(ticks "${bench[@]}")
        pgcpu=0
        for p in $(pg_pids); do pgcpu=$((pgcpu + $(ticks "$p") - ${pg0[$p]:-0})); done
        for p in "${bench[@]}"; do wait "$p" || true; done
        touch "$run/done"
        wait "$sampler" || true
        locks=$(cat "$run/locks" 2>/dev/null || echo 0)
        hz=$(getconf CLK_TCK)
        secs=$(echo "$t1 - $t0" | bc -l)
        produce=$(jq -s '[.[].results.produce.items_per_s // 0] | add | floor' "$run"/bench*.json)
        consume=$(jq -s '[.[].results.complete.items_per_s // 0] | add | floor' "$run"/bench*.json)
        items=$(jq -s '[.[].results.complete.items // 0] | add' "$run"/bench*.json)
        wal=0; dbus=0; calls=0
        for i in $(seq 1 "$dbs"); do
            psql -q "${URL[$i]}" -c "SELECT calls, rows, round(mean_exec_time::numeric, 3) AS ms_per_call,
                    round((total_exec_time * 1000 / nullif(rows, 0))::numeric, 1) AS us_per_row,
                    round((wal_bytes / nullif(rows, 0))::numeric) AS wal_per_row,
                    left(regexp_replace(query, '\s+', ' ', 'g'), 70) AS statement
                FROM pg_stat_statements WHERE calls > 10 ORDER BY total_exec_time DESC LIMIT 10" \
                >"$run/statements-db$i.txt" 2>&1 || true
            read -r w2 <<<"$(psql -qAt "${URL[$i]}" -c "SELECT wal_bytes FROM pg_stat_wal")"
            read -r us c <<<"$(psql -qAt -F ' ' "${URL[$i]}" -c "SELECT coalesce(sum(total_exec_time), 0) * 1000, coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query !~* 'pg_stat'")"
            wal=$(echo "$wal + $w2" | bc); dbus=$(echo "$dbus + $us" | bc -l); calls=$((calls + c))
        done
        per() { if [[ "$items" -gt 0 ]]; then echo "scale=1; $1 / $items" | bc -l; else echo -; fi; }
        lcpu=$(echo "scale=0; 100 * ($l1 - $l0) / $hz / $secs" | bc -l)
        pcpu=$(echo "scale=0; 100 * $pgcpu / $hz / $secs" | bc -l)
        bench_cpu=$(echo "scale=0; 100 * ($b1 - $b0) / $hz / $secs" | bc -l)
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$dbs" "$n" "$produce" "$consume" "$(per "$wal")" \
            "$(per "$dbus")" "$(per "100 * $calls")" "$locks" "$lcpu" "$pcpu" "$bench_cpu" | tee -a "$OUT/results.tsv"
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
        PIDS=()
    done
done
echo "results: $OUT/results.tsv (per run: $OUT/run-*)"
