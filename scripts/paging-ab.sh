#!/bin/bash
# A/B against a server process (lessor server + lessor bench --endpoint), durability sync, alternated; the branch
# runs with memory-window-items 4294967295 (never pages: the code path of any queue that stays within its window).
# Binaries: ${LESSOR_BIN_PREFIX}main and ${LESSOR_BIN_PREFIX}br (default prefix /tmp/lessor-).
# Usage: paging-ab.sh <pairs> <out> <port>
PAIRS=$1; OUT=$2; PORT=$3
EP=http://127.0.0.1:$PORT
ROOT=${MEASURE_ROOT:-/tmp/lessor-paging-ab}
. "$(dirname "$0")/paging-lib.sh"
run() { # label workload args...
  local label=$1 wl=$2; shift 2
  rm -rf $ROOT; mkdir -p $ROOT/data
  local extra=""
  [ $label = br ] && extra="memory-window-items: 4294967295"
  paging_config $ROOT $PORT "durability: sync" "$extra"
  paging_start ${LESSOR_BIN_PREFIX:-/tmp/lessor-}$label $ROOT $EP
  local spid=$SPID
  local up=$(uptime | sed 's/.*load average: //')
  local res=$(timeout 300 ${LESSOR_BIN_PREFIX:-/tmp/lessor-}$label bench --endpoint $EP --producers 4 --consumers 4 --batch 100 --payload 100 --workload $wl "$@" 2>&1)
  kill -TERM $spid; wait $spid
  local prod=$(echo "$res" | awk '$1=="produce"{print $4", p99 "$6", max "$8}')
  local lease=$(echo "$res" | awk '$1=="lease"{print $4", p99 "$6", max "$8}')
  local cpu=$(echo "$res" | grep '^cpu:' | sed 's/cpu: //')
  echo "$(date -u +%H:%M:%S) $label $wl $* | load $up | produce $prod | lease $lease | $cpu" >> $OUT
}
for i in $(seq 1 $PAIRS); do
  if [ $((i % 2)) = 1 ]; then ORDER="main br"; else ORDER="br main"; fi
  for W in "drain --items 300000" "drain --items 90000" "pipeline --duration 8s"; do
    for L in $ORDER; do
      run $L $W
    done
  done
done
rm -rf $ROOT
