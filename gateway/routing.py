"""The routing: which model versions serve, in what shares, and where events go.

The operator renders it into a ConfigMap (`recsys_operator.render.gateway.gateway_routing`)
that gateways in a cluster watch through the Kubernetes API
(`gateway.routing_configmap`); local mode writes it to a file that `RoutingWatcher`
polls. Its shape:

    {"system": "ns.name",
     "stable": {"version": "1", "url": "http://.../predictions/NAME/1"},
     "canary": null | {"version": "2", "url": "..."},
     "canaryWeight": 0..100, "shadowPercent": 0..100, "salt": "...", "timeoutMs": 250,
     "defaultK": 50, "maxK": 50,
     "pulsarServiceUrl": "pulsar://...",
     "interactionsTopic": "persistent://...", "impressionsTopic": "persistent://..."}

Weight changes and rollbacks reach running gateways through this document alone (no pod
restart), so a new version is applied as soon as it parses. One that cannot be read or
does not validate is reported and ignored: the gateway keeps serving with the last good
routing, because a half-written or broken routing must never take traffic down.
`RoutingState` holds these rules for every source.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.assignment import Variant, assign_variant
from gateway.attribution import FALLBACK_MODEL_VERSION, MODEL_VERSION_PATTERN

log = logging.getLogger(__name__)

# The gateway's part of the delay between a written file and its routing in force (the
# rollout promises every replica follows a change within 5 s).
POLL_INTERVAL_S = 0.5


class Endpoint(BaseModel):
    """One model version and the TorchServe URL that serves it."""

    model_config = ConfigDict(frozen=True)

    version: str = Field(pattern=MODEL_VERSION_PATTERN)
    url: str = Field(pattern=r"^https?://\S+$")

    @field_validator("version")
    @classmethod
    def _not_the_fallback_marker(cls, version: str) -> str:
        if version == FALLBACK_MODEL_VERSION:
            raise ValueError(f"{version!r} is reserved for responses from the popularity fallback")
        return version


class Routing(BaseModel):
    """One valid routing file. Field names follow the file (camelCase aliases).

    Unknown fields are ignored, so an operator that adds a field does not break the
    gateways still running the previous release.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    system: str = Field(min_length=1)
    stable: Endpoint
    canary: Endpoint | None = None
    canary_weight: int = Field(default=0, ge=0, le=100, alias="canaryWeight")
    # Share of stable answers mirrored to the canary in a shadow phase (`gateway.shadow`).
    shadow_percent: int = Field(default=0, ge=0, le=100, alias="shadowPercent")
    salt: str = ""
    timeout_ms: int = Field(default=250, ge=1, le=60_000, alias="timeoutMs")
    default_k: int = Field(default=50, ge=1, alias="defaultK")
    max_k: int = Field(default=50, ge=1, le=1000, alias="maxK")
    pulsar_service_url: str | None = Field(default=None, alias="pulsarServiceUrl")
    interactions_topic: str | None = Field(default=None, alias="interactionsTopic")
    impressions_topic: str | None = Field(default=None, alias="impressionsTopic")

    @model_validator(mode="after")
    def _default_k_within_max(self) -> Self:
        if self.default_k > self.max_k:
            raise ValueError(f"defaultK ({self.default_k}) exceeds maxK ({self.max_k})")
        return self

    @property
    def effective_canary_weight(self) -> int:
        """The canary's share in percent; 0 whenever there is no canary."""
        return self.canary_weight if self.canary is not None else 0

    def variant_for(self, user_id: str) -> Variant:
        return assign_variant(self.salt, user_id, self.effective_canary_weight)

    def endpoint(self, variant: Variant) -> Endpoint:
        if variant is Variant.CANARY and self.canary is not None:
            return self.canary
        return self.stable


class RoutingError(ValueError):
    """The routing could not be read or is not a valid routing."""

    def __init__(self, message: str, result: ReloadResult) -> None:
        super().__init__(message)
        self.result = result


class ReloadResult(StrEnum):
    """The `result` label of `recsys_gateway_routing_reloads_total`."""

    OK = "ok"
    INVALID = "invalid"  # read, but not JSON or not a valid routing
    UNREADABLE = "unreadable"  # missing, no permission, or the API server unreachable


def parse_routing(text: bytes | str) -> Routing:
    """A routing from its JSON text; `RoutingError` says what is wrong."""
    try:
        return Routing.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(file)"
        raise RoutingError(
            f"invalid routing at {where}: {first['msg']} ({exc.error_count()} error(s))",
            ReloadResult.INVALID,
        ) from None


def read_routing_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RoutingError(f"cannot read {path}: {exc}", ReloadResult.UNREADABLE) from None


def load_routing(path: Path) -> Routing:
    """Read and validate the routing file at `path`; `RoutingError` says what is wrong."""
    return parse_routing(read_routing_file(path))


class RoutingState:
    """The routing in force, and the rules for replacing it, whatever the source.

    A source hands over every text it reads (`offer`) and says when it cannot read one
    (`unavailable`). A new text is parsed once; whatever the outcome it is not looked
    at again until it changes, so a broken routing is logged and counted once, not on
    every poll or event. An unavailable source is reported once per outage (until the
    next text is offered). In every case but a valid new text the routing stays.
    """

    def __init__(
        self,
        first: bytes | str,
        *,
        origin: str,
        on_reload: Callable[[ReloadResult], None] = lambda result: None,
    ) -> None:
        self.origin = origin  # for log lines: "routing file /etc/...", "ConfigMap ns/name"
        self._on_reload = on_reload
        # The first routing must be valid: a gateway that never had one cannot serve.
        self.current: Routing = parse_routing(first)
        self._last_text = _as_bytes(first)
        self._unavailable = False

    def offer(self, text: bytes | str) -> ReloadResult | None:
        """Apply `text` if it changed and is valid; what happened, or None when unchanged."""
        self._unavailable = False
        text = _as_bytes(text)
        if text == self._last_text:
            return None
        self._last_text = text
        try:
            routing = parse_routing(text)
        except RoutingError as exc:
            log.error("%s rejected, keeping the last good routing: %s", self.origin, exc)
            self._on_reload(exc.result)
            return exc.result
        previous, self.current = self.current, routing
        log.info("routing reloaded from %s: %s", self.origin, describe_change(previous, routing))
        self._on_reload(ReloadResult.OK)
        return ReloadResult.OK

    def unavailable(self, reason: str) -> ReloadResult | None:
        """The source cannot give a routing now; reported the first time of an outage."""
        if self._unavailable:
            return None
        self._unavailable = True
        log.error("keeping the last good routing: %s", reason)
        self._on_reload(ReloadResult.UNREADABLE)
        return ReloadResult.UNREADABLE


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode() if isinstance(text, str) else text


class RoutingWatcher:
    """The routing from a file, re-read every `poll_interval_s`.

    The file is read on every poll and compared byte for byte with the last read:
    it is small, and mtime alone misses two writes within one timestamp tick.
    """

    def __init__(
        self,
        path: Path,
        *,
        on_reload: Callable[[ReloadResult], None] = lambda result: None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._state = RoutingState(
            read_routing_file(path), origin=f"routing file {path}", on_reload=on_reload
        )

    @property
    def current(self) -> Routing:
        return self._state.current

    def check(self) -> ReloadResult | None:
        """Look at the file once; apply it if it changed and is valid.

        Returns what happened, or None when nothing changed.
        """
        try:
            text = read_routing_file(self.path)
        except RoutingError as exc:
            return self._state.unavailable(str(exc))
        return self._state.offer(text)

    async def watch(self) -> None:
        """Poll until cancelled. Reading a few hundred bytes of a local file is
        faster than handing it to a thread, so this stays on the event loop."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self.check()


def describe_change(before: Routing, after: Routing) -> str:
    def variants(routing: Routing) -> str:
        canary = routing.canary.version if routing.canary else "none"
        return (
            f"stable={routing.stable.version} canary={canary} "
            f"weight={routing.effective_canary_weight} salt={routing.salt!r}"
        )

    return f"{variants(before)} -> {variants(after)}"
