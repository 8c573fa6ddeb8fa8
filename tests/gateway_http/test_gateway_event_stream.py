"""Impressions and interactions reach a real Pulsar broker (pulsar-lite); an absent
broker costs counted events, never requests."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pulsar
import pytest
import requests
from gateway_testing import (
    SYSTEM,
    StartGateway,
    metric_value,
    routing_document,
    wait_until,
    write_routing,
)
from serving_stub import ServingStub

from gateway.event_sink import OutgoingEvent
from gateway.log_rate_limit import RateLimitFilter
from gateway.server import ADDRESS_ENV
from recsys_contracts.event_wire import (
    WireFormat,
    decode_event,
    decode_records,
    encode_event,
    wire_format_of,
)
from recsys_contracts.events import EventType, new_event, now_ms
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.pulsar_broker import broker_process, service_url

pytestmark = [pytest.mark.broker, pytest.mark.xdist_group("gateway-pulsar")]


@pytest.fixture
def topics() -> tuple[str, str]:
    """Fresh (interactions, impressions) topics: the session's broker is shared."""
    run = uuid.uuid4().hex[:12]
    base = "persistent://public/default/gateway-test-"
    return f"{base}interactions-{run}", f"{base}impressions-{run}"


@pytest.fixture
def pulsar_client(pulsar_broker: ManagedProcess) -> Iterator[pulsar.Client]:
    client = pulsar.Client(
        service_url(pulsar_broker),
        operation_timeout_seconds=10,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
    )
    yield client
    client.close()


def subscribe(client: pulsar.Client, topic: str) -> pulsar.Consumer:
    # Shared: the subscription type pulsar-lite delivers reliably (DESIGN.md).
    return client.subscribe(
        topic,
        "gateway-test",
        consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
    )


def receive(consumer: pulsar.Consumer, count: int, timeout_s: float = 15.0) -> list[pulsar.Message]:
    messages: list[pulsar.Message] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        try:
            message = consumer.receive(timeout_millis=500)
        except pulsar.Timeout:
            continue
        consumer.acknowledge(message)
        messages.append(message)
    assert len(messages) == count, f"received {len(messages)} of {count} events"
    return messages


def receive_events(
    consumer: pulsar.Consumer, count: int, timeout_s: float = 15.0
) -> list[tuple[pulsar.Message, list[tuple[Any, dict[str, Any]]]]]:
    """Messages until they hold `count` events (impressions come batched), each with
    its decoded events (and their records)."""
    got: list[tuple[pulsar.Message, list[tuple[Any, dict[str, Any]]]]] = []
    deadline = time.monotonic() + timeout_s
    while sum(len(events) for _, events in got) < count and time.monotonic() < deadline:
        try:
            message = consumer.receive(timeout_millis=500)
        except pulsar.Timeout:
            continue
        consumer.acknowledge(message)
        got.append((message, decode_records(message.data())))
    assert sum(len(events) for _, events in got) == count, f"received {got!r}"
    return got


def test_impressions_and_client_events_arrive_keyed_by_user(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    pulsar_broker: ManagedProcess,
    pulsar_client: pulsar.Client,
    topics: tuple[str, str],
) -> None:
    interactions_topic, impressions_topic = topics
    impressions = subscribe(pulsar_client, impressions_topic)
    interactions = subscribe(pulsar_client, interactions_topic)
    gateway = start_gateway(
        routing_document(
            serving, canary="2", weight=50, pulsar=service_url(pulsar_broker), topics=topics
        )
    )
    started_ms = now_ms()

    served: dict[str, dict[str, Any]] = {}
    shown: dict[str | None, dict[str, Any]] = {}
    for user in ("alice", "bob", "carol", "dave"):
        body = http.post(
            f"{gateway.url}/v1/recommend", json={"user_id": user, "k": 3}, timeout=10
        ).json()
        served[body["request_id"]] = body | {"user_id": user}

    for message, decoded in receive_events(impressions, 4):
        assert wire_format_of(message.data()) is WireFormat.AVRO  # the default
        for event, record in decoded:  # valid events for the stream jobs
            response = served.pop(event.request_id or "")  # each impression once
            # A lone impression is keyed by its user; a batch of several users' by none.
            assert message.partition_key() == (response["user_id"] if len(decoded) == 1 else "")
            assert event.user_id == response["user_id"]
            assert event.type is EventType.IMPRESSION
            assert event.model_version == response["model_version"]
            assert record["item_ids"] == response["item_ids"]
            assert event.item_id == response["item_ids"][0]
            assert started_ms - 1000 <= event.ts <= now_ms() + 1000
            shown[event.request_id] = response
    assert not served

    clicked = next(iter(shown.values()))
    client_events = [
        {"type": "click", "user_id": clicked["user_id"], "item_id": clicked["item_ids"][1], "request_id": clicked["request_id"]},
        {"type": "view", "user_id": "erin", "item_id": "item-9"},
        {"type": "dwell", "user_id": "erin", "item_id": "item-9", "dwell_ms": 5300, "ts": started_ms - 3_600_000, "event_id": "erin-dwell-1"},
    ]  # fmt: skip
    answer = http.post(f"{gateway.url}/v1/events", json=client_events, timeout=10)
    assert answer.status_code == 202

    received = {
        decode_event(m.data()).type: (m, decode_event(m.data())) for m in receive(interactions, 3)
    }
    message, click = received[EventType.CLICK]
    assert message.partition_key() == clicked["user_id"]
    assert click.request_id == clicked["request_id"]
    assert click.model_version == clicked["model_version"]  # filled in from the request id
    _, view = received[EventType.VIEW]
    assert view.model_version is None and view.request_id is None
    assert started_ms - 1000 <= view.ts <= now_ms() + 1000  # the gateway's receive time
    _, dwell = received[EventType.DWELL]
    assert (dwell.event_id, dwell.ts, dwell.dwell_ms) == (
        "erin-dwell-1",
        started_ms - 3_600_000,
        5300,
    )

    metrics_url = f"{gateway.url}/metrics"
    wait_until(
        lambda: (
            metric_value(http.get(metrics_url, timeout=10).text, "recsys_gateway_events_sent_total")
            == 7
        )
    )
    metrics = http.get(metrics_url, timeout=10).text
    assert metric_value(metrics, "recsys_gateway_events_sent_total", stream="impressions") == 4
    assert metric_value(metrics, "recsys_gateway_events_dropped_total") == 0


def test_impressions_under_load_arrive_batched_each_exactly_once(
    serving: ServingStub,
    start_gateway: StartGateway,
    pulsar_broker: ManagedProcess,
    pulsar_client: pulsar.Client,
    topics: tuple[str, str],
) -> None:
    """Concurrent requests: their impressions go several to a message (fewer messages
    than events), and every one arrives once, with the request id its answer had."""
    impressions = subscribe(pulsar_client, topics[1])
    gateway = start_gateway(
        routing_document(
            serving, pulsar=service_url(pulsar_broker), topics=topics, timeout_ms=5000
        )  # the model's answers, not the fallback's, even on a loaded machine
    )

    def recommend(n: int) -> str:
        with requests.Session() as session:
            answer = session.post(
                f"{gateway.url}/v1/recommend", json={"user_id": f"u{n}", "k": 2}, timeout=10
            )
        assert answer.status_code == 200
        return str(answer.json()["request_id"])

    with ThreadPoolExecutor(8) as pool:
        request_ids = list(pool.map(recommend, range(120)))
    got = receive_events(impressions, 120, timeout_s=30)
    events = [event for _, decoded in got for event, _ in decoded]
    assert sorted(e.request_id for e in events) == sorted(request_ids)
    assert len({e.event_id for e in events}) == 120
    assert len(got) < 120  # batched
    wait_until(
        lambda: (
            metric_value(
                requests.get(f"{gateway.url}/metrics", timeout=10).text,
                "recsys_gateway_events_sent_total",
            )
            == 120
        )
    )


def test_with_the_broker_down_requests_succeed_and_losses_are_counted(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nowhere = f"pulsar://127.0.0.1:{free_port()}"
    gateway = start_gateway(
        routing_document(serving, pulsar=nowhere), event_buffer_capacity=4, pulsar_timeout_s=1
    )
    caplog.set_level(logging.WARNING, logger="gateway.event_sink")
    # The rate limit is per process: another test's drops in the last 10 s must not hide ours.
    for limit in logging.getLogger("gateway.event_sink").filters:
        if isinstance(limit, RateLimitFilter):
            limit.reset()
    slowest = 0.0
    for n in range(30):
        started = time.monotonic()
        answer = http.post(
            f"{gateway.url}/v1/recommend", json={"user_id": f"u{n}", "k": 2}, timeout=10
        )
        slowest = max(slowest, time.monotonic() - started)
        assert answer.status_code == 200
        event = {"type": "view", "user_id": f"u{n}", "item_id": "item-1"}
        assert http.post(f"{gateway.url}/v1/events", json=event, timeout=10).status_code == 202
    assert slowest < 0.5  # nobody waited for the broker

    def dropped(reason: str | None = None) -> float:
        labels = {"reason": reason} if reason else {}
        text = http.get(f"{gateway.url}/metrics", timeout=10).text
        return metric_value(text, "recsys_gateway_events_dropped_total", **labels)

    # 60 events, 4 buffered, and what the sender took from the buffer at once (up to its
    # 4 too), retrying: the rest are counted now.
    assert dropped("buffer_full") >= 60 - 2 * 4
    assert dropped() < 60
    final = gateway.gateway.metrics  # read after stop, from the registry itself
    gateway.stop()  # what is still buffered is given up and counted too
    text = final.exposition().decode()
    assert metric_value(text, "recsys_gateway_events_dropped_total") == 60
    assert metric_value(text, "recsys_gateway_events_sent_total") == 0
    # Logged, rate-limited: a handful of lines for 60 losses.
    drop_lines = [r for r in caplog.records if "event dropped" in r.getMessage()]
    assert 1 <= len(drop_lines) <= 6


def test_with_the_broker_down_for_good_every_accepted_event_is_spilled_then_delivered(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    tmp_path: Path,
    topics: tuple[str, str],
) -> None:
    """Broker down for the gateway's whole life: nothing is lost at shutdown. The next
    gateway, once the broker is up, sends every spilled event exactly once."""
    port = free_port()
    routing = routing_document(serving, pulsar=f"pulsar://127.0.0.1:{port}", topics=topics)
    spill = tmp_path / "events.spill"
    first = start_gateway(routing, event_spill_path=spill, pulsar_timeout_s=1)
    sent_ids = set()
    for n in range(20):
        answer = http.post(
            f"{first.url}/v1/recommend", json={"user_id": f"u{n}", "k": 2}, timeout=10
        )
        assert answer.status_code == 200
        event = {"type": "view", "user_id": f"u{n}", "item_id": "item-1", "event_id": f"view-{n}"}
        assert http.post(f"{first.url}/v1/events", json=event, timeout=10).status_code == 202
        sent_ids.add(f"view-{n}")
    buffered = metric_value(
        http.get(f"{first.url}/metrics", timeout=10).text, "recsys_gateway_events_buffered"
    )
    assert 38 <= buffered <= 40  # one or two may be in the sender's hands
    registry = first.gateway.metrics
    started = time.monotonic()
    first.stop()
    assert time.monotonic() - started < 15  # a bounded drain, whatever the broker does
    text = registry.exposition().decode()
    assert metric_value(text, "recsys_gateway_events_spilled_total") == 40
    assert metric_value(text, "recsys_gateway_events_dropped_total") == 0
    assert len(spill.read_text().splitlines()) == 40

    broker = broker_process(tmp_path / "broker", port=port).start()
    try:
        second = start_gateway(routing, event_spill_path=spill)
        assert not spill.exists()
        client = pulsar.Client(
            f"pulsar://127.0.0.1:{port}", logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)
        )
        try:
            interactions = receive(subscribe(client, topics[0]), 20, timeout_s=30)
            impressions = receive_events(subscribe(client, topics[1]), 20, timeout_s=30)
        finally:
            client.close()
        assert {decode_event(m.data()).event_id for m in interactions} == sent_ids
        assert len({e.event_id for _, events in impressions for e, _ in events}) == 20
        text = http.get(f"{second.url}/metrics", timeout=10).text
        assert metric_value(text, "recsys_gateway_events_restored_total") == 40
        wait_until(
            lambda: (
                metric_value(
                    http.get(f"{second.url}/metrics", timeout=10).text,
                    "recsys_gateway_events_sent_total",
                )
                == 40
            )
        )
    finally:
        broker.stop()


def test_a_spill_file_torn_by_a_kill_restores_its_whole_lines_and_counts_the_torn_one(
    serving: ServingStub,
    start_gateway: StartGateway,
    http: requests.Session,
    tmp_path: Path,
    topics: tuple[str, str],
    pulsar_broker: ManagedProcess,
) -> None:
    """A gateway killed while it spills leaves a last line cut short. The next gateway
    sends every whole line and counts the torn one as lost at shutdown (it was: the file
    did not keep it); reading the file ended the start and lost the lines after it."""
    url = service_url(pulsar_broker)
    routing = routing_document(serving, pulsar=url, topics=topics)
    ids = [f"spilled-{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
    lines = [
        OutgoingEvent(
            SYSTEM,
            "interactions",
            url,
            topics[0],
            "u1",
            encode_event(new_event("u1", "i1", "view").model_copy(update={"event_id": event_id})),
        ).to_line()
        for event_id in ids
    ]
    spill = tmp_path / "events.spill"
    spill.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    gateway = start_gateway(routing, event_spill_path=spill)
    assert not spill.exists()
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        received = receive(subscribe(client, topics[0]), 2, timeout_s=30)
    finally:
        client.close()
    assert sorted(decode_event(m.data()).event_id for m in received) == sorted(ids[:2])
    text = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(text, "recsys_gateway_events_restored_total") == 2
    assert metric_value(text, "recsys_gateway_events_dropped_total", reason="shutdown") == 1


def test_spilled_events_survive_a_gateway_killed_before_it_could_send_them(
    serving: ServingStub,
    start_gateway: StartGateway,
    tmp_path: Path,
    topics: tuple[str, str],
) -> None:
    """The spill file is read at start; the broker is still down, and the gateway is
    killed (kill -9, a node lost) before it sent what it read. The next gateway sends
    those events: the file was deleted as soon as it was read, and they were lost,
    counted as restored and never as sent or dropped."""
    port = free_port()
    url = f"pulsar://127.0.0.1:{port}"
    routing = routing_document(serving, pulsar=url, topics=topics)
    ids = [f"spilled-{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
    spill = tmp_path / "events.spill"
    spill.write_text(
        "".join(
            OutgoingEvent(
                SYSTEM,
                "interactions",
                url,
                topics[0],
                "u1",
                encode_event(new_event("u1", "i1", "view").model_copy(update={"event_id": i})),
            ).to_line()
            for i in ids
        )
    )
    routing_file = tmp_path / "routing.json"
    write_routing(routing_file, routing)
    gateway_port = free_port()
    process = ManagedProcess(
        "gateway",
        [sys.executable, "-m", "gateway", "run", "--routing", str(routing_file),
         "--event-spill", str(spill)],
        tmp_path / "gateway.log",
        gateway_port,
        env={ADDRESS_ENV: f"127.0.0.1:{gateway_port}"},
    )  # fmt: skip
    process.start(ready_timeout=30)
    try:
        metrics = requests.get(f"http://127.0.0.1:{gateway_port}/metrics", timeout=10).text
        assert metric_value(metrics, "recsys_gateway_events_restored_total") == 3
    finally:
        assert process.popen is not None
        process.popen.kill()  # our own child, by its PID
        process.popen.wait(timeout=10)

    broker = broker_process(tmp_path / "broker", port=port).start()
    try:
        start_gateway(routing, event_spill_path=spill)
        client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
        try:
            received = receive(subscribe(client, topics[0]), 3, timeout_s=30)
        finally:
            client.close()
        assert sorted(decode_event(m.data()).event_id for m in received) == sorted(ids)
        restoring = spill.with_name(spill.name + ".restoring")
        wait_until(lambda: not restoring.exists())  # each sent: nothing left to keep
    finally:
        broker.stop()
