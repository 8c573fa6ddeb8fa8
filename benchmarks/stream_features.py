"""Stream feature job: events/s per job process against a raw loop, Redis CPU per event,
freshness at a paced rate, and two processes against one.

    .venv/bin/python benchmarks/stream_features.py [--events 30000] [--rate 5000] [--seconds 10]
    .venv/bin/python benchmarks/stream_features.py --quick    # a smoke run, seconds

Starts a pulsar-lite broker (topics of one partition) and a redis-server on
127.0.0.1 (in a temporary folder, stopped at the end) and measures, on the same
broker:

1. the floor: a raw consume-and-ack loop (batch receive, no parsing) over a
   pre-filled topic of N events;
2. throughput: one job process (`python -m stream_jobs.features`) over another
   pre-filled topic of N events (10,000 users, 1,000 items with 64-d embeddings,
   online updates on), from its first write to its last, read from its /metrics;
   also its CPU time per event and redis-server's (`used_cpu_user + used_cpu_sys`
   of INFO, the delta over the run divided by the events): the machine is shared,
   so wall time alone varies;
3. freshness: the same job live, events sent at a paced rate (default 5,000/s) with
   `ts` = send time; p50/p99 of (written - ts) from the job's freshness histogram
   (interpolated within buckets, as Prometheus' histogram_quantile does);
4. scale-out: on a second broker whose topics have two partitions, one job process
   and then two (Shared subscription) over N events each, subscribed before the
   events are sent; the ratio of their events/s;
5. the batch path in this process (`FeatureJob.process_batch` over ready-made
   messages, no broker): job and Redis CPU per event, the steadiest figure on a
   shared machine.

Events are Avro (`--wire avro`, what producers send by default) or JSON (`--wire json`).
The job-to-floor and two-to-one ratios are the figures to compare across machines;
the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pulsar
import redis

from recsys_contracts.event_wire import WireFormat, encode_event
from recsys_contracts.events import Event, EventType, now_ms
from recsys_contracts.feature_job_settings import FeatureJobSettings, env_name
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.pulsar_broker import broker_process, service_url
from recsys_operator.launchers.redis_server import redis_process, redis_url
from stream_jobs.features import GC_ALLOCATIONS, FeatureJob
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


WIRE_FORMAT = WireFormat.AVRO
"""How the events are encoded (`--wire`): Avro, as producers send them by default."""


def encoded(event: Event) -> bytes:
    return encode_event(event, WIRE_FORMAT)


def prefill(url: str, topic: str, count: int, seed: int) -> None:
    """Send `count` random events (made before the first send, so the sending is fast)."""
    rng = random.Random(seed)
    start = now_ms() - count
    events = [random_event(rng, start + n) for n in range(count)]
    payloads = [(encoded(event), event.user_id) for event in events]
    c = client(url)
    producer = c.create_producer(
        topic, batching_enabled=True, batching_max_publish_delay_ms=5, block_if_queue_full=True
    )
    for payload, user in payloads:
        producer.send_async(payload, None, partition_key=user)
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
    root: Path,
    url: str,
    store: str,
    topic: str,
    embeddings: Path,
    system: str = "bench.features",
    name: str = "job",
    extra_env: dict[str, str] | None = None,
    mode: str = "single",
) -> ManagedProcess:
    port = free_port()
    argv = [
        sys.executable, "-m", "stream_jobs.features",
        "--system-id", system, "--pulsar-service-url", url, "--interactions-topic", topic,
        "--subscription", "features", "--subscription-type", "Shared",
        "--redis-url", store, "--embeddings-path", str(embeddings), "--model-version", "v1",
        "--batch-size", str(BATCH), "--metrics-address", f"127.0.0.1:{port}", "--log-level", "WARNING",
        "--redis-mode", mode,
    ]  # fmt: skip
    # The throughput is measured on the subscription: a rebuild of the empty store from the
    # pre-filled topic would apply every event before it and leave only duplicates.
    env = {env_name("rebuild_when_empty"): "false", **(extra_env or {})}
    return ManagedProcess("feature-job", argv, root / f"{name}.log", port, env=env).start()


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


def job_throughput(
    jobs: list[ManagedProcess], count: int, store: str
) -> tuple[float, float, float]:
    """(events/s from the first write to the last, job and Redis CPU ms per event) of
    `jobs` consuming one pre-filled topic of `count` events together."""
    deadline = time.monotonic() + 240

    def job_cpu() -> float:
        return sum(cpu_seconds(job.pid) for job in jobs if job.pid is not None)

    # From the first write seen; when the jobs were done with most events before the
    # first scrape saw one (short runs), from the first scrape instead.
    start = (time.perf_counter(), 0, job_cpu(), redis_cpu_seconds(store))
    first: tuple[float, int, float, float] | None = None
    done = 0
    while time.monotonic() < deadline:
        done = sum(applied(scrape(job.port)) for job in jobs)
        if first is None and done > 0:
            first = (time.perf_counter(), done, job_cpu(), redis_cpu_seconds(store))
        if done >= count:
            break
        time.sleep(0.1)  # each scrape costs the job CPU: not too often
    if first is None or done < count:
        raise RuntimeError(f"the job applied {done} of {count} events in time")
    if done - first[1] < count // 2:
        first = start
    first_time, first_count, cpu_at_first, redis_at_first = first
    elapsed = time.perf_counter() - first_time
    events = done - first_count
    cpu_ms = 1000 * (job_cpu() - cpu_at_first) / events
    redis_ms = 1000 * (redis_cpu_seconds(store) - redis_at_first) / events
    return events / elapsed, cpu_ms, redis_ms


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
            producer.send_async(encoded(event), None, partition_key=event.user_id)
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


def wait_subscribed(job: ManagedProcess) -> None:
    """Until the job has subscribed (it loads the embeddings right after)."""
    deadline = time.monotonic() + 60
    while 'recsys_feature_item_embeddings{model_version="v1"}' not in scrape(job.port):
        if time.monotonic() > deadline:
            raise RuntimeError("the job did not subscribe in time")
        time.sleep(0.05)


def scale_out(
    root: Path, store: str, embeddings: Path, count: int
) -> tuple[float, float, float, float]:
    """(events/s of one job process, of two, their CPU ms per event) on topics of two
    partitions, Shared subscription (pulsar-lite has no KeyShared): each process gets
    messages of both partitions; the state's idempotence keeps a redelivered event from
    counting twice, its event-time rules apply a user's events in `ts` order whichever
    process sees them first (within the allowed lateness), and the store's read check
    makes a process that loses a race on a user recompute (stream_jobs/feature_store.py).
    The processes subscribe before the events are sent, so both start together."""
    broker = broker_process(root / "two-partitions", default_partitions=2).start()
    jobs: list[ManagedProcess] = []
    # pulsar-lite sometimes stops dispatching one partition of a partitioned topic that
    # holds a batched backlog until the consumer resubscribes (docs/stream-features.md).
    env = {env_name("resubscribe_idle"): "2s"}
    try:
        url = service_url(broker)
        rates = []
        for processes in (1, 2):
            topic = f"persistent://public/default/scale{processes}-{uuid.uuid4().hex[:8]}"
            system = f"bench.scale{processes}"
            jobs = [
                start_job(root, url, store, topic, embeddings, system, f"scale{processes}-{n}", env)
                for n in range(processes)
            ]
            for job in jobs:
                wait_subscribed(job)
            prefill(url, topic, count, seed=2 + processes)
            rates.append(job_throughput(jobs, count, store))
            for job in jobs:
                job.stop()
            jobs = []
        (rate_one, cpu_one, _), (rate_two, cpu_two, _) = rates
        return rate_one, rate_two, cpu_one, cpu_two
    finally:
        for job in jobs:
            job.stop()
        broker.stop()


class _Message:
    """What the job reads of a pulsar message."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def data(self) -> bytes:
        return self._data


class _NoAcks:
    def acknowledge(self, message: object) -> None:
        pass


def batch_path(store: str, embeddings: Path, count: int) -> tuple[float, float]:
    """(job, Redis) CPU µs per event of the job's batch path in this process: parse, apply
    and write to Redis, metrics (`FeatureJob.process_batch`) over ready-made messages,
    without the broker, so the figure does not depend on how the broker is scheduled."""
    settings = FeatureJobSettings(
        system_id="bench.batch",
        pulsar_service_url="pulsar://127.0.0.1:1",  # not used: no subscription here
        interactions_topic="unused",
        subscription="features",
        subscription_type="Shared",
        redis_url=store,
        embeddings_path=embeddings,
        model_version="v1",
        batch_size=BATCH,
        metrics_address=None,
    )
    job = FeatureJob(settings)
    job._refresh_embeddings()
    gc.set_threshold(GC_ALLOCATIONS, 20, 20)  # as in a job process (`stream_jobs.features.main`)
    rng = random.Random(5)
    start = now_ms() - count
    messages = [_Message(encoded(random_event(rng, start + n))) for n in range(count)]
    batches = [messages[i : i + BATCH] for i in range(0, count, BATCH)]
    warm, timed = batches[: max(1, len(batches) // 5)], batches[max(1, len(batches) // 5) :]
    stop, consumer = threading.Event(), _NoAcks()
    for batch in warm:
        job.process_batch(consumer, None, batch, stop)  # type: ignore[arg-type]
    events = sum(len(b) for b in timed)
    redis_before, cpu_before = redis_cpu_seconds(store), time.process_time()
    for batch in timed:
        job.process_batch(consumer, None, batch, stop)  # type: ignore[arg-type]
    job_us = 1e6 * (time.process_time() - cpu_before) / events
    return job_us, 1e6 * (redis_cpu_seconds(store) - redis_before) / events


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000, help="events per throughput run")
    parser.add_argument("--rate", type=int, default=5_000, help="events/s of the freshness run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the freshness run")
    parser.add_argument(
        "--scale-events", type=int, default=None, help="events of each scale-out run (--events)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2,000 events, 500 events/s for 2 s, scale-out over 2,000 events",
    )
    parser.add_argument(
        "--cluster", action="store_true", help="also the job against a 3-primary Redis Cluster"
    )
    parser.add_argument(
        "--wire",
        choices=[f.value for f in WireFormat],
        default=WireFormat.AVRO.value,
        help="the events' wire format (default avro, what producers send)",
    )
    args = parser.parse_args()
    global WIRE_FORMAT
    WIRE_FORMAT = WireFormat(args.wire)
    if args.quick:
        args.events, args.rate, args.seconds = 2_000, 500, 2.0
    scale_events = args.scale_events or args.events
    print(f"start: {load()}; events in {WIRE_FORMAT.value}", flush=True)

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

            embeddings = write_embeddings(root)
            job = start_job(root, url, redis_url(store), job_topic, embeddings)
            rate, cpu_ms, redis_ms = job_throughput([job], args.events, redis_url(store))
            print(
                f"feature job, one process: {rate:,.0f} events/s "
                f"(CPU per event: job {cpu_ms:.3f} ms, redis {redis_ms:.3f} ms)"
            )
            print(f"ratio job / raw: {rate / floor:.3f}")
            print(f"redis CPU per event: {1000 * redis_ms:.1f} us (goal <= 10)", flush=True)
            job.stop()
            if args.cluster:
                cluster_rows(root, url, args.events, rate)

            job = start_job(root, url, redis_url(store), live_topic, root / "embeddings")
            p50, p99, achieved = freshness(url, live_topic, job, args.rate, args.seconds)
            print(
                f"freshness at {achieved:,.0f} events/s for {args.seconds:.0f}s: "
                f"p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms"
            )
            job.stop()
            job = None
            one, two, cpu_one, cpu_two = scale_out(root, redis_url(store), embeddings, scale_events)
            print(
                f"scale-out on two partitions: one process {one:,.0f} events/s "
                f"({cpu_one:.3f} ms CPU/event), two processes {two:,.0f} events/s "
                f"({cpu_two:.3f} ms CPU/event), ratio two / one: {two / one:.2f}"
            )
            job_us, redis_us = batch_path(redis_url(store), embeddings, args.events)
            print(
                f"batch path in-process (no broker): job {job_us:.1f} us CPU/event, "
                f"redis {redis_us:.1f} us CPU/event"
            )
            print(f"end: {load()}", flush=True)
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
