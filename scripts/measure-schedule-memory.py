"""RSS of `lessor server` (fjall, default config) with N (1,000,000) items of 100 bytes scheduled an hour ahead,
produced 1,000 a request: after producing, and after a restart once queue.stats opened the partition
(docs/benchmarks.md, "The schedule paged").

Usage: python3 scripts/measure-schedule-memory.py BINARY DATADIR PORT"""
import base64, datetime, json, os, subprocess, sys, time, urllib.request

BIN, DATA, PORT = sys.argv[1], sys.argv[2], sys.argv[3]
N = int(os.environ.get("N", "1000000"))
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

p = start()
time.sleep(2)
print("idle RSS/peak MB", rss(p.pid))
call("/v1/queues.create", {"queue_name": "s", "lease_timeout": "1m", "expire_timeout": "24h", "requested_partitions": 1})
due = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
t0 = time.time()
for b in range(N // 1000):
    items = [{"bytes": base64.b64encode(b"%0100d" % (b * 1000 + i)).decode(), "enqueue_at": due} for i in range(1000)]
    call("/v1/queue.produce", {"queue_name": "s", "request_timeout": "60s", "items": items})
took = time.time() - t0
time.sleep(3)
print(f"produced {N} in {took:.1f}s ({N / took:.0f} items/s); RSS/peak MB", rss(p.pid))
stop(p)
p = start()
st = call("/v1/queue.stats", {"queue_name": "s", "with_tiers": True})
time.sleep(5)
print("after a restart (stats opened the partition): RSS/peak MB", rss(p.pid))
print("stats", json.dumps(st)[:600])
stop(p)
