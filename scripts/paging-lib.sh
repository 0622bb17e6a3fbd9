#!/bin/bash
# Shared by the paging measurement scripts (measure-paging.sh, paging-ab.sh, paging-cpu.sh, paging-stall.sh):
# source it, then call the functions below.

# paging_config ROOT PORT [LINE...]: writes ROOT/config.yaml, a server on 127.0.0.1:PORT with one fjall partition
# store in ROOT/data; each LINE is added to the partition store's `config` as it is (e.g. "durability: sync").
paging_config() {
  local root=$1 port=$2; shift 2
  {
    echo "address: 127.0.0.1:$port"
    echo "queue-storage:"
    echo "  driver: fjall"
    echo "  config:"
    echo "    storage-dir: $root/data"
    echo "partition-storage:"
    echo "  - name: disk-0"
    echo "    driver: fjall"
    echo "    affinity: 1"
    echo "    config:"
    echo "      storage-dir: $root/data"
    for line in "$@"; do [ -n "$line" ] && echo "      $line"; done
  } > "$root/config.yaml"
}

# paging_start BIN ROOT ENDPOINT: starts BIN's server on ROOT/config.yaml (log in ROOT/server.log), sets SPID, and
# returns once ENDPOINT/health answers.
paging_start() {
  "$1" server --config "$2/config.yaml" > "$2/server.log" 2>&1 &
  SPID=$!
  until curl -sf "$3/health" >/dev/null 2>&1; do sleep 0.05; done
}
