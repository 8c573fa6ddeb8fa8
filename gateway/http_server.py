"""A lean HTTP/1.1 server for the gateway's few routes: an `asyncio.Protocol` on httptools.

The gateway answers every request in a fraction of a millisecond of its own work, so
the web framework around it was most of its CPU: aiohttp's server spent about as much
per request as the gateway's whole logic (request and response objects, header
multidicts, middleware, the payload streams; benchmarks/README.md, gateway.py). This
server does what the gateway needs and nothing else:

    server = HttpServer({"/v1/recommend": {"POST": recommend}, "/healthz": {"GET": health}})
    await server.start("127.0.0.1", 0)      # server.port: the bound port
    ...
    await server.stop(grace_s=10)           # in-flight requests finish first

- HTTP/1.1 keep-alive (and HTTP/1.0, closed after each answer unless it asks to keep
  it); pipelined requests answered in the order they came; Content-Length and chunked
  request bodies (httptools decodes the chunks).
- A handler gets a `Request` as soon as its head has arrived and awaits
  `request.body(timeout_s)`; a body larger than `max_body_bytes` is `BodyTooLarge`
  (the handler answers 413), one that has not fully arrived in time `TimeoutError`.
- An unknown path is a 404, a method the path does not take a 405 with `Allow` (HEAD
  is answered for GET routes, without the body), a request that is not HTTP a 400, a
  head over 64 KiB a 431 (counted as its bytes arrive, so a header that never ends is
  refused too): each a JSON error (`{"error": ..., "field": null}`), the last two
  closing the connection. A handler that raises, or whose answer cannot be written (not
  a `Response`, a header that is not latin-1), is a logged JSON 500.
- An answer that closes the connection while the client may still be sending (a 413, a
  408, a refused stream) keeps reading and discarding for `LINGER_S` first, so that the
  client sees the answer instead of a connection reset.
- Connections idle longer than `keepalive_s` are dropped (one sweep a second, no timer
  per request). Where the server gives up on a connection (that sweep, the end of a
  linger, the end of `stop`'s grace) it aborts it, dropping unsent answers: a client
  that never reads them would otherwise hold it for ever.

- `Expect: 100-continue` (curl sends it for bodies over 1 KiB) is answered with
  `100 Continue` when the handler starts reading the body; an answer sent before that
  (a 404, a 405, a shed 503) closes the connection, since the client never sends the
  body it announced.

What it does not do, because the gateway's clients do not need it: TLS (a cluster
terminates it in front), HTTP/2, protocol upgrades (the request is answered, then the
connection closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import cast, overload
from urllib.parse import unquote

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
KEEPALIVE_S = 75.0  # aiohttp's default, which the gateway had before
LINGER_S = 1.0
# Requests read ahead of the one being answered on a connection, before it stops reading.
MAX_PIPELINED = 16


class BodyTooLarge(Exception):
    """The request's body is over the server's `max_body_bytes`."""


class BodyIncomplete(Exception):
    """The client closed the connection before its body was complete."""


class Headers(dict[str, str]):
    """Request headers; names are matched without regard to case (stored lower-case).
    A header sent twice holds both values joined by ", "."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    @overload  # type: ignore[override]
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        return dict.get(self, name.lower(), default)


class Request:
    """One request: its head, and its body as it arrives."""

    __slots__ = (
        "_complete",
        "_lost",
        "_parts",
        "_send_continue",
        "_server",
        "_size",
        "_too_large",
        "_waiter",
        "headers",
        "http_1_0",
        "keep_alive",
        "method",
        "path",
        "query",
    )

    def __init__(
        self, server: HttpServer, method: str, target: bytes, headers: Headers, keep_alive: bool
    ) -> None:
        path, _, query = target.partition(b"?")
        self.method = method
        self.path = path.decode("latin-1")
        if "%" in self.path:
            self.path = unquote(self.path)
        self.query = query.decode("latin-1")
        self.headers = headers
        self.keep_alive = keep_alive
        self.http_1_0 = False
        self._server = server
        self._parts: list[bytes] = []
        self._size = 0
        self._complete = False
        self._too_large = False
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None
        # `Expect: 100-continue`: the client sends its body once told to.
        self._send_continue: Callable[[], None] | None = None

    @property
    def content_type(self) -> str:
        """The media type alone, lower-case ('' without a Content-Type)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    @property
    def cookies(self) -> dict[str, str]:
        raw = self.headers.get("cookie")
        if not raw:
            return {}
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return {}
        return {name: morsel.value for name, morsel in jar.items()}

    @property
    def body_complete(self) -> bool:
        return self._complete

    async def body(self, timeout_s: float) -> bytes:
        """The whole body: `BodyTooLarge`, `TimeoutError` when it has not arrived
        within `timeout_s`, `BodyIncomplete` when the client went away first."""
        if not self._complete and not self._too_large and not self._lost:
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self._server.max_body_bytes:
                self._too_large = True
            else:
                if self._send_continue is not None:
                    self._send_continue()
                    self._send_continue = None
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(timeout_s):
                        await self._waiter
                finally:
                    self._waiter = None
        if self._too_large:
            raise BodyTooLarge
        if self._lost:
            raise BodyIncomplete
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)

    # --- fed by the connection -------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._too_large:
            return  # read and dropped: the answer is a 413
        self._size += len(data)
        if self._size > self._server.max_body_bytes:
            self._too_large = True
            self._parts.clear()
            self._wake()
        else:
            self._parts.append(data)

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _lose(self) -> None:
        if not self._complete:
            self._lost = True
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Response:
    """An answer: status, body bytes, their media type, and any further headers."""

    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.close = close  # Connection: close after this answer


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[str, Mapping[str, Handler]]  # path -> method -> handler


def error_body(message: str) -> bytes:
    """The gateway's error shape (`gateway.api_models.ErrorResponse`), written here so
    the server's own refusals need nothing from the app (a gateway test pins the two
    equal)."""
    return json.dumps({"error": message, "field": None}, separators=(",", ":")).encode()


def error_response(status: int, message: str | None = None, *, close: bool = False) -> Response:
    return Response(status, error_body(message or HTTPStatus(status).phrase), close=close)


_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}


class HttpServer:
    """Serves `routes` on one listening socket; see the module docstring."""

    def __init__(
        self,
        routes: Routes,
        *,
        max_body_bytes: int = 1024 * 1024,
        keepalive_s: float = KEEPALIVE_S,
        linger_s: float = LINGER_S,
    ) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.linger_s = linger_s
        self.port = 0
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.date_header = b""
        self._server: asyncio.Server | None = None
        self._clock: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._tick()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let the requests in progress finish (for at most `grace_s`),
        then close every connection."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        self._drained = asyncio.Event()
        for connection in list(self.connections):
            connection.close_when_idle()
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), grace_s)
            except TimeoutError:
                log.warning("%d connections still busy after %.0fs", len(self.connections), grace_s)
        for connection in list(self.connections):
            connection.abort()
        if self._clock is not None:
            self._clock.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if self._drained is not None and not self.connections:
            self._drained.set()

    def _tick(self) -> None:
        """Once a second: the Date header's value, and idle connections closed."""
        now = time.time()
        self.date_header = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        idle_before = time.monotonic() - self.keepalive_s
        for connection in list(self.connections):
            if connection.idle_since is not None and connection.idle_since < idle_before:
                connection.abort()
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle_since: float | None = time.monotonic()
        self._target = b""
        self._headers = Headers()
        self._head_bytes = 0  # what the parser has handed us of the head: URL, headers
        # Raw bytes of the head in progress (None between heads), since a header still
        # arriving is in no callback. Exact when the head began a read; one that began
        # mid-read (after a pipelined request) is counted from the next read on.
        self._head_arrived: int | None = None
        self._read_size = 0  # the read now parsed, while it began between requests
        self._head_too_large = False
        self._parsing: Request | None = None  # the request whose bytes are arriving
        self._current: Request | None = None  # the request being answered
        self._waiting: deque[Request] = deque()
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False  # answer nothing more; close when the current answer is out
        self._discarding = False  # lingering after a closing answer: read and drop
        self._task: asyncio.Task[None] | None = None  # the current request's handler

    # --- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        if self.server.stopping:
            self.close_when_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for request in (self._parsing, self._current, *self._waiting):
            if request is not None:
                request._lose()
        self._waiting.clear()
        self.server.forget(self)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._head_arrived is not None:
            self._head_arrived += len(data)
        between_requests = self._head_arrived is None and self._parsing is None
        self._read_size = len(data) if between_requests else 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._closing = True  # the request is answered; no other protocol follows
        except httptools.HttpParserError as exc:
            if self._head_too_large:
                self._refuse(error_response(431, close=True))
                return
            if isinstance(exc, httptools.HttpParserCallbackError):  # raised by our code
                log.error("error while reading a request", exc_info=exc.__context__)
                self._refuse(error_response(500, "internal error in the gateway", close=True))
            else:
                self._refuse(error_response(400, f"not an HTTP/1.1 request: {exc}", close=True))
            return
        # httptools holds a header until its line ends and only calls on_header then, so
        # one that never ends would be buffered (and copied again on every read) without
        # bound: the raw count refuses it once over MAX_HEAD_BYTES.
        if self._head_arrived is not None and self._head_arrived > MAX_HEAD_BYTES:
            self._refuse(error_response(431, close=True))

    def pause_writing(self) -> None:  # the client does not read its answers
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # --- httptools callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        self._target = b""
        self._headers = Headers()
        self._head_bytes = 0
        # A head that began this read is all of it, if still open at its end.
        self._head_arrived = self._read_size
        self._read_size = 0

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = dict.get(self._headers, key)
        dict.__setitem__(self._headers, key, text if previous is None else f"{previous}, {text}")

    def on_headers_complete(self) -> None:
        self._head_arrived = None
        request = Request(
            self.server,
            self.parser.get_method().decode("latin-1"),
            self._target,
            self._headers,
            self.parser.should_keep_alive(),
        )
        if request.keep_alive and self.parser.get_http_version() == "1.0":
            request.http_1_0 = True
        self._parsing = request
        self.idle_since = None
        if self._headers.get("expect", "").lower() == "100-continue":
            request._send_continue = self._continue
        if self._current is None:
            self._dispatch(request)
        else:
            self._waiting.append(request)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing._feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing._finish()
            self._parsing = None

    def _continue(self) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise ValueError("head too large")  # stops the parser: HttpParserCallbackError

    # --- answering ---------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self._current = request
        methods = self.server.routes.get(request.path)
        if methods is None:
            self._answer(request, error_response(404))
            return
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = ", ".join(sorted({*methods, *(("HEAD",) if "GET" in methods else ())}))
            refusal = error_response(405)
            refusal.headers = {"Allow": allowed}
            self._answer(request, refusal)
            return
        # Held here: the loop keeps only a weak reference to a task.
        self._task = self.loop.create_task(self._run(handler, request))

    async def _run(self, handler: Handler, request: Request) -> None:
        try:
            response = await handler(request)
            answer = self._encode(request, response)  # a bad Response raises here
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            answer = self._encode(request, error_response(500, "internal error in the gateway"))
        try:
            self._send(request, *answer)
        except Exception:  # a bug of ours: do not leave the client waiting for ever
            log.exception("could not answer %s %s", request.method, request.path)
            self.abort()

    def _answer(self, request: Request, response: Response) -> None:
        self._send(request, *self._encode(request, response))

    def _encode(self, request: Request, response: Response) -> tuple[bytes, bool]:
        """The answer's bytes, and whether the connection closes after it."""
        close = response.close or not request.keep_alive or self._closing or self.server.stopping
        if request._send_continue is not None and not request.body_complete:
            # The client still waits for `100 Continue` before it sends its body: on a
            # kept connection its next request would be read as that body (RFC 9110
            # §10.1.1 lets a server close instead of reading it).
            close = True
        body = response.body
        head = [
            _STATUS_LINES.get(response.status)
            or f"HTTP/1.1 {response.status} Unknown\r\n".encode(),
            self.server.date_header,
            b"Content-Type: ",
            response.content_type.encode("latin-1"),
            b"\r\nContent-Length: %d\r\n" % len(body),
        ]
        if response.headers:
            for name, value in response.headers.items():
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if close:
            head.append(b"Connection: close\r\n")
        elif request.http_1_0:  # keep-alive is not its default: say it is kept
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        if request.method != "HEAD":
            head.append(body)
        return b"".join(head), close

    def _send(self, request: Request, answer: bytes, close: bool) -> None:
        transport = self.transport
        self._current = None
        if transport is None:
            return  # the client went away meanwhile
        transport.write(answer)
        if close:
            self._close_after(request)
        elif self._waiting:
            self._dispatch(self._waiting.popleft())
            self._update_reading()
        else:  # a request whose head is still arriving counts as idle
            self.idle_since = time.monotonic()

    def _refuse(self, response: Response) -> None:
        """The byte stream is broken: answer (after what is in progress), read no more
        of it, and close."""
        self._closing = True
        self._discarding = True
        self._waiting.clear()
        if self._parsing is not None:
            self._parsing._lose()  # its handler answers that the body could not be read
            self._parsing = None
        if self._current is None and self.transport is not None:
            self.transport.write(self._head_only(response))
            self._close_after(None)

    def _head_only(self, response: Response) -> bytes:
        return b"".join(
            (
                _STATUS_LINES[response.status],
                self.server.date_header,
                b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(response.body),
                b"Connection: close\r\n\r\n",
                response.body,
            )
        )

    def _close_after(self, request: Request | None) -> None:
        """Close once the answer is out; linger first while the client may still be
        sending (a body, or a stream we refused)."""
        assert self.transport is not None
        self._closing = True
        if self._discarding or (
            request is not None and not request.body_complete and self._parsing is request
        ):
            self._discarding = True  # what else arrives is dropped; the timer closes it
            self.loop.call_later(self.server.linger_s, self.abort)
        else:
            self.transport.close()

    def close_when_idle(self) -> None:
        """Shutdown: close now if nothing is in progress, else after the current answer."""
        self._closing = True
        if self._current is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Give up on the connection now: `close()` would wait for the client to read
        what is still buffered, and one that never reads would keep it for ever."""
        if self.transport is not None:
            self.transport.abort()

    def _update_reading(self) -> None:
        if self.transport is None:
            return
        pause = self._writing_paused or len(self._waiting) >= MAX_PIPELINED
        if pause and not self._reading_paused:
            self.transport.pause_reading()
        elif not pause and self._reading_paused:
            self.transport.resume_reading()
        self._reading_paused = pause
