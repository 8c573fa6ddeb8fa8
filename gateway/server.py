"""Running the gateway: in the foreground (the CLI), or in a background thread.

# a process of its own (what `recsys gateway run` and `python -m gateway run` do)
run_gateway(settings, host="127.0.0.1", port=8000)

# in-process, e.g. local mode, tests, benchmarks: its own event loop in a thread
with GatewayThread(settings) as gw:        # port 0: a free port is chosen
    requests.post(f"{gw.url}/v1/recommend", json={"user_id": "u1"})
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from types import TracebackType

import uvloop

from gateway.app import MAX_BODY_BYTES, Gateway, GatewaySettings
from gateway.http_server import HttpServer
from gateway.metrics import GatewayMetrics
from recsys_contracts.env_vars import GatewayEnv

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# "HOST:PORT"; the Kubernetes Deployment sets 0.0.0.0:8000 (pods must listen on all
# interfaces), everything else defaults to loopback.
ADDRESS_ENV = GatewayEnv.ADDRESS
SHUTDOWN_GRACE_S = 10.0


def listen_address(host: str | None, port: int | None) -> tuple[str, int]:
    """Explicit options first, then $RECSYS_GATEWAY_ADDRESS, then 127.0.0.1:8000."""
    env_host, env_port = DEFAULT_HOST, DEFAULT_PORT
    address = os.environ.get(ADDRESS_ENV, "").strip()
    if address:
        env_host, sep, port_text = address.rpartition(":")
        if not sep or not env_host or not port_text.isdigit():
            raise ValueError(f"{ADDRESS_ENV} must be HOST:PORT, got {address!r}")
        env_port = int(port_text)
    return host or env_host, port if port is not None else env_port


class _Serving:
    """A gateway and its HTTP server, started and stopped together on one event loop."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.http = HttpServer(gateway.routes(), max_body_bytes=MAX_BODY_BYTES)

    async def start(self, host: str, port: int) -> int:
        await self.gateway.open()
        await self.http.start(host, port)
        return self.http.port

    async def stop(self) -> None:
        """Drain: stop listening, let in-flight requests finish, then the buffered events."""
        await self.http.stop(SHUTDOWN_GRACE_S)
        await self.gateway.close()


def run_gateway(settings: GatewaySettings, *, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then drain: in-flight requests, then buffered events."""
    serving = _Serving(Gateway(settings))
    routing = serving.gateway.routing.current
    log.info(
        "gateway for %s on http://%s:%d (stable %s, canary %s at %d%%)",
        routing.system,
        host,
        port,
        routing.stable.version,
        routing.canary.version if routing.canary else "none",
        routing.effective_canary_weight,
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serving.start(host, port)
        await stop.wait()
        log.info("stopping: draining requests in flight, then events")
        await serving.stop()

    # uvloop: the event loop's own share of each request (socket reads and writes,
    # callbacks, timers) costs a fraction of asyncio's pure-Python loop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


class GatewayThread:
    """A gateway on its own event loop in a daemon thread, listening on `host:port`."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.gateway = Gateway(settings, metrics)
        self._serving = _Serving(self.gateway)
        self.host = host
        self.port = port
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> GatewayThread:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            self._serving.start(self.host, self.port), self._loop
        )
        self.port = started.result(timeout=30)  # the bound one, also when 0 asked for any
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        stopped = asyncio.run_coroutine_threadsafe(self._serving.stop(), self._loop)
        stopped.result(timeout=SHUTDOWN_GRACE_S + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
