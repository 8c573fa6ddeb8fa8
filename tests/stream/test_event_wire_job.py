"""Avro and JSON on one topic, through the real feature job, broker and Redis.

Producers switch to Avro one at a time, so a topic holds both formats for a while:
the job and the rebuild must apply both, and dead-letter a broken Avro payload or
one of a schema version they do not know, with the reason, blocking nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import pulsar
import pytest
import redis
from stream_support import (
    StoreContent,
    consume,
    dead_letter,
    expected_content,
    interleave_users,
    known_stream,
    produce,
    running_job,
    sample,
    store_content,
    wait_until,
)

from recsys_contracts.event_wire import (
    MAGIC,
    SCHEMAS,
    WireFormat,
    decode_event,
    encode_event,
    wire_format_of,
)
from recsys_contracts.events import Event
from recsys_contracts.feature_job_settings import FeatureJobSettings, duration_ms
from stream_jobs.features import FeatureJob
from stream_jobs.item_embeddings import EmbeddingCatalog
from stream_jobs.producer import EventProducer
from stream_jobs.rebuild import rebuild
from stream_jobs.user_features import FeatureParams

pytestmark = [pytest.mark.broker, pytest.mark.redis]


def reference(settings: FeatureJobSettings, events: Sequence[Event]) -> StoreContent:
    catalog = EmbeddingCatalog(settings.embeddings_path, settings.model_version)
    catalog.refresh()
    half_life = duration_ms(settings.popular_half_life)
    return expected_content(
        settings.system_id, events, FeatureParams.from_settings(settings), catalog, half_life
    )


def matches(client: redis.Redis, settings: FeatureJobSettings, expected: StoreContent) -> bool:
    found = store_content(client, settings.system_id, expected.users, ["v1", "v2"])
    return found.same_as(expected)


def mixed_payloads(events: Sequence[Event]) -> list[tuple[str, bytes]]:
    """Every other event in Avro, the rest in JSON (one user's events in both)."""
    formats = [WireFormat.AVRO, WireFormat.JSON]
    return [(e.user_id, encode_event(e, formats[n % 2])) for n, e in enumerate(events)]


def test_avro_and_json_events_on_one_topic_are_all_applied(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    events = interleave_users(known_stream(users=4, per_user=20, seed=13))
    produce(pulsar_url, topic, mixed_payloads(events))
    expected = reference(job_settings, events)
    with running_job(job_settings) as job:
        wait_until(lambda: matches(store, job_settings, expected), 30, "both formats applied")
        applied = sum(
            sample(
                job.metrics.registry,
                "recsys_feature_events_total",
                {"type": t, "outcome": "applied"},
            )
            for t in ("view", "click", "purchase", "dwell", "impression")
        )
    assert applied == len(events)


def test_a_topic_of_both_formats_is_rebuilt_like_the_live_run(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    events = interleave_users(known_stream(users=3, per_user=15, seed=17))
    produce(pulsar_url, topic, mixed_payloads(events))
    expected = reference(job_settings, events)
    job = FeatureJob(job_settings, store_client=store)
    job.catalog.refresh()
    client = pulsar.Client(pulsar_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        report = rebuild(job_settings, client, job.store, job.catalog.versions)
    finally:
        client.close()
    assert report.read == len(events) and report.outcomes["applied"] == len(events)
    assert matches(store, job_settings, expected)


def test_broken_avro_and_an_unknown_schema_version_are_dead_lettered_with_reasons(
    job_settings: FeatureJobSettings, store: redis.Redis, pulsar_url: str, topic: str
) -> None:
    good = known_stream(users=2, per_user=8, seed=5)
    sample_avro = encode_event(good[0])
    truncated = sample_avro[:-5]
    newer = MAGIC + bytes((max(SCHEMAS) + 1,)) + sample_avro[3:]
    bad = [("user-0", truncated), ("user-1", newer), ("user-0", b"{not json")]
    # the bad payloads first, then the good ones (in Avro) behind them
    produce(pulsar_url, topic, [*bad, *((e.user_id, encode_event(e)) for e in good)])
    expected = reference(job_settings, good)
    with running_job(job_settings) as job:
        wait_until(lambda: matches(store, job_settings, expected), 30, "the good events")
        messages = consume(pulsar_url, job_settings.dead_letters, len(bad), timeout=20)
        dead = {
            code: sample(
                job.metrics.registry, "recsys_feature_dead_letters_total", {"reason": code}
            )
            for code in ("not_avro", "unknown_schema", "not_json")
        }
    assert dead == {"not_avro": 1, "unknown_schema": 1, "not_json": 1}
    letters = {letter["code"]: letter for letter in map(dead_letter, messages)}
    assert "does not decode" in letters["not_avro"]["reason"]
    assert f"schema version {max(SCHEMAS) + 1} is unknown" in letters["unknown_schema"]["reason"]
    for code, original in (("not_avro", truncated), ("unknown_schema", newer)):
        letter = letters[code]
        assert letter["payload_format"] == "avro"
        assert letter["payload_encoding"] == "base64"
        assert base64.b64decode(letter["payload"]) == original  # kept exactly, for a replay
    assert letters["not_json"]["payload_format"] == "json"


@pytest.mark.parametrize(
    ("environment", "expected"), [(None, WireFormat.AVRO), ("json", WireFormat.JSON)]
)
def test_the_producer_writes_avro_unless_its_environment_keeps_json(
    environment: str | None,
    expected: WireFormat,
    pulsar_url: str,
    topic: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if environment is None:
        monkeypatch.delenv("RECSYS_EVENT_WIRE_FORMAT", raising=False)
    else:
        monkeypatch.setenv("RECSYS_EVENT_WIRE_FORMAT", environment)
    event = known_stream(users=1, per_user=1)[0]
    with EventProducer(pulsar_url, topic) as producer:
        producer.send(event)
    (message,) = consume(pulsar_url, topic, 1, timeout=20)
    assert wire_format_of(message.data()) is expected
    assert decode_event(message.data()) == event
