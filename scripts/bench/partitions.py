#!/usr/bin/env python3
"""Partition-count and queue-churn measurements against a running `lessor server` (docs/benchmarks.md).

  partitions.py wide  --endpoint http://127.0.0.1:2319 --partitions 1000 10000
      create a queue with N partitions and time create + first produce, while a background client produces and
      leases on another queue and records its latencies (baseline before, and during).
  partitions.py churn --endpoint ... --data-dir DIR --pid PID --cycles 10000 --partitions 1 64
      create / produce one item / delete cycles; prints cycle time, disk of DIR and RSS of PID every N cycles.

Uses only the standard library, one keep-alive connection per thread.
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse


class Conn:
    def __init__(self, endpoint):
        u = urllib.parse.urlparse(endpoint)
        self.host, self.port = u.hostname, u.port or 80
        self.c = http.client.HTTPConnection(self.host, self.port, timeout=120)

    def call(self, path, body):
        data = json.dumps(body).encode()
        for attempt in range(2):
            try:
                self.c.request("POST", path, data, {"Content-Type": "application/json"})
                r = self.c.getresponse()
                out = r.read()
                return r.status, out
            except (http.client.HTTPException, OSError):
                self.c.close()
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=120)
                if attempt:
                    raise

    def ok(self, path, body):
        st, out = self.call(path, body)
        if st != 200:
            raise SystemExit(f"{path}: {st} {out[:300]!r}")
        return json.loads(out or b"{}")


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def background(endpoint, queue, stop, samples):
    c = Conn(endpoint)
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        c.ok("/v1/queue.produce", {"queue_name": queue, "request_timeout": "10s", "items": [{"utf8": f"x{i}"}]})
        t1 = time.perf_counter()
        r = c.ok("/v1/queue.lease", {"queue_name": queue, "batch_size": 1, "client_id": "bg", "request_timeout": "10s"})
        t2 = time.perf_counter()
        for it in r.get("items", []):
            c.ok("/v1/queue.complete", {"queue_name": queue, "partition": r.get("partition", 0), "request_timeout": "10s", "ids": [it["id"]]})
        samples.append((t0, (t1 - t0) * 1e3, (t2 - t1) * 1e3))
        i += 1


def wide(args):
    c = Conn(args.endpoint)
    bgq = f"bg-{os.getpid()}"
    c.ok("/v1/queues.create", {"queue_name": bgq, "lease_timeout": "1m", "expire_timeout": "1h", "requested_partitions": 1})
    stop, samples = threading.Event(), []
    t = threading.Thread(target=background, args=(args.endpoint, bgq, stop, samples), daemon=True)
    t.start()
    time.sleep(args.baseline)
    windows = []
    for n in args.partitions:
        q = f"wide-{n}-{os.getpid()}"
        w0 = time.perf_counter()
        c.ok("/v1/queues.create", {"queue_name": q, "lease_timeout": "1m", "expire_timeout": "1h", "requested_partitions": n})
        w1 = time.perf_counter()
        c.ok("/v1/queue.produce", {"queue_name": q, "request_timeout": "60s", "items": [{"utf8": "first"}]})
        w2 = time.perf_counter()
        windows.append((n, w0, w2))
        print(f"partitions={n} create={1e3*(w1-w0):.0f} ms first_produce={1e3*(w2-w1):.0f} ms total={1e3*(w2-w0):.0f} ms", flush=True)
        time.sleep(args.baseline)
        if args.delete:
            d0 = time.perf_counter()
            c.ok("/v1/queues.delete", {"queue_name": q})
            print(f"partitions={n} delete={1e3*(time.perf_counter()-d0):.0f} ms", flush=True)
    stop.set()
    t.join()
    first = windows[0][1]
    base = [s for s in samples if s[0] < first]
    print(f"other queue, before: n={len(base)} produce p50={pct([s[1] for s in base],0.5):.2f} p99={pct([s[1] for s in base],0.99):.2f} ms "
          f"lease p50={pct([s[2] for s in base],0.5):.2f} p99={pct([s[2] for s in base],0.99):.2f} ms")
    for n, a, b in windows:
        d = [s for s in samples if a <= s[0] <= b]
        print(f"other queue, during {n}: n={len(d)} produce p50={pct([s[1] for s in d],0.5):.2f} p99={pct([s[1] for s in d],0.99):.2f} max={max([s[1] for s in d] or [0]):.2f} ms "
              f"lease p50={pct([s[2] for s in d],0.5):.2f} p99={pct([s[2] for s in d],0.99):.2f} ms")


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def churn(args):
    c = Conn(args.endpoint)
    for parts in args.partitions:
        print(f"# churn with {parts} partition(s), {args.cycles} cycles", flush=True)
        times = []
        start_disk = start_rss = None
        for i in range(args.cycles):
            q = f"churn-{parts}"
            t0 = time.perf_counter()
            c.ok("/v1/queues.create", {"queue_name": q, "lease_timeout": "1m", "expire_timeout": "1h", "requested_partitions": parts})
            c.ok("/v1/queue.produce", {"queue_name": q, "request_timeout": "60s", "items": [{"utf8": "x" * 100}]})
            c.ok("/v1/queues.delete", {"queue_name": q})
            times.append(time.perf_counter() - t0)
            if i + 1 == args.warmup:
                start_disk, start_rss = du(args.data_dir), rss(args.pid)
            if (i + 1) % args.every == 0:
                w = times[-args.every:]
                print(f"cycles={i+1} cycle_ms mean={1e3*statistics.mean(w):.2f} p99={1e3*pct(w,0.99):.2f} "
                      f"disk={du(args.data_dir)/2**20:.1f} MiB rss={rss(args.pid)/2**20:.1f} MiB", flush=True)
        time.sleep(args.settle)
        end_disk, end_rss = du(args.data_dir), rss(args.pid)
        print(f"after warm-up ({args.warmup} cycles): disk {start_disk/2**20:.1f} -> {end_disk/2**20:.1f} MiB, "
              f"rss {start_rss/2**20:.1f} -> {end_rss/2**20:.1f} MiB", flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wide")
    w.add_argument("--endpoint", default="http://127.0.0.1:2319")
    w.add_argument("--partitions", type=int, nargs="+", default=[1000, 10000])
    w.add_argument("--baseline", type=float, default=3.0)
    w.add_argument("--delete", action="store_true")
    ch = sub.add_parser("churn")
    ch.add_argument("--endpoint", default="http://127.0.0.1:2319")
    ch.add_argument("--data-dir", required=True)
    ch.add_argument("--pid", type=int, required=True)
    ch.add_argument("--cycles", type=int, default=10000)
    ch.add_argument("--partitions", type=int, nargs="+", default=[1, 64])
    ch.add_argument("--every", type=int, default=1000)
    ch.add_argument("--warmup", type=int, default=100)
    ch.add_argument("--settle", type=float, default=5.0)
    args = ap.parse_args()
    {"wide": wide, "churn": churn}[args.cmd](args)


if __name__ == "__main__":
    main()
