"""RSS of `lessor server` (fjall) with many queues touched once (docs/operations.md, "Idle queues unload"): N
(10,000) queues created, then one `queue.stats` each (which loads the queue), then RSS right after the sweep and
again after IDLE seconds. With IDLE set, the server runs with `limits.queue-idle-unload: <IDLE>s` (a build that
knows the key); without it, with the binary's defaults (the build before the key: queues never unload).

SWEEPS (default 1) repeats the sweep after those 60 s: with queues unloaded, whether the second sweep reuses the
memory the first freed.

Usage: [N=10000] [IDLE=10] [SWEEPS=1] python3 scripts/measure-idle-unload.py BINARY DATADIR PORT"""
import concurrent.futures, json, os, subprocess, sys, time, urllib.request

BIN, DATA, PORT = sys.argv[1], sys.argv[2], sys.argv[3]
N, IDLE = int(os.environ.get("N", "10000")), os.environ.get("IDLE", "")
E = f"http://127.0.0.1:{PORT}"

def call(path, body):
    req = urllib.request.Request(E + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}")

def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        d = dict(l.split(":", 1) for l in f if ":" in l)
    return int(d["VmRSS"].split()[0]) // 1024

def metric(name):
    with urllib.request.urlopen(E + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return line.split()[1]
    return "n/a"

args = [BIN, "server", "--address", f"127.0.0.1:{PORT}", "--log-level", "warn"]
if IDLE:
    conf = DATA + ".yaml"
    with open(conf, "w") as f:
        f.write(f"queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {DATA}\n"
                f"partition-storage:\n  - name: default\n    driver: fjall\n    affinity: 1\n"
                f"    config:\n      storage-dir: {DATA}\n"
                f"limits:\n  queue-idle-unload: {IDLE}s\n")
    args += ["--config", conf]
else:
    args += ["--data-dir", DATA]
p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(DATA + ".log", "a"))
try:
    for _ in range(600):
        try:
            urllib.request.urlopen(E + "/health", timeout=1).read()
            break
        except Exception:
            time.sleep(0.1)
    time.sleep(2)
    print("started: RSS MB", rss(p.pid), flush=True)
    names = [f"tenant-{i:06d}" for i in range(N)]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda q: call("/v1/queues.create", {"queue_name": q, "lease_timeout": "1m",
                                                          "expire_timeout": "24h", "requested_partitions": 1}), names))
    time.sleep(2)
    print(N, "queues created: RSS MB", rss(p.pid), flush=True)
    for sweep in range(1, int(os.environ.get("SWEEPS", "1")) + 1):
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda q: call("/v1/queue.stats", {"queue_name": q}), names))
        print(f"sweep {sweep}: queue.stats over all in {time.time() - t:.1f}s: RSS MB", rss(p.pid),
              "queues loaded", metric("lessor_queues_loaded"), flush=True)
        for wait, slept in ((10, 0), (30, 10), (60, 30)):
            time.sleep(wait - slept)
            print(f"{wait}s after sweep {sweep}: RSS MB", rss(p.pid), "queues loaded",
                  metric("lessor_queues_loaded"), flush=True)
finally:
    p.terminate()
    p.wait(timeout=120)
