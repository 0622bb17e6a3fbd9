"""Soak run of `lessor server` with every queue feature at once, watching the server's memory (docs/operations.md,
"Memory bounds"): a steady workload must reach a plateau, not grow for as long as it runs.

For DURATION seconds (default 600), threads drive one server started here:
- producers: batches of 50 into queue `soak`, RATE items/s in all (4 partitions, lease 2 s, 3 attempts, dead letters to `soak-dlq`,
  retry backoff), half the items with a dedup key (a tenth of them repeated), priorities 0-9, a tenth scheduled
  1-3 s ahead;
- consumers: lease up to 50; complete 70 %, retry 10 % (backoff), extend then complete 10 %, and leave 10 % to
  expire (attempts, then the dead-letter queue);
- every 10 s a rate-limited redrive of `soak-dlq` back to `soak`; browse pages of `soak` every second; a queue
  created, used and deleted every 100 ms; `paused` paused and resumed every 2 s while a producer feeds it.

Prints the server's RSS and item counts every SAMPLE seconds (default 15), and the growth of RSS between the end of
the first third and the end. The idle-unload time is 5 s (`limits.queue-idle-unload`), so the churn queues unload.

SKIP leaves out some of the side workloads, to find which one a growth comes with: SKIP=churn,redriver,browser,pauser.

Usage: [DURATION=600] [SAMPLE=15] [RATE=10000 items/s] [DRIVER=fjall|log|memory] [SKIP=...] python3 scripts/soak.py
BINARY DATADIR PORT"""
import base64, http.client, json, os, random, subprocess, sys, threading, time, urllib.request

BIN, DATA, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
DURATION, SAMPLE = int(os.environ.get("DURATION", "600")), int(os.environ.get("SAMPLE", "15"))
DRIVER = os.environ.get("DRIVER", "fjall")
RATE, PRODUCERS = int(os.environ.get("RATE", "10000")), 3
stop = threading.Event()
errors, counts = {}, {}
lock = threading.Lock()


def count(k, n=1):
    with lock:
        counts[k] = counts.get(k, 0) + n


class Conn:
    def __init__(self):
        self.c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)

    def call(self, path, body, ok=(200,), again=True):
        try:
            self.c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = self.c.getresponse()
            data = r.read()
        except (http.client.HTTPException, OSError):
            # The server closes a keep-alive connection idle for a while: once more on a new one.
            self.c.close()
            self.c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
            count("reconnects")
            return self.call(path, body, ok, False) if again else None
        if r.status not in ok:
            key = f"{path} {r.status} {data[:120]!r}"
            with lock:
                errors[key] = errors.get(key, 0) + 1
            return None
        return json.loads(data or b"{}")


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        d = dict(l.split(":", 1) for l in f if ":" in l)
    return int(d["VmRSS"].split()[0]) // 1024


def ts(seconds_ahead):
    t = time.time() + seconds_ahead
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def depth(stats):
    """Items in a queue, from a `queue.stats` reply (protojson names)."""
    return sum(p.get("total", 0) for q in stats.get("logicalQueues", []) for p in q.get("partitions", []))


def producer(n):
    c, i = Conn(), 0
    # Paced: a soak needs a steady state, where consumers keep up and the backlog stays flat.
    every, due = 50 * PRODUCERS / RATE, time.time()
    while not stop.is_set():
        due += every
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        items = []
        for _ in range(50):
            i += 1
            it = {"bytes": base64.b64encode(os.urandom(60)).decode(), "priority": random.randrange(10)}
            if random.random() < 0.5:
                # A tenth of the keyed items repeat a recent key: acknowledged, stored once.
                k = i - random.randrange(1, 50) if random.random() < 0.1 else i
                it["dedup_id"] = f"p{n}-{k}"
            if random.random() < 0.1:
                it["enqueue_at"] = ts(random.uniform(1, 3))
            items.append(it)
        if c.call("/v1/queue.produce", {"queue_name": "soak", "request_timeout": "30s", "items": items}):
            count("produced", 50)


def consumer(n):
    c = Conn()
    while not stop.is_set():
        r = c.call("/v1/queue.lease", {"queue_name": "soak", "batch_size": 50, "client_id": f"c{n}",
                                       "request_timeout": "1s"}, ok=(200, 454))
        if not r or not r.get("items"):
            continue
        part, ids = r.get("partition", 0), [it["id"] for it in r["items"]]
        count("leased", len(ids))
        roll = random.random()
        if roll < 0.7:
            done = ids
        elif roll < 0.8:
            c.call("/v1/queue.retry", {"queue_name": "soak", "partition": part,
                                       "items": [{"id": x} for x in ids]})
            count("retried", len(ids))
            continue
        elif roll < 0.9:
            c.call("/v1/queue.extend", {"queue_name": "soak", "partition": part, "ids": ids,
                                        "lease_timeout": "5s", "request_timeout": "10s"})
            count("extended", len(ids))
            done = ids
        else:
            count("abandoned", len(ids))
            continue
        if c.call("/v1/queue.complete", {"queue_name": "soak", "partition": part, "ids": done,
                                         "request_timeout": "30s"}):
            count("completed", len(done))


def redriver():
    c = Conn()
    while not stop.wait(10):
        if c.call("/v1/queue.redrive", {"dead_queue": "soak-dlq", "target_queue": "soak", "rate_per_sec": 2000,
                                        "max_items": 20000}, ok=(200, 400, 409)):
            count("redrives")


def browser():
    c = Conn()
    while not stop.wait(1):
        for state in ("ready", "leased", "scheduled"):
            c.call("/v1/queue.browse", {"queue_name": "soak", "state": state, "limit": 100})
        c.call("/v1/queue.stats", {"queue_name": "soak"})
        count("browses")


def churn():
    c, n = Conn(), 0
    while not stop.wait(0.1):
        n += 1
        q = f"churn-{n}"
        c.call("/v1/queues.create", {"queue_name": q, "lease_timeout": "10s", "expire_timeout": "1h",
                                     "requested_partitions": 1 + n % 3})
        c.call("/v1/queue.produce", {"queue_name": q, "request_timeout": "10s",
                                     "items": [{"utf8": f"x{k}", "dedup_id": f"k{k}"} for k in range(10)]})
        c.call("/v1/queue.lease", {"queue_name": q, "batch_size": 5, "client_id": "churn", "request_timeout": "1s"})
        if n % 10:
            c.call("/v1/queues.delete", {"queue_name": q, "force": True})
        elif n > 100:
            # One in ten stays a while (to unload when idle), deleted a hundred rounds later.
            c.call("/v1/queues.delete", {"queue_name": f"churn-{n - 100}", "force": True})
        count("churned")


def pauser():
    c, on = Conn(), False
    while not stop.wait(2):
        on = not on
        c.call("/v1/queue.pause" if on else "/v1/queue.resume", {"queue_name": "paused"})
        c.call("/v1/queue.produce", {"queue_name": "paused", "request_timeout": "10s",
                                     "items": [{"utf8": "p"} for _ in range(20)]})
        r = c.call("/v1/queue.lease", {"queue_name": "paused", "batch_size": 20, "client_id": "pz",
                                       "request_timeout": "500ms"}, ok=(200, 454))
        if r and r.get("items"):
            c.call("/v1/queue.complete", {"queue_name": "paused", "partition": r.get("partition", 0),
                                          "ids": [it["id"] for it in r["items"]], "request_timeout": "10s"})


def main():
    conf = DATA + ".yaml"
    store = f"    config:\n      storage-dir: {DATA}/parts\n" if DRIVER != "memory" else ""
    queues = ("queue-storage:\n  driver: fjall\n  config:\n    storage-dir: " + DATA + "/queues\n"
              if DRIVER != "memory" else "queue-storage:\n  driver: memory\n")
    with open(conf, "w") as f:
        f.write(queues + f"partition-storage:\n  - name: default\n    driver: {DRIVER}\n    affinity: 1\n" + store
                + "limits:\n  queue-idle-unload: 5s\n")
    # SERVER_ENV="K=V;K=V" for the server alone (say, a heap profiler's LD_PRELOAD).
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in os.environ.get("SERVER_ENV", "").split(";") if kv)
    p = subprocess.Popen([BIN, "server", "--address", f"127.0.0.1:{PORT}", "--log-level", "warn",
                          "--config", conf], stdout=subprocess.DEVNULL, stderr=open(DATA + ".log", "a"), env=env)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1).read()
                break
            except Exception:
                time.sleep(0.1)
        c = Conn()
        c.call("/v1/queues.create", {"queue_name": "soak-dlq", "lease_timeout": "1m", "expire_timeout": "1h",
                                     "requested_partitions": 1})
        c.call("/v1/queues.create", {"queue_name": "soak", "lease_timeout": "2s", "expire_timeout": "10m",
                                     "max_attempts": 3, "dead_queue": "soak-dlq", "requested_partitions": 4,
                                     "dedup_window": "30s",
                                     "retry_backoff": {"base": "200ms", "max": "2s", "factor": 2, "jitter": 0.2}})
        c.call("/v1/queues.create", {"queue_name": "paused", "lease_timeout": "1m", "expire_timeout": "1h",
                                     "requested_partitions": 1})
        threads = [threading.Thread(target=producer, args=(n,)) for n in range(PRODUCERS)]
        threads += [threading.Thread(target=consumer, args=(n,)) for n in range(3)]
        skip = set(filter(None, os.environ.get("SKIP", "").split(",")))
        threads += [threading.Thread(target=f) for f in (redriver, browser, churn, pauser) if f.__name__ not in skip]
        for t in threads:
            t.start()
        start, samples = time.time(), []
        print(f"driver {DRIVER}, {DURATION}s; start RSS MB {rss(p.pid)}", flush=True)
        while time.time() - start < DURATION:
            time.sleep(SAMPLE)
            stats = c.call("/v1/queue.stats", {"queue_name": "soak"}) or {}
            total = depth(stats)
            dlq = c.call("/v1/queue.stats", {"queue_name": "soak-dlq"}) or {}
            dead = depth(dlq)
            m = rss(p.pid)
            samples.append((time.time() - start, m))
            with lock:
                snap = dict(counts)
            print(f"t={time.time() - start:5.0f}s RSS MB {m:5d}  soak items {total:7d}  dlq {dead:6d}  {snap}",
                  flush=True)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        third = [s for s in samples if s[0] >= DURATION / 3]
        if third:
            a, b = third[0], samples[-1]
            print(f"RSS from t={a[0]:.0f}s to t={b[0]:.0f}s: {a[1]} -> {b[1]} MB "
                  f"({(b[1] - a[1]) / max(1, (b[0] - a[0]) / 60):+.2f} MB/min)", flush=True)
        print("errors:", json.dumps(errors, indent=1) if errors else "none", flush=True)
    finally:
        stop.set()
        p.terminate()
        p.wait(timeout=120)


main()
