"""Overload: at three times what serving sustains, the gateway sheds with fast 503s
instead of collapsing into slow fallbacks, and recovers when the burst ends.

The serving stub is given bounded capacity (2 workers x 25 ms: 80 req/s); an open-loop
client on 127.0.0.1 offers 240 req/s for 3 s (720 requests, a fixed count).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import requests
from gateway_testing import SYSTEM, StartGateway, metric_value, routing_document
from serving_stub import ServingStub

WORKERS, SERVICE_S = 2, 0.025
SUSTAINABLE_RPS = WORKERS / SERVICE_S
OFFERED_RPS = 3 * SUSTAINABLE_RPS
BURST_S = 3.0
TIMEOUT_MS = 250  # the routing's serving timeout: the served requests' p99 target
MAX_IN_FLIGHT = 4


async def burst(url: str, rate: float, count: int) -> list[tuple[int, float, bool]]:
    """(status, seconds, fallback) of `count` requests started at `rate` a second, each
    on schedule whether or not earlier ones have been answered (an open loop, as users are)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> tuple[int, float, bool]:
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/recommend",
                json={"user_id": f"user-{n % 50}", "k": 5},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as answer:
                body = await answer.json()
                fallback = answer.status == 200 and bool(body.get("fallback"))
                if answer.status == 503:
                    assert answer.headers["Retry-After"] == "1"
                return answer.status, time.perf_counter() - started, fallback

        tasks = []
        begin = time.perf_counter()
        for n in range(count):
            delay = begin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        return await asyncio.gather(*tasks)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_three_times_the_sustainable_rate_is_shed_fast_and_served_on_time(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    document = routing_document(serving, timeout_ms=TIMEOUT_MS)
    document["maxInFlight"] = MAX_IN_FLIGHT
    gateway = start_gateway(document)
    assert http.post(f"{gateway.url}/v1/recommend", json={"user_id": "warm"}).status_code == 200
    serving.limit(WORKERS, SERVICE_S)

    results = asyncio.run(burst(gateway.url, OFFERED_RPS, int(OFFERED_RPS * BURST_S)))

    served = [seconds for status, seconds, fallback in results if status == 200 and not fallback]
    shed = [seconds for status, seconds, _ in results if status == 503]
    fallbacks = sum(fallback for _, _, fallback in results)
    assert len(served) + len(shed) + fallbacks == len(results)  # nothing else (no 5xx, no 4xx)
    # Goodput near what serving sustains (a loaded machine gets some slack), the rest shed.
    assert len(served) >= 0.5 * SUSTAINABLE_RPS * BURST_S
    assert len(shed) >= 0.3 * len(results)
    assert fallbacks <= 0.05 * len(results)  # overload is not answered with fallbacks
    assert p99(served) < TIMEOUT_MS / 1000
    assert p99(shed) < 0.1  # at once, never a multi-second wait
    # Serving computed about what was served: no abandoned work piling up there.
    assert serving.computed <= len(served) + fallbacks + MAX_IN_FLIGHT
    metrics = http.get(f"{gateway.url}/metrics", timeout=10).text
    assert metric_value(metrics, "recsys_gateway_shed_total", system=SYSTEM) == len(shed)
    assert metric_value(metrics, "recsys_gateway_requests_total", code="503") == len(shed)
    assert metric_value(metrics, "recsys_gateway_in_flight", system=SYSTEM) == 0

    # After the burst, load within capacity is served in full and on time again.
    after = asyncio.run(burst(gateway.url, SUSTAINABLE_RPS / 2, 40))
    assert all(status == 200 and not fallback for status, _, fallback in after)
    assert p99([seconds for _, seconds, _ in after]) < TIMEOUT_MS / 1000


def test_the_model_server_is_told_the_deadline_and_skips_what_outlived_it(
    serving: ServingStub, start_gateway: StartGateway, http: requests.Session
) -> None:
    # One worker of 200 ms behind a 100 ms timeout: the second request of a pair waits
    # past its deadline in the stub's queue, and is skipped there, not computed.
    gateway = start_gateway(routing_document(serving, timeout_ms=100))
    assert http.post(f"{gateway.url}/v1/recommend", json={"user_id": "warm"}).status_code == 200
    serving.limit(1, 0.2)
    results = asyncio.run(burst(gateway.url, 100.0, 2))
    assert [status for status, _, _ in results] == [200, 200]
    assert all(fallback for _, _, fallback in results)  # both past the 100 ms timeout
    assert all(seconds < 0.2 for _, seconds, _ in results)
    time.sleep(0.5)  # the stub finishes the first and reaches the second
    assert (serving.computed, serving.skipped_expired) == (1, 1)
