"""A stand-in for TorchServe's predictions API, on 127.0.0.1 in a thread.

Run as a script (`python tests/gateway_http/serving_stub.py PORT`) it serves in the
foreground, for `benchmarks/gateway.py`.

It follows the contract the real handler follows (`recsys_contracts.retrieval_request`
checks each request, so a bad one gets TorchServe's 400 body), answers
`POST /predictions/<model>/<version>` with items that depend on the version and the
user, and can be told to be slow or to fail, per version, for the fallback tests.

`limit(workers, service_s)` makes it a server of bounded capacity, as TorchServe is:
`workers` requests computed at once, each taking `service_s`, the rest queued (so it
sustains `workers / service_s` requests a second). Like the real handler it skips, with
a 504, requests whose `X-Recsys-Deadline-Ms` passed while they were queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from recsys_contracts.retrieval_request import (
    DEADLINE_HEADER,
    DEADLINE_STATUS,
    BadRequest,
    deadline_passed,
    decode_body,
    parse_request,
)

MAX_K = 50
CATALOGUE = 500


@dataclass
class Behaviour:
    delay_s: float = 0.0
    status: int = 200  # anything else: answer with TorchServe's error body
    message: str = "stub failure"


def stub_items(version: str, user_id: str | None, k: int, exclude: set[str]) -> list[str]:
    """Deterministic per (version, user): different versions recommend different items."""
    seed = int.from_bytes(hashlib.blake2b(f"{version}/{user_id}".encode(), digest_size=4).digest())
    items: list[str] = []
    n = 0
    while len(items) < k and n < CATALOGUE:
        item = f"item-{(seed + n * 7) % CATALOGUE}"
        n += 1
        if item not in exclude:
            items.append(item)
    return items


class ServingStub:
    def __init__(self, model_name: str = "recs") -> None:
        self.model_name = model_name
        self.behaviour: dict[str, Behaviour] = {}
        self.requests: deque[tuple[str, dict[str, Any]]] = deque(maxlen=1000)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.app = web.Application()
        self.app.router.add_post("/predictions/{model}/{version}", self._predict)
        # Without a version TorchServe answers with the model's default version: what a
        # pod holds, which during a rolling update differs from pod to pod.
        self.default_version = "1"
        self.app.router.add_post("/predictions/{model}", self._predict)
        self._runner = web.AppRunner(self.app, access_log=None)
        self._workers: asyncio.Semaphore | None = None  # None: unbounded capacity
        self._service_s = 0.0
        self.computed = 0  # requests that got a worker (bounded capacity only)
        self.skipped_expired = 0

    def limit(self, workers: int, service_s: float) -> None:
        """Bounded capacity from now on (see the module docstring)."""

        async def install() -> None:  # the semaphore belongs to the stub's loop
            self._workers = asyncio.Semaphore(workers)
            self._service_s = service_s

        asyncio.run_coroutine_threadsafe(install(), self._loop).result(timeout=10)

    def url(self, version: str) -> str:
        return f"http://127.0.0.1:{self.port}/predictions/{self.model_name}/{version}"

    def set(self, version: str, **behaviour: Any) -> None:
        self.behaviour[version] = Behaviour(**behaviour)

    def reset(self) -> None:
        self.behaviour.clear()
        self.requests.clear()

    def default_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predictions/{self.model_name}"

    async def _predict(self, request: web.Request) -> web.Response:
        version = request.match_info.get("version", self.default_version)
        if request.match_info["model"] != self.model_name:
            return _torchserve_error(404, "Model not found")
        if self._workers is not None:
            async with self._workers:
                if deadline_passed(request.headers.get(DEADLINE_HEADER), _now_ms()):
                    self.skipped_expired += 1
                    return _torchserve_error(DEADLINE_STATUS, "deadline passed")
                self.computed += 1
                await asyncio.sleep(self._service_s)
        behaviour = self.behaviour.get(version, Behaviour())
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.status != 200:
            return _torchserve_error(behaviour.status, behaviour.message)
        try:
            ask = parse_request(decode_body(await request.read()), max_k=MAX_K)
        except BadRequest as exc:
            return _torchserve_error(exc.status, exc.reason)
        self.requests.append((version, {"user_id": ask.user_id, "k": ask.k}))
        items = stub_items(version, ask.user_id, ask.k, set(ask.exclude_item_ids))
        scores = [round(1.0 - i / (ask.k + 1), 6) for i in range(len(items))]
        return web.json_response({"item_ids": items, "scores": scores, "model_version": version})

    def start(self) -> ServingStub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site.port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _torchserve_error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"code": status, "type": "StubError", "message": message}, status=status
    )


if __name__ == "__main__":
    import sys

    # serving_stub.py PORT [WORKERS SERVICE_MS]: the latter two bound its capacity.
    stub = ServingStub()
    if len(sys.argv) > 3:
        stub._workers = asyncio.Semaphore(int(sys.argv[2]))
        stub._service_s = float(sys.argv[3]) / 1000
    web.run_app(stub.app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
