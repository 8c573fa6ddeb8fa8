"""The gateway's HTTP API: what happens to each request.

    POST /v1/recommend   assign the user's variant (or the one a QA header or cookie
                         pins), call its model, answer (or fall back to popular
                         items), record an impression
    POST /v1/events      attribute clicks, forward interactions to Pulsar
    GET  /healthz        the routing applied now
    GET  /metrics        Prometheus
    GET  /openapi.json   the API, generated from `gateway.api_models`

Every answer the gateway gives itself is JSON; every error is
`{"error": "...", "field": "..." | null}`. A client mistake is a 4xx, never a 5xx.

The handlers take a `gateway.http_server.Request` and return its `Response`; the
server (`gateway.http_server`, HTTP/1.1 on httptools) knows nothing of recommendations.
Run one with `gateway.server` (in a thread, or as `python -m gateway run`), which serves
`Gateway(GatewaySettings(routing_path=...)).routes()` (or `routing_configmap=...` in a
cluster) between `Gateway.open()` and `Gateway.close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway.admission import (
    MIN_SERVING_BUDGET_S,
    RETRY_AFTER_S,
    Deadline,
    InFlightLimit,
    ShedReason,
)
from gateway.api_models import (
    PATTERN_MEANINGS,
    ClientEvent,
    ClientEvents,
    ErrorResponse,
    EventsAccepted,
    Health,
    RecommendRequest,
    RecommendResponse,
)
from gateway.attribution import Attribution, NonceSource, RequestIds, UnverifiedRequestId
from gateway.event_sink import DEFAULT_CAPACITY, OPERATION_TIMEOUT_S, DropReason, EventSink
from gateway.events import impression_payload, interaction_payload
from gateway.fallback import PopularityFallback
from gateway.http_server import Request, Response, Routes
from gateway.log_rate_limit import rate_limited_logger
from gateway.metrics import GatewayMetrics
from gateway.openapi import build_openapi
from gateway.pinning import BadPin, pinned_variant
from gateway.request_body import (
    BODY_READ_TIMEOUT_S,
    BodyRefused,
    duplicate_key,
    read_json_body,
)
from gateway.routing import POLL_INTERVAL_S, ReloadResult, RoutingWatcher
from gateway.routing_configmap import ConfigMapRef, ConfigMapRoutingWatcher, KubeApi
from gateway.shadow import Shadow
from gateway.upstream import ServingClient, ServingRejected, ServingUnavailable
from recsys_contracts import __version__
from recsys_contracts.events import TS_BELOW_MIN, InvalidEvent, check_event_ts, now_ms
from recsys_contracts.model_version import FALLBACK_MODEL_VERSION, MODEL_VERSION_PATTERN
from recsys_contracts.routing import Endpoint, Routing
from recsys_contracts.variant_assignment import Variant, analysis_bucket

log = rate_limited_logger(__name__)

# Bodies larger than this are refused with 413: 1000 ids of 256 characters in each
# list of a recommend request fit, and so do 1000 events.
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """Where the routing comes from is exactly one of: `routing_path` (a file, polled:
    local mode, tests) or `routing_configmap` (watched through the Kubernetes API: a
    cluster; the API server is found in the pod, else `kubeconfig` or $KUBECONFIG)."""

    routing_path: Path | None = None
    routing_configmap: ConfigMapRef | None = None
    kubeconfig: Path | None = None
    fallback_items_path: Path | None = None
    event_buffer_capacity: int = DEFAULT_CAPACITY
    # Where unsent events go at shutdown and come back from at start (None: counted as
    # dropped instead).
    event_spill_path: Path | None = None
    routing_poll_interval_s: float = POLL_INTERVAL_S
    pulsar_token: str | None = None  # default: $RECSYS_PULSAR_TOKEN
    # How long the Pulsar client tries (to connect, to look a topic up) before an
    # outage turns into counted drops.
    pulsar_timeout_s: int = OPERATION_TIMEOUT_S
    # Request-id signing keys, current first; default: from the environment (`RequestIds`).
    request_id_keys: tuple[bytes, ...] = ()
    # A request body that has not fully arrived after this long is a 408.
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        if (self.routing_path is None) == (self.routing_configmap is None):
            raise ValueError("give the routing as a file or as a ConfigMap, not both or neither")


RoutingSource = RoutingWatcher | ConfigMapRoutingWatcher


def routing_source(
    settings: GatewaySettings, on_reload: Callable[[ReloadResult], None]
) -> RoutingSource:
    """The routing's watcher; it reads the first routing now (`RoutingError` if it cannot)."""
    if settings.routing_configmap is not None:
        return ConfigMapRoutingWatcher(
            settings.routing_configmap,
            KubeApi.from_environment(settings.kubeconfig),
            on_reload=on_reload,
        )
    assert settings.routing_path is not None  # __post_init__: one of the two
    return RoutingWatcher(
        settings.routing_path, on_reload=on_reload, poll_interval_s=settings.routing_poll_interval_s
    )


class BadInput(Exception):
    """A client mistake, answered with `status` and a message naming the field."""

    def __init__(
        self, status: int, message: str, field: str | None = None, *, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.close = close  # the connection cannot carry another request

    def response(self) -> Response:
        response = json_response(ErrorResponse(error=self.message, field=self.field), self.status)
        response.close = self.close
        return response


class NoFallback(Exception):
    """Serving failed and the fallback has nothing to offer yet."""


class Shed(Exception):
    """Admission control refuses the request (503 at once): see `gateway.admission`."""

    def __init__(self, reason: ShedReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def json_response(body: BaseModel, status: int = 200) -> Response:
    # The serializer's own bytes: `model_dump_json()` would make a str to encode again.
    return Response(status, body.__pydantic_serializer__.to_json(body))


Body = TypeVar("Body")
_ONE_EVENT: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
_EVENT_LIST: TypeAdapter[list[ClientEvent]] = TypeAdapter(ClientEvents)
_RECOMMEND: TypeAdapter[RecommendRequest] = TypeAdapter(RecommendRequest)


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The body as `read_json_body` reads it; BadInput when the client got it wrong."""
    try:
        return await read_json_body(request, timeout_s, max_bytes=MAX_BODY_BYTES)
    except BodyRefused as exc:
        raise BadInput(exc.status, exc.message, close=exc.close_connection) from None


def parse_body(raw: bytes, adapter: TypeAdapter[Body]) -> Body:
    """The validated body, or `BadInput`: 400 when it is not JSON, 422 when it is JSON
    but not a valid request (with the first problem's field)."""
    if not raw.strip():
        raise BadInput(400, "the request has no body; send a JSON object")
    try:
        body = adapter.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise BadInput(400, f"the body is not valid JSON: {first['msg']}") from None
        field = field_path(first["loc"])
        message = first["msg"]
        if first["type"] == "value_error":  # our own validators: their text, unprefixed
            message = str(first.get("ctx", {}).get("error", message))
        elif first["type"] == "string_pattern_mismatch":
            pattern = str(first.get("ctx", {}).get("pattern"))
            message = f"must be {PATTERN_MEANINGS.get(pattern, f'a string matching {pattern}')}"
        elif first["type"] == "greater_than_equal" and first["loc"][-1:] == ("ts",):
            message = TS_BELOW_MIN
        raise BadInput(422, f"{field or 'body'}: {message}", field) from None
    if (twice := duplicate_key(raw)) is not None:
        raise BadInput(400, f"the body names the key {twice!r} twice", twice)
    return body


def check_event_times(events: list[ClientEvent], now: int) -> None:
    """BadInput (422) for an event the feature job would dead-letter for its time: the
    bounds are the event contract's (`check_event_ts`), so a 202 means it is applied."""
    for i, event in enumerate(events):
        if event.ts is None:
            continue
        try:
            check_event_ts(event.ts, now)
        except InvalidEvent as problem:
            where = "ts" if len(events) == 1 else f"[{i}].ts"
            raise BadInput(422, f"{where}: {problem.reason.removeprefix('ts: ')}", where) from None


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """('k',) -> 'k'; (2, 'type') -> '[2].type'; () -> None (the whole body)."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _served_version(reported: str | None, endpoint: Endpoint) -> str:
    """The version the model server says answered, else the one the routing asked for.

    They differ while the stable pods roll to a promoted version (stable is called
    without a version, so each pod answers with the one it holds): impressions, clicks
    and latency then go to the version that really produced them."""
    if (
        reported
        and reported != FALLBACK_MODEL_VERSION
        and re.fullmatch(MODEL_VERSION_PATTERN, reported)
    ):
        return reported
    return endpoint.version


class Gateway:
    """One gateway instance: its routing, serving client, fallback, event sink, metrics."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.routing: RoutingSource = routing_source(
            settings,
            on_reload=lambda result: self.metrics.routing_reloads.labels(result=result.value).inc(),
        )
        self.fallback = (
            PopularityFallback.from_file(settings.fallback_items_path)
            if settings.fallback_items_path
            else PopularityFallback()
        )
        self.serving = ServingClient()
        self.in_flight = InFlightLimit()
        self.shadow = Shadow(self.metrics, self.serving)
        self.events = EventSink(
            self.metrics,
            capacity=settings.event_buffer_capacity,
            token=settings.pulsar_token,
            operation_timeout_s=settings.pulsar_timeout_s,
            spill_path=settings.event_spill_path,
        )
        self.openapi = orjson.dumps(build_openapi(__version__))
        self._watcher: asyncio.Task[None] | None = None
        self.body_read_timeout_s = settings.body_read_timeout_s
        self.event_ids = NonceSource(16)  # an impression's event_id: 32 hex digits
        self.request_ids = (
            RequestIds.with_keys(settings.request_id_keys)
            if settings.request_id_keys
            else RequestIds.from_env()
        )

    def routes(self) -> Routes:
        return {
            "/v1/recommend": {"POST": self.recommend},
            "/v1/events": {"POST": self.post_events},
            "/healthz": {"GET": self.health},
            "/metrics": {"GET": self.metrics_text},
            "/openapi.json": {"GET": self.openapi_document},
        }

    async def open(self) -> None:
        """Before serving: the model-server pool, the event sink, the routing watcher."""
        await self.serving.open()
        self.events.start()
        self._watcher = asyncio.create_task(self.routing.watch(), name="routing-watcher")

    async def close(self) -> None:
        """After serving (the requests in flight done): stop watching, send or spill
        the buffered events."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.shadow.close()
        await self.serving.close()
        await asyncio.to_thread(self.events.close)

    # --- POST /v1/recommend ------------------------------------------------------

    async def recommend(self, request: Request) -> Response:
        started = time.perf_counter()
        # One routing for the whole request, even if it changes meanwhile.
        routing = self.routing.current
        # Admission first, before reading the body: a refusal must cost next to nothing.
        if not self.in_flight.try_enter(routing.max_in_flight):
            return self._shed(routing, ShedReason.IN_FLIGHT)
        in_flight = self.metrics.child(self.metrics.in_flight, routing.system)
        in_flight.set(self.in_flight.count)
        try:
            return await self._admitted(request, routing, started)
        finally:
            self.in_flight.leave()
            in_flight.set(self.in_flight.count)

    def _shed(self, routing: Routing, reason: ShedReason, *, pinned: bool = False) -> Response:
        """503 with Retry-After, counted (in the requests counter with no version: no
        model was asked)."""
        self.metrics.child(self.metrics.shed, routing.system, reason.value).inc()
        counter = self.metrics.pinned_requests if pinned else self.metrics.requests
        self.metrics.child(counter, routing.system, "", "", "503").inc()
        answer = json_response(
            ErrorResponse(
                error="the gateway is overloaded"
                if reason is ShedReason.IN_FLIGHT
                else "the request could not be served within its deadline"
            ),
            503,
        )
        answer.headers = {"Retry-After": str(RETRY_AFTER_S)}
        return answer

    async def _admitted(self, request: Request, routing: Routing, started: float) -> Response:
        try:
            ask = parse_body(await read_body(request, self.body_read_timeout_s), _RECOMMEND)
            k = ask.k if ask.k is not None else routing.default_k
            if k > routing.max_k:
                raise BadInput(422, f"k: must be at most {routing.max_k}, got {k}", "k")
        except BadInput as exc:
            self.metrics.child(self.metrics.requests, routing.system, "", "", str(exc.status)).inc()
            return exc.response()

        try:
            pin = pinned_variant(request.headers, request.cookies)
        except BadPin as exc:
            self.metrics.requests.labels(routing.system, "", "", "400").inc()
            return BadInput(400, str(exc)).response()
        if pin is Variant.CANARY and routing.canary is None:
            self.metrics.pinned_requests.labels(routing.system, "", "canary", "409").inc()
            return json_response(
                ErrorResponse(error="pinned to canary, but no canary is being rolled out now"), 409
            )
        pinned = pin is not None
        variant = pin or routing.variant_for(ask.user_id)
        endpoint = routing.endpoint(variant)
        # Both variants' series exist from the first request after a routing change.
        for each in (Variant.STABLE, Variant.CANARY):
            if each is Variant.STABLE or routing.canary is not None:
                self.metrics.ensure_buckets(
                    routing.system, routing.endpoint(each).version, each.value
                )
        # Failures count against the version the routing chose; answers against the
        # version that actually served them (see `_served_version`).
        version = endpoint.version
        # The serving budget starts once the request has fully arrived (a slow client's
        # upload is the body read timeout's business, not the model's).
        deadline = Deadline(time.perf_counter(), routing.timeout_ms / 1000)
        try:
            recommendation = await self._recommendation(
                routing, endpoint, variant, ask, k, deadline, pinned
            )
            if not recommendation.fallback:
                version = recommendation.model_version
            answer = json_response(recommendation)
        except ServingRejected as exc:
            answer = BadInput(
                exc.status, f"the model refused the request: {exc.message}"
            ).response()
        except Shed as exc:
            return self._shed(routing, exc.reason, pinned=pinned)
        except NoFallback:
            answer = json_response(
                ErrorResponse(error="serving is unavailable and no fallback items are known yet"),
                503,
            )
            answer.headers = {"Retry-After": "1"}
        labels = (routing.system, version, variant.value)
        child = self.metrics.child
        if pinned:  # QA traffic: kept out of what the rollout analysis reads
            child(self.metrics.pinned_requests, *labels, str(answer.status)).inc()
            return answer
        child(self.metrics.request_duration, *labels).observe(time.perf_counter() - started)
        child(self.metrics.requests, *labels, str(answer.status)).inc()
        return answer

    async def _recommendation(
        self,
        routing: Routing,
        endpoint: Endpoint,
        variant: Variant,
        ask: RecommendRequest,
        k: int,
        deadline: Deadline,
        pinned: bool = False,
    ) -> RecommendResponse:
        serving_request = {
            "user_id": ask.user_id,
            "k": k,
            "exclude_item_ids": ask.exclude_item_ids,
            "recent_item_ids": ask.recent_item_ids,
        }
        budget_s = deadline.remaining_s()
        if budget_s < MIN_SERVING_BUDGET_S:
            raise Shed(ShedReason.DEADLINE)
        try:
            served = await self.serving.recommend(
                endpoint.url, serving_request, budget_s, deadline_ms=deadline.wall_ms
            )
            model_version, fallback = _served_version(served.model_version, endpoint), False
            item_ids, scores = served.item_ids[:k], served.scores[:k]
            self.fallback.learn(item_ids)
            if variant is Variant.STABLE and not pinned:
                self.shadow.items.shown(item_ids)
                self.shadow.mirror(routing, serving_request, item_ids)
        except ServingUnavailable as exc:
            if not pinned:
                self.metrics.fallbacks.labels(
                    routing.system, endpoint.version, variant.value, exc.reason.value
                ).inc()
            log.warning("serving %s failed, answering from the fallback: %s", endpoint.url, exc)
            if not self.fallback.known:
                raise NoFallback from exc
            model_version, fallback = FALLBACK_MODEL_VERSION, True
            item_ids, scores = self.fallback.top(k, ask.exclude_item_ids)

        request_id = self.request_ids.issue(variant, model_version, pinned)
        if item_ids:
            if not pinned:  # QA traffic stays out of the analysis
                self.metrics.count_impression(
                    routing.system, model_version, variant.value, analysis_bucket(ask.user_id)
                )
                if not fallback and scores:  # the served-score drift trigger reads these
                    self.metrics.child(
                        self.metrics.served_top_score, routing.system, model_version, variant.value
                    ).observe(max(scores))
            self._publish(
                routing,
                "impressions",
                ask.user_id,
                lambda: impression_payload(
                    event_id=self.event_ids.next_hex(),
                    user_id=ask.user_id,
                    item_ids=item_ids,
                    request_id=request_id,
                    model_version=model_version,
                    ts_ms=now_ms(),
                ),
            )
        return RecommendResponse(
            request_id=request_id,
            model_version=model_version,
            variant=variant,
            item_ids=item_ids,
            scores=scores,
            fallback=fallback,
            pinned=pinned,
        )

    # --- POST /v1/events ---------------------------------------------------------

    async def post_events(self, request: Request) -> Response:
        routing = self.routing.current
        try:
            raw = await read_body(request, self.body_read_timeout_s)
            # One event or a list of them; peeking keeps the error messages about the
            # shape the client meant instead of about both alternatives.
            events = (
                parse_body(raw, _EVENT_LIST)
                if raw.lstrip().startswith(b"[")
                else [parse_body(raw, _ONE_EVENT)]
            )
            received_at_ms = now_ms()
            check_event_times(events, received_at_ms)
            attributions = [
                self._verified(event, i, len(events), routing) for i, event in enumerate(events)
            ]
        except BadInput as exc:
            return exc.response()
        for event, served_by in zip(events, attributions, strict=True):
            if served_by is not None:
                self._count_outcome(routing, event, served_by)
            self._publish(
                routing,
                "interactions",
                event.user_id,
                functools.partial(
                    interaction_payload,
                    event,
                    model_version=served_by.model_version if served_by else None,
                    received_at_ms=received_at_ms,
                ),
            )
        return json_response(EventsAccepted(accepted=len(events)), 202)

    def _count_outcome(self, routing: Routing, event: ClientEvent, served_by: Attribution) -> None:
        """Clicks, dwell and purchases, for the version that served the list (and the
        user's bucket: the bucket of the user who acts, who is the user who was shown it)."""
        if served_by.pinned:  # QA traffic: its clicks are counted apart, never analysed
            if event.type == "click":
                self.metrics.pinned_clicks.labels(
                    routing.system, served_by.model_version, served_by.variant.value
                ).inc()
            return
        labels = (
            routing.system,
            served_by.model_version,
            served_by.variant.value,
            analysis_bucket(event.user_id),
        )
        if event.type == "click":
            self.metrics.clicks.labels(*labels).inc()
            if served_by.variant is Variant.STABLE:
                self.shadow.items.clicked(event.item_id)  # the shadow's predicted CTR learns
        elif event.type == "purchase":
            self.metrics.purchases.labels(*labels).inc()
        elif event.type == "dwell" and event.dwell_ms is not None:
            self.metrics.dwell_seconds.labels(*labels).inc(event.dwell_ms / 1000)

    def _verified(
        self, event: ClientEvent, index: int, count: int, routing: Routing
    ) -> Attribution | None:
        """Who served the answer `event` refers to; BadInput (422, counted) when its
        request id was not signed by this gateway's keys (a forged click)."""
        if event.request_id is None:
            return None
        try:
            return self.request_ids.verify(event.request_id)
        except UnverifiedRequestId as exc:
            self.metrics.unverified_request_ids.labels(routing.system).inc()
            where = "request_id" if count == 1 else f"[{index}].request_id"
            raise BadInput(
                422, f"{where}: {str(exc).removeprefix('request_id: ')}", where
            ) from None

    def _publish(
        self, routing: Routing, stream: str, user_id: str, payload: Callable[[], bytes]
    ) -> None:
        """Hand one event to the sink; an event the contract refuses is a counted drop,
        never an error for the client (who already has its answer)."""
        try:
            encoded = payload()
        except ValidationError as exc:
            self.events.drop(routing.system, DropReason.INVALID_EVENT, str(exc.errors()[0]["msg"]))
            return
        except InvalidEvent as exc:
            self.events.drop(routing.system, DropReason.INVALID_EVENT, exc.reason)
            return
        topic = routing.impressions_topic if stream == "impressions" else routing.interactions_topic
        self.events.publish(
            system=routing.system,
            stream=stream,
            service_url=routing.pulsar_service_url,
            topic=topic,
            key=user_id,
            payload=encoded,
        )

    # --- GET ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        routing = self.routing.current
        return json_response(
            Health(
                status="ok",
                system=routing.system,
                stable_version=routing.stable.version,
                canary_version=routing.canary.version if routing.canary else None,
                canary_weight=routing.effective_canary_weight,
                salt=routing.salt,
            )
        )

    async def metrics_text(self, request: Request) -> Response:
        return Response(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    async def openapi_document(self, request: Request) -> Response:
        return Response(200, self.openapi)
