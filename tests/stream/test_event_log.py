"""The event-log sink against the session's pulsar-lite broker, writing to a folder and to
an S3 store (a real moto server on loopback): every event lands once, in its date/hour
partition, after restarts and a kill -9; impressions carry their clicks; compaction
merges files without changing the rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from s3_server import moto_s3
from stream_support import (
    BASE_TS,
    consume,
    known_stream,
    produce,
    produce_events,
    quiet_client,
    sample,
    wait_until,
)

from recsys_contracts import event_log_layout as layout
from recsys_contracts import metric_names as names
from recsys_contracts.event_log_settings import EventLogSettings
from recsys_contracts.event_wire import encode_batch, encode_event, encode_impression
from recsys_contracts.events import Event, EventType
from stream_jobs.dead_letters import DeadLetterPublisher
from stream_jobs.event_log_sink import EventLogSink, compact_log
from stream_jobs.event_log_store import EventLogStore

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

MINUTE = 60_000


# --- stores ------------------------------------------------------------------------


@dataclass
class LogStore:
    """A log root URI and how to reach it (S3 credentials and endpoint, or none)."""

    uri: str
    env: dict[str, str]

    @property
    def storage_options(self) -> dict[str, Any]:
        if not self.env:
            return {}
        return {
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": self.env["AWS_ENDPOINT_URL"],
        }

    def raw(self, table: str) -> pa.Table:
        """Every row of every file, read as the trainer reads the layout (no dedup)."""
        fs, root = layout.open_root(self.uri, self.storage_options)

        def read() -> pa.Table:
            if not fs.exists(f"{root}/{table}"):
                return layout.schema(table).empty_table()
            return ds.dataset(
                f"{root}/{table}", format="parquet", partitioning="hive", filesystem=fs
            ).to_table()

        return layout.read_while_compacting(fs, read)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback for this module (tests/s3_server.py)."""
    with moto_s3() as server:
        yield server.env


@pytest.fixture(params=["folder", "s3"])
def log_store(request: pytest.FixtureRequest, tmp_path: Path) -> LogStore:
    if request.param == "folder":
        return LogStore(str(tmp_path / "log"), {})
    env = request.getfixturevalue("moto_server")
    bucket = f"log-{uuid.uuid4().hex[:10]}"
    store = LogStore(f"s3://{bucket}/events", env)
    fs, _ = layout.open_root(store.uri, store.storage_options)
    fs.mkdir(bucket)
    return store


@pytest.fixture
def impressions_topic() -> str:
    return f"persistent://public/default/impressions-{uuid.uuid4().hex[:12]}"


def sink_settings(pulsar_url: str, topic: str, uri: str, **overrides: Any) -> EventLogSettings:
    values: dict[str, Any] = {
        "log_uri": uri,
        "system_id": "test.log",
        "pulsar_service_url": pulsar_url,
        "interactions_topic": topic,
        "subscription": "event-log",
        "flush_interval": "100ms",
        "click_window": "10m",
        "batch_wait": "10ms",
        "compact_interval": "1h",
        "max_future": "3650d",
    }
    return EventLogSettings(**{**values, **overrides})


@contextmanager
def running_sink(sink: EventLogSink) -> Iterator[EventLogSink]:
    """`sink` consuming in a thread; stopped (it writes what is due) and joined on exit."""
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            sink.run(stop, ready)
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=target, name="event-log-sink", daemon=True)
    thread.start()
    assert ready.wait(30), "the sink did not subscribe within 30s"
    try:
        yield sink
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the sink did not stop within 30s"
    if errors:
        raise errors[0]


def ids(rows: pa.Table) -> list[str]:
    return [str(v) for v in rows.column("event_id").to_pylist()]


# --- every event once, in its partition ------------------------------------------------


def test_every_event_lands_once_in_its_hour_partition(
    pulsar_url: str, topic: str, log_store: LogStore
) -> None:
    events = known_stream(users=4, per_user=20)  # spans several hours and both tables
    bad = [("u1", b"{not json"), ("u2", json.dumps({"user_id": "u2", "type": "click"}).encode())]
    produce_events(pulsar_url, topic, events)
    produce(pulsar_url, topic, bad)
    interactions = [e for e in events if e.type is not EventType.IMPRESSION]
    impressions = [e for e in events if e.type is EventType.IMPRESSION]
    settings = sink_settings(pulsar_url, topic, log_store.uri, click_window="1s")
    sink = EventLogSink(settings, storage_options=log_store.storage_options)

    with running_sink(sink):
        wait_until(
            lambda: (
                log_store.raw(layout.INTERACTIONS_TABLE).num_rows == len(interactions)
                and log_store.raw(layout.IMPRESSIONS_TABLE).num_rows == len(impressions)
            ),
            30,
            "every event in the log",
        )

    raw = log_store.raw(layout.INTERACTIONS_TABLE)
    assert sorted(ids(raw)) == sorted(e.event_id for e in interactions)  # each once
    by_id = {e.event_id: e for e in interactions}
    for row in raw.to_pylist():
        event = by_id[row["event_id"]]
        assert (str(row["date"]), f"{int(row['hour']):02d}") == layout.partition_of(event.ts)
        assert row["ts"] == event.ts and row["type"] == event.type.value
        assert row["dwell_ms"] == event.dwell_ms and row["model_version"] == event.model_version
    assert len({(r["date"], r["hour"]) for r in raw.to_pylist()}) > 3  # really partitioned
    window = layout.read_interactions(
        log_store.uri, BASE_TS, BASE_TS + 2 * 3_600_000, log_store.storage_options
    )
    assert sorted(ids(window)) == sorted(
        e.event_id for e in interactions if e.ts < BASE_TS + 7_200_000
    )
    assert window.column("ts").to_pylist() == sorted(window.column("ts").to_pylist())
    assert sorted(ids(log_store.raw(layout.IMPRESSIONS_TABLE))) == sorted(
        e.event_id for e in impressions
    )

    letters = consume(pulsar_url, settings.dead_letters, count=len(bad), timeout=10)
    assert sorted(json.loads(m.data())["code"] for m in letters) == ["invalid_field", "not_json"]
    registry = sink.metrics.registry
    labels = {"system": "test.log", "table": layout.INTERACTIONS_TABLE}
    assert sample(registry, names.EVENT_LOG_ROWS, labels) == len(interactions)
    assert sample(registry, names.EVENT_LOG_BYTES, {**labels, "kind": "batch"}) > 0


def test_a_sink_restarted_after_writing_but_before_acking_drops_the_redelivered_events(
    pulsar_url: str, topic: str, tmp_path: Path
) -> None:
    """The crash window of at-least-once: files durable, acks never sent. The next sink
    gets every message again and must write none of them twice."""
    uri = str(tmp_path / "log")
    events = known_stream(users=3, per_user=20)
    interactions = [e for e in events if e.type is not EventType.IMPRESSION]
    produce_events(pulsar_url, topic, events)
    settings = sink_settings(pulsar_url, topic, uri, click_window="1s")

    class CrashesBeforeAcking(EventLogSink):
        def acknowledge(self, consumer: Any, message: Any) -> None:
            pass

    store = LogStore(uri, {})
    impressions = [e for e in events if e.type is EventType.IMPRESSION]
    expected = {layout.INTERACTIONS_TABLE: interactions, layout.IMPRESSIONS_TABLE: impressions}

    def all_written() -> bool:
        return all(store.raw(t).num_rows == len(expected[t]) for t in expected)

    with running_sink(CrashesBeforeAcking(settings)):
        wait_until(all_written, 30, "every event written (and none acked)")
    files_before = {t: len(EventLogStore(uri).files(t)) for t in expected}

    restarted = EventLogSink(settings)

    def dropped(table: str) -> float:
        labels = {"system": "test.log", "table": table, "stage": "sink"}
        return sample(restarted.metrics.registry, names.EVENT_LOG_DUPLICATES, labels)

    with running_sink(restarted):
        wait_until(
            lambda: all(dropped(t) == len(expected[t]) for t in expected),
            30,
            "the redelivered events to be dropped",
        )
    for table, sent in expected.items():
        assert sorted(ids(store.raw(table))) == sorted(e.event_id for e in sent)
        assert len(EventLogStore(uri).files(table)) == files_before[table]


def test_a_dead_letter_the_broker_refuses_waits_unacked_without_holding_back_the_log(
    pulsar_url: str, topic: str, tmp_path: Path
) -> None:
    """The dead-letter producer fails (closed here; a broker refusing or timing out the
    sends alike). The bad message stays unacked while the events after it are written
    (a refusing dead-letter topic must not stop the log), and its letter is sent again
    until the broker stores it, then the message is acked. (A message left unacked with a
    live consumer is neither dead-lettered nor redelivered until that consumer goes.)"""
    events = [click(f"r{n}", "u1", f"i{n}", BASE_TS + n) for n in range(3)]  # no impression
    produce(pulsar_url, topic, [("u1", b"{not json")])
    produce_events(pulsar_url, topic, events)
    uri = str(tmp_path / "log")
    settings = sink_settings(pulsar_url, topic, uri)
    sink = EventLogSink(settings)
    client = quiet_client(pulsar_url)
    stop = threading.Event()
    dead_lettered = {"system": "test.log", "reason": "not_json"}
    try:
        consumer = sink._subscribe(client)
        refusing = client.create_producer(settings.dead_letters)
        refusing.close()
        dead_letters = DeadLetterPublisher(refusing, settings.subscription)
        messages: list[Any] = []

        def all_four() -> bool:
            messages.extend(consumer.batch_receive())
            return len(messages) == 4

        wait_until(all_four, 10, "the four messages")
        started = time.monotonic()
        sink.receive(consumer, dead_letters, messages)
        assert time.monotonic() - started < 5  # one try, not a wait for the topic
        assert sink.flush(consumer, stop)  # the good events are written meanwhile
        assert EventLogStore(uri).files(layout.INTERACTIONS_TABLE)
        sink.retry_refused_letters(consumer, dead_letters)  # refused again
        assert sample(sink.metrics.registry, names.EVENT_LOG_DEAD_LETTERED, dead_lettered) == 0

        dead_letters.producer = client.create_producer(
            settings.dead_letters, batching_enabled=False
        )
        sink.retry_refused_letters(consumer, dead_letters)
        letters = consume(pulsar_url, settings.dead_letters, count=1, timeout=10)
        assert [json.loads(m.data())["code"] for m in letters] == ["not_json"]
        assert sample(sink.metrics.registry, names.EVENT_LOG_DEAD_LETTERED, dead_lettered) == 1
        consumer.close()
        consumer = sink._subscribe(client)  # every message was acked: none comes back
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert not list(consumer.batch_receive())
        consumer.close()
    finally:
        stop.set()
        client.close()


def test_the_cli_compacts_a_folder_and_names_a_missing_setting(tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    store = EventLogStore(uri)
    hour = layout.partition_of(BASE_TS)
    for start in (0, 10, 10):  # the third file repeats the second
        store.write(layout.INTERACTIONS_TABLE, hour, interaction_rows(start, 10, BASE_TS))
    cli = [sys.executable, "-m", "recsys_operator.cli", "event-log"]
    done = subprocess.run([*cli, "compact", uri], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"interactions {hour[0]}/{hour[1]}: 3 files -> 1, 20 rows, 10 duplicates" in done.stdout
    assert len(store.files(layout.INTERACTIONS_TABLE)) == 1
    mistyped = subprocess.run(
        [*cli, "compact", f"{uri}s"], capture_output=True, text=True, timeout=60
    )
    assert mistyped.returncode == 1, mistyped.stdout
    assert f"error: no event log at {uri}s (no interactions/ or impressions/ folder)" in (
        mistyped.stderr
    )
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_LOG_URI"}
    missing = subprocess.run([*cli, "run"], capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2
    assert "log_uri: Field required" in missing.stderr


# --- kill -9 ------------------------------------------------------------------------


def start_sink_process(
    pulsar_url: str, topic: str, store: LogStore, log_file: Path
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **store.env}
    command = [
        sys.executable,
        "-m",
        "stream_jobs.event_log_sink",
        "--log-uri",
        store.uri,
        "--pulsar-service-url",
        pulsar_url,
        "--interactions-topic",
        topic,
        "--subscription",
        "event-log",
        "--flush-interval",
        "50ms",
        "--flush-rows",
        "50",
        "--batch-size",
        "50",
        "--max-future",
        "3650d",
        "--resubscribe-idle",
        "3s",  # as local mode does (a pulsar-lite quirk with batches, see the docs)
        "--log-level",
        "WARNING",
    ]
    with log_file.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.timeout(180)
def test_events_sent_equal_rows_after_a_kill_9_and_a_restart(
    pulsar_url: str,
    topic: str,
    log_store: LogStore,
    tmp_path: Path,
    restart_broker: Callable[[], None],
) -> None:
    total = 2000
    events = [
        Event(
            event_id=f"k-{n}",
            user_id=f"u{n % 37}",
            item_id=f"i{n % 101}",
            type=EventType.VIEW,
            ts=BASE_TS + n * 10_000,  # about 5.5 hours: several partitions
        )
        for n in range(total)
    ]
    output = tmp_path / "sink.log"
    sink = start_sink_process(pulsar_url, topic, log_store, output)
    try:
        produce_events(pulsar_url, topic, events[:200])
        wait_until(
            lambda: log_store.raw(layout.INTERACTIONS_TABLE).num_rows >= 100, 30, "first rows"
        )

        def paced_send() -> None:  # the rest over about 3 s
            for start in range(200, total, 50):
                produce_events(pulsar_url, topic, events[start : start + 50])
                time.sleep(0.05)

        sender = threading.Thread(target=paced_send, daemon=True)
        sender.start()
        wait_until(
            lambda: log_store.raw(layout.INTERACTIONS_TABLE).num_rows >= 400, 30, "more rows"
        )
        sink.send_signal(signal.SIGKILL)  # mid-stream
        sink.wait(10)
        killed_at = log_store.raw(layout.INTERACTIONS_TABLE).num_rows
        sender.join(60)
        assert killed_at < total, "the sink wrote everything before the kill: nothing tested"
        restart_broker()  # frees the killed consumer and what it held (see the fixture)

        sink = start_sink_process(pulsar_url, topic, log_store, output)
        wait_until(
            lambda: log_store.raw(layout.INTERACTIONS_TABLE).num_rows >= total,
            90,
            f"{total} rows after the restart (sink output: {output})",
        )
        time.sleep(0.5)  # a duplicate written late would show now
    except AssertionError:
        lines = output.read_text(errors="replace").splitlines()
        print("\n".join(line for line in lines if "Connection refused" not in line)[-4000:])
        raise
    finally:
        sink.kill()
        sink.wait(10)
    rows = ids(log_store.raw(layout.INTERACTIONS_TABLE))
    assert len(rows) == total, f"{len(rows) - len(set(rows))} duplicates"
    assert set(rows) == {e.event_id for e in events}


# --- impressions and their clicks ---------------------------------------------------


def impression(request_id: str, user: str, items: list[str], ts: int) -> tuple[str, bytes]:
    """An impression as the gateway sends it (`item_ids` beside the event's fields)."""
    record = Event(
        event_id=f"imp-{request_id}",
        user_id=user,
        item_id=items[0],
        type=EventType.IMPRESSION,
        ts=ts,
        request_id=request_id,
        model_version="v1",
    ).model_dump(mode="json", exclude_none=True)
    record["item_ids"] = items
    return user, json.dumps(record).encode()


def click(request_id: str, user: str, item: str, ts: int) -> Event:
    return Event(
        event_id=f"click-{request_id}-{item}-{ts}",
        user_id=user,
        item_id=item,
        type=EventType.CLICK,
        ts=ts,
        request_id=request_id,
    )


def test_impressions_are_joined_with_their_clicks_within_the_window(
    pulsar_url: str, topic: str, impressions_topic: str, tmp_path: Path
) -> None:
    uri = str(tmp_path / "log")
    t = BASE_TS + 3 * MINUTE
    produce(
        pulsar_url,
        impressions_topic,
        [
            impression("r-clicked", "u1", ["a", "b", "c"], t),
            impression("r-none", "u2", ["a", "b"], t + 1000),
            impression("r-late", "u3", ["d", "e"], t + 2000),
            impression("r-twice", "u4", ["f", "g"], t + 3000),
        ],
    )
    clicks = [
        click("r-clicked", "u1", "b", t + 20_000),
        click("r-twice", "u4", "g", t + 9000),
        click("r-twice", "u4", "g", t + 5000),  # the earlier click is the click_ts
        click("r-other", "u2", "a", t + 4000),  # another request's: not r-none's
    ]
    produce_events(pulsar_url, topic, clicks)
    settings = sink_settings(pulsar_url, topic, uri, impressions_topic=impressions_topic)
    store = LogStore(uri, {})
    sink = EventLogSink(settings)
    with running_sink(sink):
        # The clicks are logged while the impressions still wait for the window...
        wait_until(
            lambda: store.raw(layout.INTERACTIONS_TABLE).num_rows == len(clicks), 30, "clicks"
        )
        time.sleep(0.3)  # a few flushes: none may write an impression yet
        assert store.raw(layout.IMPRESSIONS_TABLE).num_rows == 0
        assert sink.join.pending == 4
        # ...until an event 10 minutes later in event time closes it: this click, too late.
        late = click("r-late", "u3", "d", t + 2000 + 11 * MINUTE)
        produce_events(pulsar_url, topic, [late])
        wait_until(lambda: store.raw(layout.IMPRESSIONS_TABLE).num_rows == 9, 30, "impression rows")
    assert sink.join.pending == 0

    rows = layout.read_impressions(uri, BASE_TS, BASE_TS + 86_400_000)
    got = {(r["request_id"], r["item_id"]): r for r in rows.to_pylist()}
    clicked = {key: (r["clicked"], r["click_ts"]) for key, r in got.items()}
    assert clicked == {
        ("r-clicked", "a"): (False, None),
        ("r-clicked", "b"): (True, t + 20_000),
        ("r-clicked", "c"): (False, None),
        ("r-none", "a"): (False, None),
        ("r-none", "b"): (False, None),
        ("r-late", "d"): (False, None),
        ("r-late", "e"): (False, None),
        ("r-twice", "f"): (False, None),
        ("r-twice", "g"): (True, t + 5000),
    }
    first = got[("r-clicked", "a")]
    assert (first["user_id"], first["ts"], first["model_version"]) == ("u1", t, "v1")
    assert [got[("r-clicked", i)]["position"] for i in "abc"] == [0, 1, 2]


def gateway_impression(request_id: str, user: str, items: list[str], ts: int) -> bytes:
    """An impression as the gateway encodes it (Avro, `encode_impression`)."""
    return encode_impression(
        event_id=f"imp-{request_id}",
        user_id=user,
        item_ids=items,
        ts=ts,
        request_id=request_id,
        model_version="v1",
    )


def test_a_batch_of_impressions_is_joined_and_acked_once_all_its_rows_are_written(
    pulsar_url: str, topic: str, impressions_topic: str, tmp_path: Path
) -> None:
    """The gateway sends impressions several to a message: each is joined on its own,
    and the message is acked only once every one of them is written (a crash before
    that redelivers it: duplicates, never losses). A batch with one invalid event is
    dead-lettered whole."""
    uri = str(tmp_path / "log")
    t = BASE_TS + 3 * MINUTE
    batch = encode_batch(
        [
            gateway_impression("r-early", "u1", ["a", "b"], t),
            gateway_impression("r-later", "u2", ["c", "d"], t + 12 * MINUTE),
        ]
    )
    invalid = encode_event(
        Event.model_construct(
            event_id="bad", user_id="u 3", item_id="x", type=EventType.VIEW, ts=t,
            dwell_ms=None, request_id=None, model_version=None,
        )
    )  # fmt: skip
    broken = encode_batch([gateway_impression("r-lost", "u3", ["e"], t), invalid])
    produce(pulsar_url, impressions_topic, [("", batch), ("", broken)])
    produce_events(pulsar_url, topic, [click("r-early", "u1", "b", t + MINUTE)])
    acked: list[bytes] = []

    class RecordsAcks(EventLogSink):
        def acknowledge(self, consumer: Any, message: Any) -> None:
            acked.append(message.data())
            super().acknowledge(consumer, message)

    settings = sink_settings(pulsar_url, topic, uri, impressions_topic=impressions_topic)
    store = LogStore(uri, {})
    sink = RecordsAcks(settings)
    with running_sink(sink):
        # An event 11 minutes after r-early closes its window, not r-later's.
        produce_events(pulsar_url, topic, [click("r-x", "u9", "z", t + 11 * MINUTE)])
        wait_until(lambda: store.raw(layout.IMPRESSIONS_TABLE).num_rows == 2, 30, "r-early")
        time.sleep(0.3)  # a few flushes
        assert sink.join.pending == 1
        assert batch not in acked  # r-later is not written yet
        produce_events(pulsar_url, topic, [click("r-y", "u9", "z", t + 23 * MINUTE)])
        wait_until(lambda: store.raw(layout.IMPRESSIONS_TABLE).num_rows == 4, 30, "r-later")
        wait_until(lambda: batch in acked, 10, "the batch acked")
    assert acked.count(batch) == 1
    rows = layout.read_impressions(uri, BASE_TS, BASE_TS + 86_400_000).to_pylist()
    got = {(r["request_id"], r["item_id"]): r["clicked"] for r in rows}
    assert got == {
        ("r-early", "a"): False,
        ("r-early", "b"): True,
        ("r-later", "c"): False,
        ("r-later", "d"): False,
    }  # r-lost is not there: its batch was invalid as a whole
    letters = consume(pulsar_url, settings.dead_letters, count=1, timeout=10)
    assert json.loads(letters[0].data())["code"] == "invalid_field"


def test_a_copy_of_an_event_in_flight_is_acked_once_the_first_is_written(
    pulsar_url: str, topic: str, impressions_topic: str, tmp_path: Path
) -> None:
    """A second message carrying an event that is buffered and not written yet (a
    client that sends its event twice; a producer resending what the broker did store)
    is dropped as a duplicate, and acked once the first copy is written: left unacked,
    it would stay in the subscription's backlog, and each one counts toward the broker's
    limit of unacked messages a consumer may hold, past which it delivers no more. The
    same for an impression whose copy is in another batch."""
    uri = str(tmp_path / "log")
    t = BASE_TS + 3 * MINUTE
    twice = click("r-1", "u1", "a", t)
    produce_events(pulsar_url, topic, [twice, twice])
    shown, other = (
        gateway_impression("r-2", "u2", ["b", "c"], t),
        gateway_impression("r-3", "u3", ["d"], t),
    )
    produce(
        pulsar_url,
        impressions_topic,
        [("", encode_batch([shown, other])), ("", encode_batch([other, shown]))],
    )
    acked: list[str] = []

    class RecordsAcks(EventLogSink):
        def acknowledge(self, consumer: Any, message: Any) -> None:
            acked.append(str(message.message_id()))
            super().acknowledge(consumer, message)

    settings = sink_settings(
        pulsar_url, topic, uri, impressions_topic=impressions_topic, click_window="1s"
    )
    store = LogStore(uri, {})
    sink = RecordsAcks(settings)
    with running_sink(sink):
        wait_until(
            lambda: (
                store.raw(layout.IMPRESSIONS_TABLE).num_rows == 3
                and store.raw(layout.INTERACTIONS_TABLE).num_rows == 1
            ),
            30,
            "one copy of each event written",
        )
        wait_until(lambda: len(set(acked)) == 4, 10, "all four messages acked")
    assert len(acked) == 4  # each once
    assert ids(store.raw(layout.INTERACTIONS_TABLE)) == [twice.event_id]
    duplicates = {
        table: sample(
            sink.metrics.registry,
            names.EVENT_LOG_DUPLICATES,
            {"system": "test.log", "table": table, "stage": "sink"},
        )
        for table in (layout.INTERACTIONS_TABLE, layout.IMPRESSIONS_TABLE)
    }
    assert duplicates == {layout.INTERACTIONS_TABLE: 1, layout.IMPRESSIONS_TABLE: 2}


# --- compaction -------------------------------------------------------------------


def interaction_rows(start: int, count: int, ts: int) -> pa.Table:
    rows = [
        {
            "event_id": f"c-{n}",
            "user_id": "u",
            "item_id": f"i{n}",
            "type": "view",
            "ts": ts + n,
            "dwell_ms": None,
            "request_id": None,
            "model_version": None,
        }
        for n in range(start, start + count)
    ]
    return pa.Table.from_pylist(rows, schema=layout.schema(layout.INTERACTIONS_TABLE))


def test_compaction_merges_small_files_without_changing_the_rows(log_store: LogStore) -> None:
    store = EventLogStore(log_store.uri, log_store.storage_options)
    hour_a, hour_b = layout.partition_of(BASE_TS), layout.partition_of(BASE_TS + 3_600_000)
    for start in range(0, 100, 10):  # ten small files, the last two overlapping
        store.write(
            layout.INTERACTIONS_TABLE,
            hour_a,
            interaction_rows(start, 15 if start >= 80 else 10, BASE_TS),
        )
    store.write(layout.INTERACTIONS_TABLE, hour_b, interaction_rows(500, 5, BASE_TS + 3_600_000))
    before = log_store.raw(layout.INTERACTIONS_TABLE)
    assert before.num_rows == 105 + 5 + 5

    done = compact_log(log_store.uri, min_files=2, storage_options=log_store.storage_options)

    assert [(c.partition, c.files_in, c.duplicates) for c in done] == [(hour_a, 10, 5)]
    files = store.files(layout.INTERACTIONS_TABLE)
    assert len(files) == 2  # hour_a merged into one, hour_b (one file) left alone
    after = log_store.raw(layout.INTERACTIONS_TABLE)
    assert sorted(ids(after)) == sorted(set(ids(before)))
    key = ["event_id", "ts", "item_id", "date", "hour"]
    assert sorted(after.select(key).to_pylist(), key=str) == sorted(
        {json.dumps(r, sort_keys=True): r for r in before.select(key).to_pylist()}.values(),
        key=str,
    )


def test_the_sink_compacts_partitions_as_files_gather(
    pulsar_url: str, topic: str, tmp_path: Path
) -> None:
    uri = str(tmp_path / "log")
    settings = sink_settings(
        pulsar_url, topic, uri, compact_min_files=3, compact_interval="200ms", flush_rows=5
    )
    store = LogStore(uri, {})
    events = [
        Event(event_id=f"s-{n}", user_id="u", item_id="i", type=EventType.VIEW, ts=BASE_TS + n)
        for n in range(40)
    ]
    sink = EventLogSink(settings)

    def rows() -> int:
        return store.raw(layout.INTERACTIONS_TABLE).num_rows

    with running_sink(sink):
        for start in range(0, 40, 5):  # one small file at a time
            produce_events(pulsar_url, topic, events[start : start + 5])
            wait_until(lambda end=start + 5: rows() >= end, 30, "rows")  # type: ignore[misc]
        wait_until(
            lambda: len(EventLogStore(uri).files(layout.INTERACTIONS_TABLE)) < 3, 30, "a compaction"
        )
    assert sorted(ids(store.raw(layout.INTERACTIONS_TABLE))) == sorted(e.event_id for e in events)
    labels = {"system": "test.log", "table": layout.INTERACTIONS_TABLE, "kind": "compacted"}
    assert sample(sink.metrics.registry, names.EVENT_LOG_FILES, labels) >= 1


def test_a_read_that_meets_a_file_compaction_deleted_lists_again() -> None:
    class Listing:
        invalidated = 0

        def invalidate_cache(self) -> None:
            self.invalidated += 1

    attempts: list[int] = []

    def read() -> str:
        attempts.append(1)
        if len(attempts) < 3:  # the first two listings named a file deleted since
            raise FileNotFoundError("batch-1.parquet")
        return "rows"

    fs = Listing()
    assert layout.read_while_compacting(fs, read) == "rows"
    assert len(attempts) == 3 and fs.invalidated == 3  # a fresh listing each time

    def always_gone() -> str:
        raise FileNotFoundError("batch-1.parquet")

    with pytest.raises(FileNotFoundError):  # a file that stays missing is an error, not empty
        layout.read_while_compacting(fs, always_gone)
