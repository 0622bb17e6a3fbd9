#!/bin/bash
# Stall reproduction (docs/benchmarks.md, "The 30-second stalls of the prototype"): a 1-partition queue pre-filled
# to 10M items of 100 B, the server restarted, then three 60-s pipelines on it. Usage: paging-stall.sh <lessor binary> <port> <dir>
BIN=$1; PORT=$2; ROOT=$3
rm -rf $ROOT; mkdir -p $ROOT/data
EP=http://127.0.0.1:$PORT
. "$(dirname "$0")/paging-lib.sh"
paging_config $ROOT $PORT
OUT=$ROOT/results.txt
load() { uptime | sed 's/.*load average: /load /'; }
summary() { awk '$1=="produce"||$1=="lease"||$1=="complete"{printf "%s %s items/s p99 %s p99.9 %s max %s; ", $1, $4, $6, $7, $8}' $1; }
start() { paging_start $BIN $ROOT $EP; }
start
$BIN create --endpoint $EP deep --lease-timeout 1m --expire-timeout 720h > /dev/null 2>&1
$BIN bench --endpoint $EP --queue deep --workload produce --items 10000000 --batch 1000 --producers 4 --payload 100 --quiet > $ROOT/prefill.txt 2>&1
echo "prefill 10M done $(date -u +%T) $(load)" >> $OUT
kill -TERM $SPID; wait $SPID
start
echo "restarted $(date -u +%T)" >> $OUT
for i in 1 2 3; do
  $BIN bench --endpoint $EP --queue deep --workload pipeline --duration 60s --batch 100 --producers 4 --consumers 4 --payload 100 --drain-timeout 30s > $ROOT/pipe-$i.txt 2>&1
  echo "pipeline $i $(date -u +%T): $(summary $ROOT/pipe-$i.txt) $(load); $(grep -E 'gave up|^cpu' $ROOT/pipe-$i.txt | tr '\n' ' ')" >> $OUT
done
kill -TERM $SPID; wait $SPID
echo "done $(date -u +%T) disk $(du -sm $ROOT/data | cut -f1) MiB" >> $OUT
