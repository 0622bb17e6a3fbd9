#!/usr/bin/env python3
"""Peer comparison driver for `scripts/peers-bench.sh`.

Runs one pipeline workload (producers and consumers at the same time, optionally paced with --rate) against a
queue system on loopback and prints one JSON line: items/s produced (until the last produce) and consumed
(until the last receive; consumers get up to 5 s after the producers stop to drain the backlog, and stop as
soon as everything produced was consumed), produce-batch p99 and end-to-end (produce-to-receive) p50/p99 in
milliseconds.

Systems and the primitive used for "lease + complete":
  beanstalkd  put / reserve + delete            (one job per call: the protocol has no batches)
  redis       Streams: XADD (pipelined batch) / XREADGROUP COUNT batch + XACK (pending-entries list = lease)
  nats        JetStream work-queue stream, file storage: publish (batch of async acks) / pull fetch(batch) + ack
  postgres    plain table queue: INSERT of a batch (one statement, unnest of a bytea[]) /
              UPDATE ... SET leased_until WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT batch) RETURNING +
              DELETE WHERE id = ANY(ids); every statement is its own transaction (autocommit), and consumers poll
              (2 ms sleep after an empty lease: a plain table queue has no long poll)
  lessor      HTTP JSON: /v1/queue.produce / /v1/queue.lease + /v1/queue.complete (same driver, for a
              like-for-like comparison with the peers; `lessor bench` is the native Rust driver)

Every worker is its own process (the GIL would otherwise serialise them). Payloads carry the send time
(time.time_ns(), 8 bytes little-endian) in their first 8 bytes. Python is usually the bottleneck here: read
the numbers as "what a Python client gets", and compare systems with each other, not with `lessor bench`.
"""

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import struct
import sys
import time
import uuid


def stamp_payload(size):
    return struct.pack("<Q", time.time_ns()) + b"x" * (size - 8)


def sent_ns(payload):
    return struct.unpack("<Q", payload[:8])[0]


class Pacer:
    """Fixed schedule for one producer: `rate` items/s in total, shared by `producers`; no-op without --rate."""

    def __init__(self, a):
        self.interval = a.batch * a.producers / a.rate if a.rate else 0.0
        self.next = time.time()

    def delay(self):
        if not self.interval:
            return 0.0
        self.next += self.interval
        return max(0.0, self.next - self.interval - time.time())


def count(counter, k):
    with counter.get_lock():
        counter.value += k


def consuming(a, stop_at):
    """Consumers stop at stop_at, or earlier once the producers are done and everything produced was consumed."""
    if time.time() >= stop_at:
        return False
    return not (a.producers_done.value == a.producers and a.consumed_total.value >= a.produced_total.value)


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --------------------------------------------------------------------------------------------------------
# beanstalkd
# --------------------------------------------------------------------------------------------------------
def beanstalk_producer(a, deadline, out):
    import greenstalk

    c = greenstalk.Client(("127.0.0.1", a.port), use=a.queue, encoding=None)
    n, acks = 0, []
    pacer = Pacer(a)
    while time.time() < deadline:
        time.sleep(pacer.delay())
        t0 = time.perf_counter()
        for _ in range(a.batch):
            c.put(stamp_payload(a.payload))
        acks.append(time.perf_counter() - t0)
        n += a.batch
        count(a.produced_total, a.batch)
    count(a.producers_done, 1)
    out.put(("p", n, acks, [], time.time()))


def beanstalk_consumer(a, stop_at, out):
    import greenstalk

    c = greenstalk.Client(("127.0.0.1", a.port), watch=a.queue, encoding=None)
    n, e2e, last = 0, [], 0.0
    while consuming(a, stop_at):
        try:
            job = c.reserve(timeout=1)
        except greenstalk.TimedOutError:
            continue
        e2e.append((time.time_ns() - sent_ns(job.body)) / 1e9)
        c.delete(job)
        n += 1
        count(a.consumed_total, 1)
        last = time.time()
    out.put(("c", n, [], e2e, last))


# --------------------------------------------------------------------------------------------------------
# redis streams
# --------------------------------------------------------------------------------------------------------
def redis_setup(a):
    import redis

    r = redis.Redis(port=a.port)
    r.delete(a.queue)
    r.xgroup_create(a.queue, "workers", id="0", mkstream=True)


def redis_producer(a, deadline, out):
    import redis

    r = redis.Redis(port=a.port)
    n, acks = 0, []
    pacer = Pacer(a)
    while time.time() < deadline:
        time.sleep(pacer.delay())
        t0 = time.perf_counter()
        p = r.pipeline(transaction=False)
        for _ in range(a.batch):
            p.xadd(a.queue, {"b": stamp_payload(a.payload)})
        p.execute()
        acks.append(time.perf_counter() - t0)
        n += a.batch
        count(a.produced_total, a.batch)
    count(a.producers_done, 1)
    out.put(("p", n, acks, [], time.time()))


def redis_consumer(a, stop_at, out, ident):
    import redis

    r = redis.Redis(port=a.port)
    n, e2e, last = 0, [], 0.0
    while consuming(a, stop_at):
        res = r.xreadgroup("workers", f"c{ident}", {a.queue: ">"}, count=a.batch, block=1000)
        if not res:
            continue
        now = time.time_ns()
        ids = []
        for _, entries in res:
            for mid, fields in entries:
                e2e.append((now - sent_ns(fields[b"b"])) / 1e9)
                ids.append(mid)
        r.xack(a.queue, "workers", *ids)
        n += len(ids)
        count(a.consumed_total, len(ids))
        last = time.time()
    out.put(("c", n, [], e2e, last))


# --------------------------------------------------------------------------------------------------------
# NATS JetStream
# --------------------------------------------------------------------------------------------------------
def nats_setup(a):
    import asyncio

    import nats
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{a.port}")
        js = nc.jetstream()
        try:
            await js.delete_stream(a.queue)
        except Exception:
            pass
        await js.add_stream(
            StreamConfig(
                name=a.queue, subjects=[a.queue], retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE
            )
        )
        await nc.close()

    asyncio.run(go())


def nats_producer(a, deadline, out):
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{a.port}")
        js = nc.jetstream()
        n, acks = 0, []
        pacer = Pacer(a)
        while time.time() < deadline:
            await asyncio.sleep(pacer.delay())
            t0 = time.perf_counter()
            await asyncio.gather(*(js.publish(a.queue, stamp_payload(a.payload)) for _ in range(a.batch)))
            acks.append(time.perf_counter() - t0)
            n += a.batch
            count(a.produced_total, a.batch)
        await nc.close()
        return n, acks

    n, acks = asyncio.run(go())
    count(a.producers_done, 1)
    out.put(("p", n, acks, [], time.time()))


def nats_consumer(a, stop_at, out, ident):
    import asyncio

    import nats
    from nats.errors import TimeoutError as NatsTimeout

    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{a.port}")
        js = nc.jetstream()
        sub = await js.pull_subscribe(a.queue, durable="workers")
        n, e2e, last = 0, [], 0.0
        while consuming(a, stop_at):
            try:
                msgs = await sub.fetch(a.batch, timeout=1)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            now = time.time_ns()
            for m in msgs:
                e2e.append((now - sent_ns(m.data)) / 1e9)
            await asyncio.gather(*(m.ack() for m in msgs))
            n += len(msgs)
            count(a.consumed_total, len(msgs))
            last = time.time()
        await nc.close()
        return n, e2e, last

    n, e2e, last = asyncio.run(go())
    out.put(("c", n, [], e2e, last))


# --------------------------------------------------------------------------------------------------------
# PostgreSQL: a plain FOR UPDATE SKIP LOCKED table queue
# --------------------------------------------------------------------------------------------------------
def pg_connect(a):
    import psycopg

    return psycopg.connect(a.dsn, autocommit=True)


def pg_setup(a):
    with pg_connect(a) as c:
        c.execute(f"DROP TABLE IF EXISTS {a.queue}")
        c.execute(
            f"CREATE TABLE {a.queue} (id bigserial PRIMARY KEY, payload bytea NOT NULL, leased_until timestamptz)"
        )


def pg_producer(a, deadline, out):
    c = pg_connect(a)
    insert = f"INSERT INTO {a.queue} (payload) SELECT unnest(%s::bytea[])"
    n, acks = 0, []
    pacer = Pacer(a)
    while time.time() < deadline:
        time.sleep(pacer.delay())
        t0 = time.perf_counter()
        c.execute(insert, ([stamp_payload(a.payload) for _ in range(a.batch)],))
        acks.append(time.perf_counter() - t0)
        n += a.batch
        count(a.produced_total, a.batch)
    c.close()
    count(a.producers_done, 1)
    out.put(("p", n, acks, [], time.time()))


def pg_consumer(a, stop_at, out, ident):
    c = pg_connect(a)
    lease = (
        f"UPDATE {a.queue} SET leased_until = now() + interval '30s' WHERE id IN ("
        f"SELECT id FROM {a.queue} WHERE leased_until IS NULL OR leased_until < now() "
        "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, payload"
    )
    complete = f"DELETE FROM {a.queue} WHERE id = ANY(%s)"
    n, e2e, last = 0, [], 0.0
    while consuming(a, stop_at):
        rows = c.execute(lease, (a.batch,)).fetchall()
        if not rows:
            time.sleep(0.002)
            continue
        now = time.time_ns()
        for _, payload in rows:
            e2e.append((now - sent_ns(payload)) / 1e9)
        c.execute(complete, ([r[0] for r in rows],))
        n += len(rows)
        count(a.consumed_total, len(rows))
        last = time.time()
    c.close()
    out.put(("c", n, [], e2e, last))


def pg_teardown(a):
    with pg_connect(a) as c:
        c.execute(f"DROP TABLE IF EXISTS {a.queue}")


# --------------------------------------------------------------------------------------------------------
# Lessor over HTTP JSON (same driver as the peers)
# --------------------------------------------------------------------------------------------------------
def lessor_call(conn, path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, (json.loads(data) if data else {})


def lessor_setup(a):
    conn = http.client.HTTPConnection("127.0.0.1", a.port)
    status, body = lessor_call(
        conn, "/v1/queues.create", {"queue_name": a.queue, "lease_timeout": "1m", "expire_timeout": "24h", "requested_partitions": 1}
    )
    if status != 200:
        sys.exit(f"lessor: cannot create the queue: {status} {body}")


def lessor_producer(a, deadline, out):
    conn = http.client.HTTPConnection("127.0.0.1", a.port)
    n, acks = 0, []
    pacer = Pacer(a)
    while time.time() < deadline:
        time.sleep(pacer.delay())
        items = [{"bytes": base64.b64encode(stamp_payload(a.payload)).decode()} for _ in range(a.batch)]
        t0 = time.perf_counter()
        status, body = lessor_call(
            conn, "/v1/queue.produce", {"queue_name": a.queue, "request_timeout": "30s", "items": items}
        )
        if status != 200:
            sys.exit(f"lessor: produce failed: {status} {body}")
        acks.append(time.perf_counter() - t0)
        n += a.batch
        count(a.produced_total, a.batch)
    count(a.producers_done, 1)
    out.put(("p", n, acks, [], time.time()))


def lessor_consumer(a, stop_at, out, ident):
    conn = http.client.HTTPConnection("127.0.0.1", a.port)
    n, e2e = 0, []
    client_id = f"peers-{ident}-{uuid.uuid4().hex[:8]}"
    last = 0.0
    while consuming(a, stop_at):
        status, body = lessor_call(
            conn,
            "/v1/queue.lease",
            {"queue_name": a.queue, "batch_size": a.batch, "client_id": client_id, "request_timeout": "1s"},
        )
        if status == 454:
            continue
        if status != 200:
            sys.exit(f"lessor: lease failed: {status} {body}")
        now = time.time_ns()
        items = body.get("items", [])
        for it in items:
            e2e.append((now - sent_ns(base64.b64decode(it["bytes"]))) / 1e9)
        status, body = lessor_call(
            conn,
            "/v1/queue.complete",
            {
                "queue_name": a.queue,
                "partition": body.get("partition", 0),
                "request_timeout": "30s",
                "ids": [it["id"] for it in items],
            },
        )
        if status != 200:
            sys.exit(f"lessor: complete failed: {status} {body}")
        n += len(items)
        count(a.consumed_total, len(items))
        last = time.time()
    out.put(("c", n, [], e2e, last))


def lessor_teardown(a):
    conn = http.client.HTTPConnection("127.0.0.1", a.port)
    lessor_call(conn, "/v1/queues.delete", {"queue_name": a.queue, "force": True})


SYSTEMS = {
    "beanstalkd": (None, beanstalk_producer, lambda a, s, o, i: beanstalk_consumer(a, s, o), None),
    "redis": (redis_setup, redis_producer, redis_consumer, None),
    "nats": (nats_setup, nats_producer, nats_consumer, None),
    "lessor": (lessor_setup, lessor_producer, lessor_consumer, lessor_teardown),
    "postgres": (pg_setup, pg_producer, pg_consumer, pg_teardown),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=sorted(SYSTEMS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dbname", default="postgres", help="postgres: database to use")
    p.add_argument("--user", default="postgres", help="postgres: role to connect as")
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--consumers", type=int, default=4)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=0.0, help="total produce rate in items/s (0: unpaced)")
    p.add_argument("--json-out")
    a = p.parse_args()
    a.payload = max(a.payload, 8)
    a.queue = f"peers{os.getpid()}"
    a.dsn = f"host=127.0.0.1 port={a.port} dbname={a.dbname} user={a.user}"
    setup, producer, consumer, teardown = SYSTEMS[a.system]
    if setup:
        setup(a)

    out = mp.Queue()
    start = time.time()
    deadline = start + a.duration
    # Consumers keep going up to 5 s after the producers stop, to drain what is in flight (less once it is all in).
    stop_at = deadline + 5.0
    a.produced_total, a.consumed_total, a.producers_done = mp.Value("q", 0), mp.Value("q", 0), mp.Value("i", 0)
    procs = [mp.Process(target=producer, args=(a, deadline, out)) for _ in range(a.producers)]
    procs += [mp.Process(target=consumer, args=(a, stop_at, out, i)) for i in range(a.consumers)]
    for pr in procs:
        pr.start()
    produced = consumed = 0
    acks, e2e = [], []
    p_end = c_end = start
    import queue as queue_mod

    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1))
        except queue_mod.Empty:
            if not any(pr.is_alive() for pr in procs) and out.empty():
                sys.exit(f"{a.system}: a worker died without reporting (see its traceback above)")
    for kind, n, ak, ee, end in results:
        if kind == "p":
            produced += n
            p_end = max(p_end, end)
        else:
            consumed += n
            c_end = max(c_end, end)
        acks += ak
        e2e += ee
    for pr in procs:
        pr.join()
    if teardown:
        teardown(a)

    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    res = {
        "system": a.system,
        "produced": produced,
        "consumed": consumed,
        "produce_items_per_s": round(produced / max(p_end - start, 1e-9)),
        "consume_items_per_s": round(consumed / max(c_end - start, 1e-9)),
        "rate": a.rate or None,
        "produce_batch_p99_ms": ms(pct(acks, 0.99)),
        "e2e_p50_ms": ms(pct(e2e, 0.50)),
        "e2e_p99_ms": ms(pct(e2e, 0.99)),
    }
    print(json.dumps(res))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
