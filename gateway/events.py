"""The events the gateway sends to Pulsar, built with the event contract's own model
(`recsys_contracts.events.Event`), so the stream jobs can read every one of them:

    {event_id, user_id, item_id, type, ts, dwell_ms?, request_id?, model_version?}

- interactions (view | click | purchase | dwell) are the clients' events, with
  `model_version` filled in from the request id when one is given;
- impressions (type `impression`), one per non-empty recommendation response, name the
  top item in `item_id` and add the whole list, best first, as `item_ids` (a field the
  event model does not know and its tolerant readers ignore).

They are encoded by `recsys_contracts.event_wire`: Avro unless the gateway's
environment says `RECSYS_EVENT_WIRE_FORMAT=json` (read once, at start).

`ts` is Unix time in milliseconds. `event_id` is unique (or the client's own, for
idempotent retries), so consumers drop the duplicates that at-least-once delivery
and the gateway's retries make.

Building raises `pydantic.ValidationError` (interactions) or `InvalidEvent`
(impressions) for an event the contract refuses (only possible for item ids a model
returned: the client's fields were checked against the same patterns already).

An impression is built without the event model (`encode_impression` checks the same
patterns): it is built once per recommendation, and the model plus fastavro cost
more than the rest of the gateway's own work on a request. Its `event_id` is the
caller's (the gateway's `NonceSource`: random bytes read a few kilobytes at a time,
not one system call per event as `uuid4`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from gateway.api_models import ClientEvent
from recsys_contracts.event_wire import (
    WireFormat,
    encode_event,
    encode_impression,
    wire_format_from_env,
)
from recsys_contracts.events import Event, EventType

WIRE_FORMAT = wire_format_from_env()


def impression_payload(
    *,
    event_id: str,
    user_id: str,
    item_ids: Sequence[str],
    request_id: str,
    model_version: str,
    ts_ms: int,
) -> bytes:
    if WIRE_FORMAT is WireFormat.AVRO:
        return encode_impression(
            event_id=event_id,
            user_id=user_id,
            item_ids=item_ids,
            ts=ts_ms,
            request_id=request_id,
            model_version=model_version,
        )
    event = Event(
        event_id=event_id,
        user_id=user_id,
        item_id=item_ids[0],
        type=EventType.IMPRESSION,
        ts=ts_ms,
        request_id=request_id,
        model_version=model_version,
    )
    return encode_event(event, WIRE_FORMAT, item_ids=item_ids)


def interaction_payload(
    client_event: ClientEvent, *, model_version: str | None, received_at_ms: int
) -> bytes:
    event = Event(
        event_id=client_event.event_id or uuid.uuid4().hex,
        user_id=client_event.user_id,
        item_id=client_event.item_id,
        type=EventType(client_event.type),
        ts=client_event.ts if client_event.ts is not None else received_at_ms,
        dwell_ms=client_event.dwell_ms,
        request_id=client_event.request_id,
        model_version=model_version,
    )
    return encode_event(event, WIRE_FORMAT)
