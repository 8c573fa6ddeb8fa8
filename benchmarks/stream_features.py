"""Stream feature job: events/s through one job process, and freshness at a fixed rate.

    .venv/bin/python benchmarks/stream_features.py [--events 30000] [--rate 1000] [--seconds 15]
    .venv/bin/python benchmarks/stream_features.py --quick    # a smoke run, seconds

Starts a pulsar-lite broker (topics of one partition) and a redis-server on
127.0.0.1 (in a temporary folder, stopped at the end) and measures, on the same
broker:

1. the floor: a raw consume-and-ack loop (batch receive, no parsing) over a
   pre-filled topic of N events;
2. throughput: one job process (`python -m stream_jobs.features`) over another
   pre-filled topic of N events (10,000 users, 1,000 items with 64-d embeddings,
   online updates on), from its first write to its last, read from its /metrics;
   also its CPU time per event (the machine is shared, so wall time alone varies);
3. freshness: the same job live, events sent at a fixed rate with `ts` = send
   time; p50/p99 of (written - ts) from the job's freshness histogram
   (interpolated within buckets, as Prometheus' histogram_quantile does).

The job-to-floor ratio is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pulsar
import redis

from recsys_contracts.events import Event, EventType, now_ms
from recsys_contracts.feature_job_settings import env_name
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.pulsar_broker import broker_process, service_url
from recsys_operator.launchers.redis_server import redis_process, redis_url
from stream_jobs.item_embeddings import IDS_FILE, VECTORS_FILE

USERS = 10_000
ITEMS = 1_000
DIM = 64
BATCH = 500
TYPES = [EventType.VIEW, EventType.VIEW, EventType.CLICK, EventType.DWELL, EventType.PURCHASE]


def client(url: str) -> pulsar.Client:
    return pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))


def random_event(rng: random.Random, ts: int) -> Event:
    kind = rng.choice(TYPES)
    return Event(
        event_id=uuid.uuid4().hex,
        user_id=f"u{rng.randrange(USERS)}",
        item_id=f"i{rng.randrange(ITEMS)}",
        type=kind,
        ts=ts,
        dwell_ms=rng.randrange(100, 30_000) if kind is EventType.DWELL else None,
        model_version="v1",
    )


def prefill(url: str, topic: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    c = client(url)
    producer = c.create_producer(
        topic, batching_enabled=True, batching_max_publish_delay_ms=5, block_if_queue_full=True
    )
    start = now_ms() - count
    for n in range(count):
        event = random_event(rng, start + n)
        producer.send_async(event.to_json(), None, partition_key=event.user_id)
    producer.flush()
    c.close()


def raw_consume_rate(url: str, topic: str, count: int) -> float:
    """The floor: receive and ack `count` messages, nothing else."""
    c = client(url)
    consumer = c.subscribe(
        topic,
        "raw",
        consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
        receiver_queue_size=2 * BATCH,
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(BATCH, -1, 20),
    )
    received = 0
    started = time.perf_counter()
    deadline = time.monotonic() + 120
    while received < count and time.monotonic() < deadline:
        for message in consumer.batch_receive():
            consumer.acknowledge(message)
            received += 1
    elapsed = time.perf_counter() - started
    c.close()
    if received < count:
        raise RuntimeError(f"raw loop got {received} of {count} messages")
    return count / elapsed


def write_embeddings(root: Path) -> Path:
    directory = root / "embeddings"
    directory.mkdir()
    vectors = np.random.default_rng(0).normal(size=(ITEMS, DIM)).astype(np.float32)
    np.save(directory / VECTORS_FILE, vectors)
    (directory / IDS_FILE).write_text(json.dumps([f"i{n}" for n in range(ITEMS)]))
    return directory


def start_job(
    root: Path, url: str, store: str, topic: str, embeddings: Path, mode: str = "single"
) -> ManagedProcess:
    port = free_port()
    argv = [
        sys.executable, "-m", "stream_jobs.features",
        "--system-id", "bench.features", "--pulsar-service-url", url, "--interactions-topic", topic,
        "--subscription", "features", "--subscription-type", "Shared",
        "--redis-url", store, "--embeddings-path", str(embeddings), "--model-version", "v1",
        "--batch-size", str(BATCH), "--metrics-address", f"127.0.0.1:{port}", "--log-level", "WARNING",
        "--redis-mode", mode,
    ]  # fmt: skip
    # The throughput is measured on the subscription: a rebuild of the empty store from the
    # pre-filled topic would apply every event before it and leave only duplicates.
    env = {env_name("rebuild_when_empty"): "false"}
    return ManagedProcess("feature-job", argv, root / "job.log", port, env=env).start()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def applied(text: str) -> int:
    pattern = r'^recsys_feature_events_total\{[^}]*outcome="applied"[^}]*\} (\S+)$'
    return int(sum(float(v) for v in re.findall(pattern, text, re.M)))


def freshness_buckets(text: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of the freshness histogram."""
    pattern = r'^recsys_feature_freshness_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    return [(float(le), float(n)) for le, n in re.findall(pattern, text, re.M)]


def quantile(
    q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> float:
    """histogram_quantile over the observations between two scrapes."""
    buckets = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = buckets[-1][1]
    rank = q * total
    lower, previous = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - previous) / max(count - previous, 1e-9)
        lower, previous = upper, count
    return lower


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(url: str) -> float:
    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def job_throughput(job: ManagedProcess, count: int, store: str) -> tuple[float, float, float]:
    """(events/s from first to last write, job and Redis CPU ms per event) over a
    pre-filled topic."""
    assert job.pid is not None
    deadline = time.monotonic() + 240
    first_time, first_count, cpu_at_first, redis_at_first = None, 0, 0.0, 0.0
    done = 0
    while time.monotonic() < deadline:
        done = applied(scrape(job.port))
        now = time.perf_counter()
        if first_time is None and done > 0:
            first_time, first_count, cpu_at_first = now, done, cpu_seconds(job.pid)
            redis_at_first = redis_cpu_seconds(store)
        if done >= count:
            break
        time.sleep(0.1)
    if first_time is None or done < count:
        raise RuntimeError(f"the job applied {done} of {count} events in time")
    elapsed = time.perf_counter() - first_time
    events = done - first_count
    job_cpu = 1000 * (cpu_seconds(job.pid) - cpu_at_first) / events
    redis_cpu = 1000 * (redis_cpu_seconds(store) - redis_at_first) / events
    return events / elapsed, job_cpu, redis_cpu


def freshness(
    url: str, topic: str, job: ManagedProcess, rate: int, seconds: float
) -> tuple[float, float, float]:
    """Send at `rate` events/s for `seconds`; (p50, p99, achieved rate) of freshness."""
    before_text = scrape(job.port)
    before, already = freshness_buckets(before_text), applied(before_text)
    rng = random.Random(99)
    c = client(url)
    producer = c.create_producer(topic, batching_enabled=True, batching_max_publish_delay_ms=1)
    tick = 0.01  # send every 10 ms
    sent = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            event = random_event(rng, now_ms())
            producer.send_async(event.to_json(), None, partition_key=event.user_id)
            sent += 1
        producer.flush()
        time.sleep(max(0.0, started + (int(elapsed / tick) + 1) * tick - time.perf_counter()))
    achieved = sent / (time.perf_counter() - started)
    producer.flush()
    c.close()
    deadline = time.monotonic() + 60
    while applied(text := scrape(job.port)) < already + sent and time.monotonic() < deadline:
        time.sleep(0.1)
    after = freshness_buckets(text)
    return quantile(0.5, before, after), quantile(0.99, before, after), achieved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000, help="events per throughput run")
    parser.add_argument("--rate", type=int, default=1_000, help="events/s of the freshness run")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the freshness run")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2,000 events, 200 events/s for 3 s"
    )
    parser.add_argument(
        "--cluster", action="store_true", help="also the job against a 3-primary Redis Cluster"
    )
    args = parser.parse_args()
    if args.quick:
        args.events, args.rate, args.seconds = 2_000, 200, 3.0

    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        root = Path(tmp)
        # One partition: a single job process consumes it all either way, and pulsar-lite
        # sometimes stops dispatching one partition of a partitioned topic holding a
        # large batched backlog (see `resubscribe_idle` in docs/stream-features.md).
        broker = broker_process(root, default_partitions=1).start()
        store = redis_process(root).start()
        job = None
        try:
            url = service_url(broker)
            raw_topic, job_topic, live_topic = (f"persistent://public/default/{name}-{uuid.uuid4().hex[:8]}" for name in ("raw", "job", "live"))  # fmt: skip
            print(f"pre-filling two topics with {args.events} events each ...", flush=True)
            prefill(url, raw_topic, args.events, seed=1)
            prefill(url, job_topic, args.events, seed=2)

            floor = raw_consume_rate(url, raw_topic, args.events)
            print(f"raw consume-and-ack loop: {floor:,.0f} events/s", flush=True)

            job = start_job(root, url, redis_url(store), job_topic, write_embeddings(root))
            rate, cpu_ms, redis_ms = job_throughput(job, args.events, redis_url(store))
            print(
                f"feature job, one process: {rate:,.0f} events/s "
                f"(CPU per event: job {cpu_ms:.3f} ms, redis {redis_ms:.3f} ms)"
            )
            print(f"ratio job / raw: {rate / floor:.3f}", flush=True)
            job.stop()
            if args.cluster:
                cluster_rows(root, url, args.events, rate)

            job = start_job(root, url, redis_url(store), live_topic, root / "embeddings")
            p50, p99, achieved = freshness(url, live_topic, job, args.rate, args.seconds)
            print(
                f"freshness at {achieved:,.0f} events/s for {args.seconds:.0f}s: "
                f"p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms"
            )
        finally:
            if job is not None:
                job.stop()
            store.stop()
            broker.stop()


def cluster_rows(root: Path, url: str, count: int, single_rate: float) -> None:
    """The same events against a 3-primary Redis Cluster on loopback: the batch splits
    per hash slot (`feature_store`), so Redis does one script call per slot group."""
    from recsys_operator.launchers.redis_server import redis_cluster

    cluster = redis_cluster(root / "cluster").start()
    job = None
    try:
        topic = f"persistent://public/default/cluster-{uuid.uuid4().hex[:8]}"
        prefill(url, topic, count, seed=2)  # the single-node run's events
        job = start_job(root, url, cluster.url, topic, root / "embeddings", mode="cluster")

        def nodes_cpu() -> float:
            return sum(redis_cpu_seconds(redis_url(node)) for node in cluster.nodes)

        assert job.pid is not None
        deadline, start, done = time.monotonic() + 240, None, 0
        while time.monotonic() < deadline and done < count:
            done = applied(scrape(job.port))
            if start is None and done > 0:
                start = (time.perf_counter(), done, cpu_seconds(job.pid), nodes_cpu())
            time.sleep(0.1)
        if start is None or done < count:
            raise RuntimeError(f"the job applied {done} of {count} events in time")
        events = done - start[1]
        rate = events / (time.perf_counter() - start[0])
        job_ms = 1000 * (cpu_seconds(job.pid) - start[2]) / events
        redis_ms = 1000 * (nodes_cpu() - start[3]) / events
        print(
            f"feature job, one process, Redis Cluster (3 primaries): {rate:,.0f} events/s "
            f"(CPU per event: job {job_ms:.3f} ms, redis, all nodes, {redis_ms:.3f} ms)"
        )
        print(f"ratio cluster / single node: {rate / single_rate:.3f}", flush=True)
    finally:
        if job is not None:
            job.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
