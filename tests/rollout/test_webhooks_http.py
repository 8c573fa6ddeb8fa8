"""Rollout webhooks over real HTTP: a server on 127.0.0.1 receives the documented payload,
and its answers (2xx, errors with a message, silence, a closed port) become gate results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from recsys_operator.api.recommender_system import RolloutWebhook
from recsys_operator.api.status import CanaryPhase, CanaryStatus
from recsys_operator.launchers.process import free_port
from recsys_operator.rollout.webhooks import HttpWebhooks

CANARY = CanaryStatus(version="2", weight=25, step=1, phase=CanaryPhase.PROGRESSING)


class Receiver:
    """A webhook endpoint: records each POST, answers as told per path."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        path = request.match_info["path"]
        if path == "ok":
            return web.json_response({"message": "all 20 smoke queries answered"})
        if path == "broken":
            return web.json_response(
                {"message": "3 of 20 smoke queries returned no items"}, status=500
            )
        if path == "text":
            return web.Response(text="load test failed:\n  p99 812 ms > 200 ms", status=422)
        if path == "slow":
            await asyncio.sleep(1.5)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/{path}", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield recv, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def hook(url: str, **extra: Any) -> RolloutWebhook:
    return RolloutWebhook.model_validate({"name": "smoke", "type": "rollout", "url": url, **extra})


async def test_a_2xx_passes_and_the_payload_is_the_documented_one(
    receiver: tuple[Receiver, str],
) -> None:
    recv, base = receiver
    call = HttpWebhooks("shop", "prod")
    answer = await call(hook(f"{base}/ok", metadata={"suite": "smoke-v2"}), CANARY, "1")
    assert answer.passed and answer.status_code == 200
    assert answer.message == "HTTP 200: all 20 smoke queries answered"
    assert recv.bodies == [
        {
            "name": "shop",
            "namespace": "prod",
            "type": "rollout",
            "phase": "Progressing",
            "stableVersion": "1",
            "canaryVersion": "2",
            "canaryWeight": 25,
            "step": 1,
            "metadata": {"suite": "smoke-v2"},
        }
    ]
    assert recv.headers[0]["Content-Type"].startswith("application/json")
    assert (await call(hook(f"{base}/empty"), CANARY, "1")).passed  # 204, no body


async def test_an_error_status_fails_with_the_webhooks_own_message(
    receiver: tuple[Receiver, str],
) -> None:
    _, base = receiver
    call = HttpWebhooks("shop", "prod")
    broken = await call(hook(f"{base}/broken"), CANARY, "1")
    assert not broken.passed and broken.status_code == 500
    assert broken.message == "HTTP 500: 3 of 20 smoke queries returned no items"
    text = await call(hook(f"{base}/text"), CANARY, "1")
    assert (text.passed, text.message) == (False, "HTTP 422: load test failed: p99 812 ms > 200 ms")


async def test_no_answer_in_time_fails_and_says_so(receiver: tuple[Receiver, str]) -> None:
    _, base = receiver
    started = asyncio.get_running_loop().time()
    answer = await HttpWebhooks("shop", "prod")(hook(f"{base}/slow", timeout="300ms"), CANARY, "1")
    assert asyncio.get_running_loop().time() - started < 3
    assert not answer.passed and answer.status_code is None
    assert answer.message == "no answer within 300ms"


async def test_nobody_listening_fails_with_the_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/smoke"
    answer = await HttpWebhooks("shop", "prod")(hook(url), CANARY, "1")
    assert not answer.passed and answer.status_code is None
    assert answer.message.startswith("call failed: ") and "127.0.0.1" in answer.message


def test_a_long_answer_is_shortened_for_status() -> None:
    from recsys_operator.rollout.webhooks import MAX_MESSAGE_CHARS, answer_message

    message = answer_message(500, json.dumps({"error": "x" * 5000}).encode())
    assert message.startswith("HTTP 500: xxx") and message.endswith("...")
    assert len(message) <= MAX_MESSAGE_CHARS + len("HTTP 500: ")


def test_webhook_specs_are_checked() -> None:
    from pydantic import ValidationError

    from recsys_operator.api.recommender_system import RolloutSpec

    with pytest.raises(ValidationError, match="exceeds 5m"):
        hook("http://127.0.0.1/x", timeout="10m")
    with pytest.raises(ValidationError, match="repeated: smoke"):
        RolloutSpec.model_validate(
            {"webhooks": [hook("http://a/x").to_wire(), hook("http://b/y").to_wire()]}
        )
    with pytest.raises(ValidationError):
        hook("ftp://127.0.0.1/x")
