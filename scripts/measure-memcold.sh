#!/bin/bash
# RSS of a memory store holding a deep backlog, with and without cold segments (docs/benchmarks.md, "Cold backlog
# segments on a memory store"). Needs a release binary (cargo build --release -p lessor), curl, and an S3-compatible
# server: LESSOR_TEST_S3_ENDPOINT (e.g. from `eval "$(scripts/s3-test-server.sh start)"`) with credentials test/test.
# Usage: scripts/measure-memcold.sh <label> <port> <cold:yes|no> [depth] [cold-after-depth] [segment-items]
# Pre-fills one 1-partition queue of 100 B items to `depth` (default 5,000,000), waits until the spills settle
# (cold: the object count stops changing), records RSS, then runs a 15 s pipeline at the head (segments load back
# meanwhile) and records RSS again. Writes under $MEASURE_ROOT (default /tmp/lessor-memcold).
set -u
LABEL=$1; PORT=$2; COLD=$3; DEPTH=${4:-5000000}; AFTER=${5:-100000}; SEG=${6:-100000}
BIN=${LESSOR_BIN:-$(dirname "$0")/../target/release/lessor}
S3=${LESSOR_TEST_S3_ENDPOINT:?start scripts/s3-test-server.sh first}
BUCKET=lessor-measure
ROOT=${MEASURE_ROOT:-/tmp/lessor-memcold}/run-$LABEL
PREFIX="measure-mem-$LABEL-$(date +%s)/"
rm -rf $ROOT; mkdir -p $ROOT
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
  echo "  driver: memory"
  echo "partition-storage:"
  echo "  - name: mem-0"
  echo "    driver: memory"
  echo "    affinity: 1"
  if [ "$COLD" = yes ]; then
    echo "    config:"
    echo "      cold-segments: s3-0"
    echo "      cold-after-depth: $AFTER"
    echo "      cold-segment-items: $SEG"
  fi
} > $ROOT/config.yaml
load() { uptime | sed 's/.*load average: /load /'; }
rss() { grep VmRSS /proc/$SPID/status | awk '{print $2}'; }
objects() { curl -s "$S3/$BUCKET?list-type=2&prefix=$PREFIX&max-keys=100000" | grep -o '<Size>[0-9]*</Size>' | tr -dc '0-9\n' | awk '{s+=$1; n++} END {printf "%d objects, %d KiB", n, s/1024}'; }
$BIN server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
SPID=$!
until curl -sf $EP/health >/dev/null 2>&1; do
  kill -0 $SPID 2>/dev/null || { echo "server did not start:"; cat $ROOT/server.log; exit 1; }
  sleep 0.02
done
echo "== $LABEL cold=$COLD depth=$DEPTH after=$AFTER segment=$SEG $(date -u) $(load); idle RSS $(rss) KiB" > $OUT
$BIN create --endpoint $EP deep --lease-timeout 1m --expire-timeout 720h >> $ROOT/cli.log 2>&1 || true
t0=$(date +%s.%N)
$BIN bench --endpoint $EP --queue deep --workload produce --items $DEPTH --batch 1000 --producers 4 --payload 100 --quiet > $ROOT/prefill.txt 2>&1
t1=$(date +%s.%N)
echo "prefill $DEPTH items in $(echo "$t1 - $t0" | bc) s; RSS $(rss) KiB; $(load)" >> $OUT
if [ "$COLD" = yes ]; then
  last=""; while true; do sleep 5; now=$(objects); [ "$now" = "$last" ] && break; last=$now; done
  echo "spills settled $(echo "$(date +%s.%N) - $t1" | bc) s after the prefill: $(objects); RSS $(rss) KiB; $(load)" >> $OUT
  # Freed records go back to the OS as the allocator purges: RSS again after a quiet while.
  sleep 30
  echo "30 s later: RSS $(rss) KiB; $(load)" >> $OUT
else
  sleep 35
  echo "after 35 s: RSS $(rss) KiB; $(load)" >> $OUT
fi
$BIN bench --endpoint $EP --queue deep --workload pipeline --duration 15s --batch 100 --producers 4 --consumers 4 --payload 100 --drain-timeout 10s > $ROOT/pipe.txt 2>&1
echo "15 s pipeline at the head (segments load back): $(awk '$1=="lease"{printf "lease %s items/s p99 %s", $4, $6}' $ROOT/pipe.txt); RSS $(rss) KiB; $( [ "$COLD" = yes ] && objects ); $(load)" >> $OUT
kill -TERM $SPID; wait $SPID 2>/dev/null
echo "done $(date -u)" >> $OUT
cat $OUT
