"""RSS of `lessor server` (fjall, default config) with large scheduled and leased items (docs/benchmarks.md,
"Scheduled and leased large items"): before and after producing N (500) scheduled items of SIZE (3,700,000) bytes
due in an hour, after a restart once the partition is open; then N ready items leased in successive leases and none
completed, and after a restart. Needs about 2 * N * SIZE bytes of disk under DATADIR.

Usage: python3 scripts/measure-payloads-on-disk.py BINARY DATADIR PORT"""
import base64, datetime, json, os, subprocess, sys, time, urllib.request

BIN, DATA, PORT = sys.argv[1], sys.argv[2], sys.argv[3]
N, SIZE = int(os.environ.get("N", "500")), int(os.environ.get("SIZE", "3700000"))
E = f"http://127.0.0.1:{PORT}"

def call(path, body):
    req = urllib.request.Request(E + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}")

def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        d = dict(l.split(":", 1) for l in f if ":" in l)
    return int(d["VmRSS"].split()[0]) // 1024, int(d["VmHWM"].split()[0]) // 1024

def start():
    p = subprocess.Popen([BIN, "server", "--data-dir", DATA, "--address", f"127.0.0.1:{PORT}", "--log-level", "warn"],
                         stdout=subprocess.DEVNULL, stderr=open(DATA + ".log", "a"))
    for _ in range(600):
        try:
            urllib.request.urlopen(E + "/health", timeout=1).read()
            return p
        except Exception:
            time.sleep(0.1)
    raise SystemExit("server did not start")

def stop(p):
    p.terminate()
    p.wait(timeout=120)

import atexit
p = start()
atexit.register(lambda: p.poll() is None and p.terminate())
time.sleep(2)
print("pid", p.pid, "idle RSS/peak MB", rss(p.pid))
call("/v1/queues.create", {"queue_name": "big", "lease_timeout": "1m", "expire_timeout": "24h", "requested_partitions": 1})
due = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
t0 = time.time()
for i in range(N):
    payload = (b"%06d" % i) + os.urandom(SIZE - 6)
    call("/v1/queue.produce", {"queue_name": "big", "request_timeout": "60s",
                               "items": [{"bytes": base64.b64encode(payload).decode(), "enqueue_at": due}]})
    if (i + 1) % 100 == 0:
        print(f"{i + 1} produced in {time.time() - t0:.1f}s, RSS/peak MB", rss(p.pid), flush=True)
time.sleep(3)
print("after producing: RSS/peak MB", rss(p.pid))
stop(p)
p = start()
time.sleep(3)
print("3 s after the restart (partition not open yet): RSS/peak MB", rss(p.pid))
st = call("/v1/queue.stats", {"queue_name": "big", "with_tiers": True})
print("stats", json.dumps(st)[:900])
time.sleep(5)
print("5 s after queue.stats opened the partition: RSS/peak MB", rss(p.pid), flush=True)
# Leased items: N ready items leased in successive leases (each answer within limits.max-lease-bytes), none
# completed.
call("/v1/queues.create", {"queue_name": "held", "lease_timeout": "1h", "expire_timeout": "24h", "requested_partitions": 1})
for i in range(N):
    payload = (b"%06d" % i) + os.urandom(SIZE - 6)
    call("/v1/queue.produce", {"queue_name": "held", "request_timeout": "60s",
                               "items": [{"bytes": base64.b64encode(payload).decode()}]})
print("produced", N, "ready items: RSS/peak MB", rss(p.pid), flush=True)
leased, t = 0, time.time()
while leased < N:
    try:
        r = call("/v1/queue.lease", {"queue_name": "held", "batch_size": 100, "client_id": "m", "request_timeout": "2s"})
    except Exception as e:
        print("lease:", e)
        break
    leased += len(r.get("items", []))
time.sleep(3)
print(f"leased {leased} in {time.time() - t:.1f}s, none completed: RSS/peak MB", rss(p.pid), flush=True)
stop(p)
p = start()
call("/v1/queue.stats", {"queue_name": "held"})
time.sleep(5)
print("5 s after a restart and queue.stats of the leased queue: RSS/peak MB", rss(p.pid), flush=True)
stop(p)
