#!/bin/bash
# Cold backlog segment measurements (docs/benchmarks.md, "Cold backlog segments"). Needs a release binary
# (cargo build --release -p lessor), curl, bc, and an S3-compatible server: LESSOR_TEST_S3_ENDPOINT (e.g. from
# `eval "$(scripts/s3-test-server.sh start)"`) with credentials test/test (moto accepts any). Writes under
# $MEASURE_ROOT (default /tmp/lessor-cold).
# Usage: scripts/measure-cold.sh <label> <port> <cold:yes|no> [depth] [window] [cold-after-depth] [segment-items]
# PREFETCH=<items> sets cold-prefetch-items (default: the store default).
# Pre-fills one 1-partition queue of 100 B items to `depth` (default 20,000,000), waits until the spills settle
# (cold: the `object` tier stops growing), records RSS, local disk and object-storage bytes, restarts the server
# (start-up to /health and to the first lease), then drains the head with a pipeline while segments load back and
# records lease p99 next to the same pipeline on a fresh shallow queue. `uptime` load is recorded with every step.
set -u
LABEL=$1; PORT=$2; COLD=$3; DEPTH=${4:-20000000}; WINDOW=${5:-1000000}; AFTER=${6:-1000000}; SEG=${7:-}
BIN=${LESSOR_BIN:-$(dirname "$0")/../target/release/lessor}
S3=${LESSOR_TEST_S3_ENDPOINT:?start scripts/s3-test-server.sh first}
BUCKET=lessor-measure
ROOT=${MEASURE_ROOT:-/tmp/lessor-cold}/run-$LABEL
PREFIX="measure-$LABEL-$(date +%s)/"
rm -rf $ROOT; mkdir -p $ROOT/data
EP=http://127.0.0.1:$PORT
OUT=$ROOT/results.txt
curl -sf -X PUT "$S3/$BUCKET" > /dev/null || true
{
  echo "address: 127.0.0.1:$PORT"
  if [ "$COLD" = yes ]; then
    echo "object-storage:"
    echo "  - name: s3-0"
    echo "    endpoint: $S3"
    echo "    bucket: $BUCKET"
    echo "    access-key-id: test"
    echo "    secret-access-key: test"
    echo "    path-style: true"
    echo "    prefix: $PREFIX"
  fi
  echo "queue-storage:"
  echo "  driver: fjall"
  echo "  config:"
  echo "    storage-dir: $ROOT/data"
  echo "partition-storage:"
  echo "  - name: disk-0"
  echo "    driver: fjall"
  echo "    affinity: 1"
  echo "    config:"
  echo "      storage-dir: $ROOT/data"
  echo "      memory-window-items: $WINDOW"
  if [ "$COLD" = yes ]; then
    echo "      cold-segments: s3-0"
    echo "      cold-after-depth: $AFTER"
    [ -n "$SEG" ] && echo "      cold-segment-items: $SEG"
    [ -n "${PREFETCH:-}" ] && echo "      cold-prefetch-items: $PREFETCH"
  fi
} > $ROOT/config.yaml
load() { uptime | sed 's/.*load average: /load /'; }
rss() { grep VmRSS /proc/$SPID/status | awk '{print $2}'; }
start() {
  $BIN server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
  SPID=$!
  until curl -sf $EP/health >/dev/null 2>&1; do
    kill -0 $SPID 2>/dev/null || { echo "server did not start:"; cat $ROOT/server.log; exit 1; }
    sleep 0.02
  done
}
stop_server() { kill -TERM $SPID; wait $SPID 2>/dev/null; }
# Object bytes under the prefix (moto and most servers answer an unsigned ListObjectsV2 on a test bucket).
objects() { curl -s "$S3/$BUCKET?list-type=2&prefix=$PREFIX&max-keys=100000" | grep -o '<Size>[0-9]*</Size>' | tr -dc '0-9\n' | awk '{s+=$1; n++} END {printf "%d objects, %d KiB", n, s/1024}'; }
summary() { awk '$1=="produce"||$1=="lease"||$1=="complete"{printf "%s %s items/s p99 %s p99.9 %s max %s; ", $1, $4, $6, $7, $8}' $1; }
echo "== $LABEL cold=$COLD depth=$DEPTH window=$WINDOW after=$AFTER segment=${SEG:-default} $(date -u) $(load)" > $OUT
start
for Q in deep shallow; do
  $BIN create --endpoint $EP $Q --lease-timeout 1m --expire-timeout 720h >> $ROOT/cli.log 2>&1 || true
done
t0=$(date +%s.%N)
$BIN bench --endpoint $EP --queue deep --workload produce --items $DEPTH --batch 1000 --producers 4 --payload 100 --quiet > $ROOT/prefill.txt 2>&1
t1=$(date +%s.%N)
echo "prefill $DEPTH items in $(echo "$t1 - $t0" | bc) s; RSS $(rss) KiB; disk $(du -sm $ROOT/data | cut -f1) MiB; $(load)" >> $OUT
if [ "$COLD" = yes ]; then
  # Spills run in the background (one segment per partition at a time): wait until the object count settles.
  last=""; while true; do sleep 10; now=$(objects); [ "$now" = "$last" ] && break; last=$now; done
  echo "spills settled $(echo "$(date +%s.%N) - $t1" | bc) s after the prefill: $(objects); RSS $(rss) KiB; disk $(du -sm $ROOT/data | cut -f1) MiB; $(load)" >> $OUT
fi
stop_server
t0=$(date +%s.%N); start; t1=$(date +%s.%N)
$BIN lease --endpoint $EP --timeout 30s deep > /dev/null 2>&1
t2=$(date +%s.%N)
echo "start-up: health $(echo "$t1 - $t0" | bc) s, first lease $(echo "$t2 - $t0" | bc) s; RSS $(rss) KiB; $(load)" >> $OUT
for Q in deep shallow deep shallow; do
  $BIN bench --endpoint $EP --queue $Q --workload pipeline --duration ${PIPE_SECS:-30}s --batch 100 --producers 4 --consumers 4 --payload 100 --drain-timeout 60s > $ROOT/pipe-$Q.txt 2>&1
  echo "pipeline $Q: $(summary $ROOT/pipe-$Q.txt) RSS $(rss) KiB; $( [ "$COLD" = yes ] && objects ); $(load)" >> $OUT
done
stop_server
echo "done $(date -u) disk $(du -sm $ROOT/data | cut -f1) MiB" >> $OUT
cat $OUT
