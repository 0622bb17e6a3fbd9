"""Size and time of a `/metrics` scrape with many queues touched (docs/operations.md, "Metrics with many queues"):
N (100,000) queues created on a memory-only `lessor server`, one `queue.stats` each (which loads the queue, so
it has per-queue figures), then SCRAPES (3) scrapes of `/metrics` in Prometheus text: bytes, samples, seconds each,
and the server's RSS. LIMITS, when set, is added under `limits:` in the server's configuration (for example
`metrics-max-queues: 0`; a build before that key refuses it). With QUEUE set, also scrapes
`/metrics?queue=<QUEUE>`. Storage is memory: the figures measured are the scrape's, not the store's.

Usage: [N=100000] [SCRAPES=3] [LIMITS='metrics-max-queues: 10000'] [QUEUE=tenant-000042]
       python3 scripts/measure-metrics.py BINARY PORT"""
import concurrent.futures, json, os, subprocess, sys, tempfile, time, urllib.request

BIN, PORT = sys.argv[1], sys.argv[2]
N, SCRAPES = int(os.environ.get("N", "100000")), int(os.environ.get("SCRAPES", "3"))
E = f"http://127.0.0.1:{PORT}"

def call(path, body):
    req = urllib.request.Request(E + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}")

def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        d = dict(l.split(":", 1) for l in f if ":" in l)
    return int(d["VmRSS"].split()[0]) // 1024

def scrape(path):
    t = time.time()
    with urllib.request.urlopen(E + path, timeout=600) as r:
        body = r.read()
    took = time.time() - t
    samples = sum(1 for l in body.splitlines() if l and not l.startswith(b"#"))
    return len(body), samples, took, body

conf = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
conf.write("queue-storage:\n  driver: memory\npartition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n")
if os.environ.get("LIMITS"):
    conf.write("limits:\n  " + os.environ["LIMITS"] + "\n")
conf.close()
p = subprocess.Popen([BIN, "server", "--address", f"127.0.0.1:{PORT}", "--log-level", "warn", "--config", conf.name],
                     stdout=subprocess.DEVNULL)
try:
    for _ in range(600):
        try:
            urllib.request.urlopen(E + "/health", timeout=1).read()
            break
        except Exception:
            time.sleep(0.1)
    names = [f"tenant-{i:06d}" for i in range(N)]
    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda q: call("/v1/queues.create", {"queue_name": q, "lease_timeout": "1m",
                                                          "expire_timeout": "24h", "requested_partitions": 1}), names))
        list(ex.map(lambda q: call("/v1/queue.stats", {"queue_name": q}), names))
    print(f"{N} queues created and touched in {time.time() - t:.0f}s: RSS MB", rss(p.pid), flush=True)
    for i in range(SCRAPES):
        size, samples, took, body = scrape("/metrics")
        print(f"scrape {i + 1}: {size / 1e6:.2f} MB, {samples} samples, {took:.2f}s; RSS MB {rss(p.pid)}", flush=True)
    for l in body.decode().splitlines():
        if l.startswith(("lessor_metrics_queues_omitted", "lessor_queues_loaded ", "lessor_queues_produced_total")):
            print("  ", l)
    if os.environ.get("QUEUE"):
        size, samples, took, _ = scrape("/metrics?queue=" + os.environ["QUEUE"])
        print(f"scrape ?queue={os.environ['QUEUE']}: {size} bytes, {samples} samples, {took:.3f}s", flush=True)
finally:
    p.terminate()
    p.wait(timeout=120)
    os.unlink(conf.name)
