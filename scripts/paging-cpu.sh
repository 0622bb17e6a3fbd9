#!/bin/bash
# Server CPU per produced item, main vs paging build with the window out of the way (docs/benchmarks.md). Binaries
# /tmp/paging2-lessor-main and /tmp/paging2-lessor-br; results appended to /tmp/paging2-ab/cpu.txt.
PORT=62437; EP=http://127.0.0.1:$PORT; ROOT=/tmp/paging2-cpu; OUT=/tmp/paging2-ab/cpu.txt
for i in 1 2 3 4; do
 for L in main br; do
  rm -rf $ROOT; mkdir -p $ROOT/data
  extra=""; [ $L = br ] && extra="      memory-window-items: 4294967295"
  printf "address: 127.0.0.1:$PORT\nqueue-storage:\n  driver: fjall\n  config:\n    storage-dir: $ROOT/data\npartition-storage:\n  - name: disk-0\n    driver: fjall\n    affinity: 1\n    config:\n      storage-dir: $ROOT/data\n      durability: sync\n$extra\n" > $ROOT/config.yaml
  /tmp/paging2-lessor-$L server --config $ROOT/config.yaml > $ROOT/server.log 2>&1 &
  spid=$!
  until curl -sf $EP/health >/dev/null 2>&1; do sleep 0.05; done
  t0=$(awk '{print $14+$15}' /proc/$spid/stat)
  res=$(/tmp/paging2-lessor-$L bench --endpoint $EP --workload ${WL:-produce} --items 300000 --producers 4 --consumers 4 --batch 100 --payload 100 2>&1 | awk '$1=="produce"{print $4}')
  t1=$(awk '{print $14+$15}' /proc/$spid/stat)
  kill -TERM $spid; wait $spid
  echo "$(date -u +%T) $L ${WL:-produce} 300000: $res items/s, server CPU $(( (t1 - t0) )) ticks ($(echo "scale=2; ($t1-$t0)*10000/300000" | bc) us/item); load $(uptime | sed 's/.*average: //')" >> $OUT
 done
done
rm -rf $ROOT
