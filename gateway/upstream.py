"""The call to the model server (TorchServe's predictions API).

    POST <endpoint url>   {"user_id", "k", "exclude_item_ids", "recent_item_ids"}
                          X-Recsys-Deadline-Ms: when the gateway stops waiting (epoch ms)
    200                   {"item_ids": [...], "scores": [...], "model_version": "..."}
    4xx / 5xx             an error, usually {"code", "type", "message"} from TorchServe

One connection pool per gateway (`gateway.http_pool`) keeps connections to the
serving pods alive between requests. What can go wrong is sorted into two kinds, because the gateway
treats them differently:

- `ServingRejected`: the model refused *this request* (400, 413, 422 — the handler's
  answers to a bad request). The client made the mistake and is told so.
- `ServingUnavailable`: anything else (timeout, connection failure, 5xx — 504 is the
  handler skipping a request past its deadline, counted as a timeout —, a 404 for
  a version that is not loaded, an answer that is not the contract). Not the
  client's fault: the gateway answers from the popularity fallback.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Self

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gateway.http_pool import BadAnswer, ConnectionPool
from recsys_contracts.retrieval_request import DEADLINE_HEADER, DEADLINE_STATUS

# Statuses that mean "your request is wrong" rather than "serving is broken".
CLIENT_ERROR_STATUSES = frozenset({400, 413, 422})
# Keep-alive connections to serving pods; more than the largest burst one replica
# sends concurrently, so bursts do not pay for new TCP handshakes.
MAX_CONNECTIONS = 256
KEEPALIVE_S = 30.0


class FailureReason(StrEnum):
    """The `reason` label of `recsys_gateway_fallbacks_total`."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    SERVER_ERROR = "server_error"  # 5xx
    UNEXPECTED_STATUS = "unexpected_status"  # 404 (version not loaded), 401/403, 429, 3xx...
    BAD_RESPONSE = "bad_response"  # 200 that does not follow the contract


class ServingUnavailable(Exception):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class ServingRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ServingAnswer(BaseModel):
    """A successful answer, checked against the handler's response contract."""

    model_config = ConfigDict(extra="ignore")

    item_ids: list[str]
    scores: list[float]
    model_version: str | None = None

    @model_validator(mode="after")
    def _one_score_per_item(self) -> Self:
        if len(self.item_ids) != len(self.scores):
            raise ValueError(f"{len(self.item_ids)} item_ids but {len(self.scores)} scores")
        return self


class ServingClient:
    """Calls model endpoints over pooled keep-alive connections."""

    def __init__(self) -> None:
        self._pool: ConnectionPool | None = None

    async def open(self) -> None:
        self._pool = ConnectionPool(max_connections=MAX_CONNECTIONS, keepalive_s=KEEPALIVE_S)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def recommend(
        self, url: str, body: dict[str, Any], timeout_s: float, *, deadline_ms: int | None = None
    ) -> ServingAnswer:
        """The model's answer within `timeout_s`; `deadline_ms` (epoch ms) tells the model
        server when the answer stops being worth computing."""
        if self._pool is None:
            raise RuntimeError("ServingClient.open() was not called")
        headers = {DEADLINE_HEADER: str(deadline_ms)} if deadline_ms is not None else {}
        try:
            answer = await self._pool.post(url, orjson.dumps(body), headers, timeout_s)
        except TimeoutError:
            raise ServingUnavailable(
                FailureReason.TIMEOUT, f"no answer within {timeout_s * 1000:.0f} ms"
            ) from None
        except (OSError, BadAnswer, ValueError) as exc:  # ValueError: a URL it cannot use
            raise ServingUnavailable(
                FailureReason.CONNECTION, f"{type(exc).__name__}: {exc}"
            ) from None
        payload, status = answer.body, answer.status
        if status == 200:
            try:
                return ServingAnswer.model_validate_json(payload)
            except ValidationError as exc:
                raise ServingUnavailable(FailureReason.BAD_RESPONSE, _first_error(exc)) from None
        message = error_message(payload, status)
        if status in CLIENT_ERROR_STATUSES:
            raise ServingRejected(status, message)
        if status == DEADLINE_STATUS:
            raise ServingUnavailable(FailureReason.TIMEOUT, f"HTTP {status}: {message}")
        reason = FailureReason.SERVER_ERROR if status >= 500 else FailureReason.UNEXPECTED_STATUS
        raise ServingUnavailable(reason, f"HTTP {status}: {message}")


def error_message(payload: bytes, status: int) -> str:
    """The reason inside an error answer: TorchServe's `message`, or the text itself."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("message", "error", "reason"):
            if isinstance(data.get(key), str) and data[key]:
                return str(data[key])
    text = payload.decode("utf-8", errors="replace").strip()
    return text[:500] or f"HTTP {status} from the model server"


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(body)"
    return f"answer does not follow the contract at {where}: {first['msg']}"
