"""Event-log sink: events/s from a topic into Parquet, against a bare consume-and-ack floor.

    .venv/bin/python benchmarks/event_log.py [--events 100000] [--s3]
    .venv/bin/python benchmarks/event_log.py --quick    # a smoke run, seconds

Starts a pulsar-lite broker (topics of one partition) on 127.0.0.1 in a temporary
folder and measures, on the same broker, over pre-filled topics of N events each
(spread over 6 hours of event time, so several partitions):

1. the floor: a raw consume-and-ack loop (batch receive, no parsing, nothing written);
2. the sink into a folder: `EventLogSink` in this process, from its start to the last
   row durable (fsynced) in Parquet, read from its rows counter;
3. with --s3, the same into an S3 bucket served by a moto server on loopback.

Prints each as events/s and the sink-to-floor ratio, and the Parquet bytes per event.
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pulsar

from recsys_contracts import event_log_layout as layout
from recsys_contracts import metric_names as names
from recsys_contracts.event_log_settings import EventLogSettings
from recsys_contracts.events import Event, EventType
from recsys_operator.launchers.process import free_port
from recsys_operator.launchers.pulsar_broker import broker_process, service_url
from stream_jobs.event_log_sink import EventLogSink

BASE_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SPAN_MS = 6 * 3_600_000
TYPES = [EventType.VIEW, EventType.VIEW, EventType.CLICK, EventType.DWELL, EventType.PURCHASE]


def client(url: str) -> pulsar.Client:
    return pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))


def prefill(url: str, topic: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    c = client(url)
    producer = c.create_producer(
        topic, batching_enabled=True, batching_max_publish_delay_ms=5, block_if_queue_full=True
    )
    for n in range(count):
        kind = rng.choice(TYPES)
        event = Event(
            event_id=uuid.uuid4().hex,
            user_id=f"u{rng.randrange(10_000)}",
            item_id=f"i{rng.randrange(1_000)}",
            type=kind,
            ts=BASE_TS + n * SPAN_MS // count,
            dwell_ms=rng.randrange(100, 30_000) if kind is EventType.DWELL else None,
            request_id=f"r{rng.randrange(10**9)}",
            model_version="v1",
        )
        producer.send_async(event.to_json(), None, partition_key=event.user_id)
    producer.flush()
    c.close()


def floor(url: str, topic: str, count: int) -> float:
    """events/s of a bare batch-receive-and-ack loop."""
    c = client(url)
    consumer = c.subscribe(
        topic,
        "floor",
        initial_position=pulsar.InitialPosition.Earliest,
        receiver_queue_size=2000,
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(1000, -1, 50),
    )
    received, started = 0, time.monotonic()
    deadline = started + 600
    while received < count and time.monotonic() < deadline:
        messages = consumer.batch_receive()
        for message in messages:
            consumer.acknowledge(message)
        received += len(messages)
    elapsed = time.monotonic() - started
    c.close()
    return received / elapsed


def sink_rate(
    url: str, topic: str, count: int, uri: str, options: dict[str, str] | None
) -> tuple[float, float]:
    """(events/s, Parquet bytes per event) of the sink from start to its last row written."""
    settings = EventLogSettings(
        log_uri=uri,
        pulsar_service_url=url,
        interactions_topic=topic,
        flush_rows=5000,
        flush_interval="1s",
        compact_interval="1h",
        max_future="3650d",
    )
    sink = EventLogSink(settings, storage_options=options)
    labels = {"system": settings.system_id, "table": layout.INTERACTIONS_TABLE}

    def sample(name: str, **extra: str) -> float:
        return sink.metrics.registry.get_sample_value(name, {**labels, **extra}) or 0.0

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop, ready), daemon=True)
    started = time.monotonic()
    thread.start()
    deadline = started + 600
    while sample(names.EVENT_LOG_ROWS) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    stop.set()
    thread.join(30)
    written = sample(names.EVENT_LOG_ROWS)
    size = sample(names.EVENT_LOG_BYTES, kind="batch")
    return written / elapsed, size / max(written, 1)


def moto_server() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    options = {"key": "bench", "secret": "bench", "endpoint_url": f"http://127.0.0.1:{port}"}
    return process, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--s3", action="store_true", help="also into a moto S3 server")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3,000 events, S3 too")
    args = parser.parse_args()
    count = 3_000 if args.quick else args.events
    with tempfile.TemporaryDirectory(prefix="bench-event-log-") as tmp:
        broker = broker_process(Path(tmp), default_partitions=1).start()
        try:
            url = service_url(broker)
            topics = [
                f"persistent://public/default/bench-{name}" for name in ("floor", "dir", "s3")
            ]
            for seed, topic in enumerate(topics[: 3 if args.s3 or args.quick else 2]):
                prefill(url, topic, count, seed)
            base = floor(url, topics[0], count)
            print(f"floor: {base:,.0f} events/s (batch receive + ack, {count:,} events)")
            rate, size = sink_rate(url, topics[1], count, str(Path(tmp) / "log"), None)
            print(
                f"sink_folder: {rate:,.0f} events/s, ratio to floor {rate / base:.2f}, "
                f"{size:.1f} Parquet bytes/event"
            )
            if args.s3 or args.quick:
                process, options = moto_server()
                try:
                    fs, _ = layout.open_root("s3://bench", options)
                    fs.mkdir("bench")
                    rate, size = sink_rate(url, topics[2], count, "s3://bench/log", options)
                    print(
                        f"sink_s3_moto: {rate:,.0f} events/s, ratio to floor {rate / base:.2f}, "
                        f"{size:.1f} Parquet bytes/event"
                    )
                finally:
                    process.kill()
                    process.wait(10)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
