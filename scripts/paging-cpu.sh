#!/bin/bash
# Server CPU per produced item, main vs paging build with the window out of the way (docs/benchmarks.md). Binaries
# ${LESSOR_BIN_PREFIX}main and ${LESSOR_BIN_PREFIX}br (default prefix /tmp/lessor-); results appended to $OUT
# (default /tmp/lessor-paging-cpu.txt). WL=drain measures a whole drain instead of a produce.
PORT=${PORT:-62437}; EP=http://127.0.0.1:$PORT; ROOT=${MEASURE_ROOT:-/tmp/lessor-paging-cpu}
OUT=${OUT:-/tmp/lessor-paging-cpu.txt}; BIN=${LESSOR_BIN_PREFIX:-/tmp/lessor-}
. "$(dirname "$0")/paging-lib.sh"
for i in 1 2 3 4; do
 for L in main br; do
  rm -rf $ROOT; mkdir -p $ROOT/data
  extra=""; [ $L = br ] && extra="memory-window-items: 4294967295"
  paging_config $ROOT $PORT "durability: sync" "$extra"
  paging_start $BIN$L $ROOT $EP
  spid=$SPID
  t0=$(awk '{print $14+$15}' /proc/$spid/stat)
  res=$($BIN$L bench --endpoint $EP --workload ${WL:-produce} --items 300000 --producers 4 --consumers 4 --batch 100 --payload 100 2>&1 | awk '$1=="produce"{print $4}')
  t1=$(awk '{print $14+$15}' /proc/$spid/stat)
  kill -TERM $spid; wait $spid
  echo "$(date -u +%T) $L ${WL:-produce} 300000: $res items/s, server CPU $(( (t1 - t0) )) ticks ($(echo "scale=2; ($t1-$t0)*10000/300000" | bc) us/item); load $(uptime | sed 's/.*average: //')" >> $OUT
 done
done
rm -rf $ROOT
