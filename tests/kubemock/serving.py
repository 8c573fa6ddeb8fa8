"""Serve a kmock handler over real HTTP on 127.0.0.1, from a thread with its own event loop.

Tests are synchronous (the kubernetes client, kubectl, Kopf in another thread), so the
emulators cannot share the test's event loop: a blocking client call would stall the
server it waits for. Each emulator gets a daemon thread running `kmock.Server` on a
free port; the test talks to it over HTTP and reads its request log.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import kmock

Handler = TypeVar("Handler", bound=kmock.RawHandler)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class ServerThread(Generic[Handler]):
    """`make_handler()` is called in the server's thread, so kmock's primitives bind there."""

    def __init__(
        self,
        make_handler: Callable[[], Handler],
        *,
        name: str,
        before_stop: Callable[[Handler], Awaitable[None]] | None = None,
    ) -> None:
        self._make_handler = make_handler
        self._before_stop = before_stop  # e.g. end long-lived responses, which delay a stop
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self.handler: Handler
        self.url = ""  # http://127.0.0.1:PORT, once started

    def start(self) -> ServerThread[Handler]:
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise TimeoutError(f"{self._thread.name} did not start in {START_TIMEOUT}s")
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name} failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} did not stop in {STOP_TIMEOUT}s")
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name} failed") from self._error

    def call(self, action: Callable[[Handler], Awaitable[None]]) -> None:
        """Run `action(handler)` on the server's event loop and wait for it."""
        assert self._loop is not None, "not started"
        future = asyncio.run_coroutine_threadsafe(action(self.handler), self._loop)
        future.result(STOP_TIMEOUT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() or stop(), in the test's thread
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self.handler = self._make_handler()
        # kmock.Server binds 127.0.0.1 on a free port by default.
        async with self.handler, kmock.Server(self.handler) as server:
            self.url = str(server.url).rstrip("/")
            self._started.set()
            await self._stopping.wait()
            if self._before_stop is not None:
                await self._before_stop(self.handler)
