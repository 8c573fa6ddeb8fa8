"""Rollout webhooks: the HTTP checks a rollout calls at its gates.

The wire contract (documented in docs/concepts.md): an HTTP POST with a JSON body

    {"name": "shop", "namespace": "default", "type": "pre-rollout",
     "phase": "PreRollout", "stableVersion": "1", "canaryVersion": "2",
     "canaryWeight": 0, "step": 0, "metadata": {...the webhook's spec.metadata...}}

A 2xx answer passes; any other status, a timeout or a failed connection fails. The
body of the answer (its `message` or `error` field when it is a JSON object, else
its text) is kept, shortened, as the webhook's message in status and Events.

The state machine receives a `WebhookCaller`, as it receives its analysis source, so
its tests script the answers; the operator and local mode both use `HttpWebhooks`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from recsys_contracts.api_base import parse_duration
from recsys_operator import __version__
from recsys_operator.api.recommender_system import RolloutWebhook
from recsys_operator.api.status import CanaryStatus

MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class WebhookAnswer:
    passed: bool
    status_code: int | None  # None: no answer (timeout, connection refused)
    message: str


WebhookCaller = Callable[[RolloutWebhook, CanaryStatus, str], Awaitable[WebhookAnswer]]
"""Call one webhook about `canary` (the stable version is the third argument)."""


def webhook_payload(
    name: str, namespace: str, hook: RolloutWebhook, canary: CanaryStatus, stable_version: str
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "type": hook.type.value,
        "phase": canary.phase.value,
        "stableVersion": stable_version,
        "canaryVersion": canary.version,
        "canaryWeight": canary.weight,
        "step": canary.step,
        "metadata": dict(hook.metadata),
    }


def answer_message(status: int, body: bytes) -> str:
    """What the webhook said: a JSON object's `message` or `error`, else the text."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for key in ("message", "error"):
            if isinstance(parsed.get(key), str):
                text = parsed[key]
                break
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return f"HTTP {status}" + (f": {text}" if text else "")


class HttpWebhooks:
    """Calls webhooks over HTTP on behalf of one RecommenderSystem."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace

    async def __call__(
        self, hook: RolloutWebhook, canary: CanaryStatus, stable_version: str
    ) -> WebhookAnswer:
        payload = webhook_payload(self.name, self.namespace, hook, canary, stable_version)
        timeout = parse_duration(hook.timeout)
        headers = {"User-Agent": f"recsys-operator/{__version__}"}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.post(hook.url, json=payload, headers=headers) as response,
            ):
                body = await response.read()
        except TimeoutError:
            return WebhookAnswer(False, None, f"no answer within {hook.timeout}")
        except (aiohttp.ClientError, OSError) as exc:
            return WebhookAnswer(False, None, f"call failed: {exc}")
        message = answer_message(response.status, body)
        return WebhookAnswer(200 <= response.status < 300, response.status, message)


async def no_webhooks(
    hook: RolloutWebhook, canary: CanaryStatus, stable_version: str
) -> WebhookAnswer:
    """For callers that cannot call webhooks: every webhook fails, saying so."""
    return WebhookAnswer(False, None, "this rollout driver cannot call webhooks")
