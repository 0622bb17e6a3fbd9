#!/bin/bash
# Paging measurements (docs/benchmarks.md, "fjall: RAM bounded by the window"). Needs the release binary
# (cargo build --release -p lessor --bin lessor), curl and bc; writes under $MEASURE_ROOT (default /tmp/lessor-paging).
# Usage: scripts/measure-paging.sh <label> <window> <port>
# Pre-fills one 1-partition queue to 1M, 5M, 20M items of 100 B through the real binary; after each stage restarts the
# server and records start-up (to /health, to first lease) and RSS; at 20M runs pipeline throughput on the deep queue and
# on a fresh shallow queue.
set -u
LABEL=$1; WINDOW=$2; PORT=$3
BIN=${LESSOR_BIN:-$(dirname "$0")/../target/release/lessor}
ROOT=${MEASURE_ROOT:-/tmp/lessor-paging}/run-$LABEL
rm -rf $ROOT; mkdir -p $ROOT/data
EP=http://127.0.0.1:$PORT
cat > $ROOT/config.yaml <<YAML
address: 127.0.0.1:$PORT
queue-storage:
  driver: fjall
  config:
    storage-dir: $ROOT/data
partition-storage:
  - name: disk-0
    driver: fjall
    affinity: 1
    config:
      storage-dir: $ROOT/data
      memory-window-items: $WINDOW
YAML
OUT=$ROOT/results.txt
start_server() {
  $BIN server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
  SPID=$!
  local t0=$(date +%s.%N)
  until curl -sf $EP/health >/dev/null 2>&1; do sleep 0.02; done
  local t1=$(date +%s.%N)
  # first lease of one item (then left to expire: lease timeout 1m)
  $BIN lease --endpoint $EP --timeout 30s deep > /dev/null 2>&1
  local t2=$(date +%s.%N)
  echo "start-up: health $(echo "$t1 - $t0" | bc) s, first lease $(echo "$t2 - $t0" | bc) s" >> $OUT
}
rss() { grep VmRSS /proc/$SPID/status | awk '{print $2}'; }
stop_server() { kill -TERM $SPID; wait $SPID 2>/dev/null; }
echo "== $LABEL window=$WINDOW $(date -u)" > $OUT
$BIN server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
SPID=$!
until curl -sf $EP/health >/dev/null 2>&1; do sleep 0.05; done
$BIN create --endpoint $EP deep --lease-timeout 1m --expire-timeout 720h >> $ROOT/cli.log 2>&1 || true
DONE=0
for TARGET in 1000000 5000000 20000000; do
  N=$((TARGET - DONE))
  t0=$(date +%s.%N)
  $BIN bench --endpoint $EP --queue deep --workload produce --items $N --batch 1000 --producers 4 --payload 100 --quiet --json-out $ROOT/prefill-$TARGET.json > $ROOT/prefill-$TARGET.txt 2>&1
  t1=$(date +%s.%N)
  DONE=$TARGET
  echo "depth $TARGET: prefill $N items in $(echo "$t1 - $t0" | bc) s; RSS after prefill $(rss) KiB; disk $(du -sm $ROOT/data | cut -f1) MiB" >> $OUT
  stop_server
  start_server
  sleep 1
  echo "depth $TARGET: RSS after restart + first lease $(rss) KiB" >> $OUT
done
# throughput at 20M deep, then shallow
for Q in deep shallow; do
  for i in 1 2; do
    $BIN bench --endpoint $EP --queue $Q --workload pipeline --duration 15s --batch 100 --producers 4 --consumers 4 --payload 100 --drain-timeout 30s --quiet --json-out $ROOT/pipe-$Q-$i.json > $ROOT/pipe-$Q-$i.txt 2>&1
    echo "pipeline $Q run $i: RSS $(rss) KiB" >> $OUT
  done
done
stop_server
echo "done $(date -u)" >> $OUT
