#!/bin/bash
# Paging measurements (docs/benchmarks.md, "fjall paging without a per-operation index"). Needs a release binary
# (cargo build --release -p lessor), curl and bc; writes under $MEASURE_ROOT (default /tmp/lessor-paging).
# Usage: scripts/measure-paging.sh <label> <window> <port> [depths]
# Pre-fills one 1-partition queue of 100 B items to each depth (default "1000000 5000000 20000000") through the real
# binary; after each stage restarts the server and records start-up (to /health, to the first lease) and RSS. At the
# last depth: pipeline throughput and lease latency on the deep queue and on a fresh shallow queue, then a queue
# through which 3,000,000 items were produced and consumed, and a restart right after it (start-up after churn).
# `uptime` load is recorded with every step: the machine may be shared.
set -u
LABEL=$1; WINDOW=$2; PORT=$3; DEPTHS=${4:-"1000000 5000000 20000000"}
BIN=${LESSOR_BIN:-$(dirname "$0")/../target/release/lessor}
ROOT=${MEASURE_ROOT:-/tmp/lessor-paging}/run-$LABEL
rm -rf $ROOT; mkdir -p $ROOT/data
EP=http://127.0.0.1:$PORT
. "$(dirname "$0")/paging-lib.sh"
paging_config $ROOT $PORT ${WINDOW:+"memory-window-items: $WINDOW"}
OUT=$ROOT/results.txt
load() { uptime | sed 's/.*load average: /load /'; }
start_server() { # $1: queue to lease from
  $BIN server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
  SPID=$!
  local t0=$(date +%s.%N)
  until curl -sf $EP/health >/dev/null 2>&1; do sleep 0.02; done
  local t1=$(date +%s.%N)
  # first lease of one item (then left to expire: lease timeout 1m); tries again for up to 10 minutes
  local n=0
  until $BIN lease --endpoint $EP --timeout 30s $1 > /dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n + 1)); done
  local t2=$(date +%s.%N)
  echo "start-up: health $(echo "$t1 - $t0" | bc) s, first lease ($1) $(echo "$t2 - $t0" | bc) s; $(load)" >> $OUT
}
rss() { grep VmRSS /proc/$SPID/status | awk '{print $2}'; }
stop_server() { kill -TERM $SPID; wait $SPID 2>/dev/null; }
summary() { awk '$1=="produce"||$1=="lease"||$1=="complete"{printf "%s %s items/s p99 %s p99.9 %s max %s; ", $1, $4, $6, $7, $8}' $1; }
echo "== $LABEL window=$WINDOW $(date -u) $(load)" > $OUT
$BIN server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
SPID=$!
until curl -sf $EP/health >/dev/null 2>&1; do sleep 0.05; done
for Q in deep shallow churn; do
  $BIN create --endpoint $EP $Q --lease-timeout 1m --expire-timeout 720h >> $ROOT/cli.log 2>&1 || true
done
DONE=0
for TARGET in $DEPTHS; do
  N=$((TARGET - DONE))
  t0=$(date +%s.%N)
  $BIN bench --endpoint $EP --queue deep --workload produce --items $N --batch 1000 --producers 4 --payload 100 --quiet > $ROOT/prefill-$TARGET.txt 2>&1
  t1=$(date +%s.%N)
  DONE=$TARGET
  echo "depth $TARGET: prefill $N items in $(echo "$t1 - $t0" | bc) s; RSS after prefill $(rss) KiB; disk $(du -sm $ROOT/data | cut -f1) MiB; $(load)" >> $OUT
  stop_server
  start_server deep
  sleep 1
  echo "depth $TARGET: RSS after restart + first lease $(rss) KiB" >> $OUT
done
for Q in deep shallow deep shallow; do
  $BIN bench --endpoint $EP --queue $Q --workload pipeline --duration 15s --batch 100 --producers 4 --consumers 4 --payload 100 --drain-timeout 60s > $ROOT/pipe-$Q.txt 2>&1
  echo "pipeline $Q: $(summary $ROOT/pipe-$Q.txt) RSS $(rss) KiB; $(load); $(grep -E 'gave up|^cpu' $ROOT/pipe-$Q.txt | tr '\n' ' ')" >> $OUT
done
t0=$(date +%s.%N)
$BIN bench --endpoint $EP --queue churn --workload drain --items 3000000 --batch 1000 --producers 4 --consumers 4 --payload 100 --drain-timeout 120s > $ROOT/churn.txt 2>&1
t1=$(date +%s.%N)
echo "churn: 3,000,000 produced and consumed in $(echo "$t1 - $t0" | bc) s: $(summary $ROOT/churn.txt) RSS $(rss) KiB; $(load)" >> $OUT
$BIN produce --endpoint $EP --payload one churn > /dev/null 2>&1
stop_server
start_server churn
echo "after churn: RSS $(rss) KiB" >> $OUT
stop_server
echo "done $(date -u) disk $(du -sm $ROOT/data | cut -f1) MiB" >> $OUT
