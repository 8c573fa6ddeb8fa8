"""The gateway's HTTP/1.1 server (`gateway.http_server`) over real sockets on 127.0.0.1:
keep-alive, pipelining, chunked bodies, the body limit and timeout, broken requests,
many clients at once, a shutdown that lets the request in progress finish, and the
clients that must not hold the server: a head that never ends, a client that never
reads, an answer sent before an expected body, a handler whose answer cannot be written.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest

from gateway.http_server import BodyTooLarge, HttpServer, Request, Response

MAX_BODY = 1000
BIG_ANSWER = 4 * 1024 * 1024  # more than loopback's socket buffers hold


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, *, head_request: bool = False) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = 0 if head_request else int(headers["content-length"])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return Answer(int(status_line.split()[1]), headers, body)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


class App:
    """Handlers that show what the server handed them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def echo(self, request: Request) -> Response:
        try:
            body = await request.body(timeout_s=0.5)
        except BodyTooLarge:
            return Response(413, b'{"error":"too large"}', close=True)
        except TimeoutError:
            return Response(408, b'{"error":"too slow"}', close=True)
        delay = float(request.headers.get("X-Delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        return Response(
            200,
            body,
            "application/octet-stream",
            {"X-Path": request.path, "X-Query": request.query},
        )

    async def slow(self, request: Request) -> Response:
        self.started.set()
        await self.release.wait()
        return Response(200, b"finished")

    async def fail(self, request: Request) -> Response:
        raise RuntimeError("a bug")

    async def health(self, request: Request) -> Response:
        return Response(200, b'{"status":"ok"}')

    async def big(self, request: Request) -> Response:
        return Response(200, b"x" * BIG_ANSWER)

    async def bad_header(self, request: Request) -> Response:
        return Response(200, b"{}", headers={"X-Name": "Zoë ☃"})  # not latin-1

    async def not_a_response(self, request: Request) -> Response:
        return b"{}"  # type: ignore[return-value]  # the bug under test


@pytest.fixture
async def app() -> App:
    return App()


@pytest.fixture
async def server(app: App) -> AsyncIterator[HttpServer]:
    server = HttpServer(
        {
            "/echo": {"POST": app.echo},
            "/slow": {"POST": app.slow},
            "/fail": {"GET": app.fail},
            "/healthz": {"GET": app.health},
            "/bad-header": {"GET": app.bad_header},
            "/not-a-response": {"GET": app.not_a_response},
        },
        max_body_bytes=MAX_BODY,
        linger_s=0.2,
    )
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop(grace_s=5)


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


async def test_keep_alive_serves_many_requests_on_one_connection(server: HttpServer) -> None:
    reader, writer = await connect(server)
    for n in range(3):
        writer.write(post(f"/echo?n={n}", b"hello %d" % n))
        answer = await read_answer(reader)
        assert (answer.status, answer.body) == (200, b"hello %d" % n)
        assert answer.headers["x-query"] == f"n={n}"
        assert answer.headers["content-type"] == "application/octet-stream"
        assert "connection" not in answer.headers and "date" in answer.headers
    assert len(server.connections) == 1
    writer.close()


async def test_pipelined_requests_are_answered_in_the_order_sent(server: HttpServer) -> None:
    reader, writer = await connect(server)
    # The first takes longer than the second: its answer must still come first.
    writer.write(post("/echo", b"first", b"X-Delay: 0.1\r\n") + post("/echo", b"second"))
    assert (await read_answer(reader)).body == b"first"
    assert (await read_answer(reader)).body == b"second"
    writer.close()


async def test_a_long_pipeline_is_answered_whole_and_in_order(server: HttpServer) -> None:
    # More than the server reads ahead (it stops reading, then resumes as it answers).
    reader, writer = await connect(server)
    writer.write(b"".join(post("/echo", b"request %d" % n) for n in range(100)))
    for n in range(100):
        assert (await read_answer(reader)).body == b"request %d" % n
    writer.write(post("/echo", b"after"))
    assert (await read_answer(reader)).body == b"after"
    writer.close()


async def test_a_chunked_body_arrives_whole(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello")
    await writer.drain()
    await asyncio.sleep(0.05)  # the rest later, as a streaming client sends it
    writer.write(b"\r\n6\r\n world\r\n0\r\n\r\n")
    answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"hello world")
    writer.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_refused_and_the_connection_closed(
    server: HttpServer, chunked: bool
) -> None:
    reader, writer = await connect(server)
    big = b"x" * (MAX_BODY + 1)
    if chunked:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
        )
    else:
        writer.write(post("/echo", big))
    answer = await read_answer(reader)
    assert answer.status == 413 and answer.headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()


async def test_a_body_that_stops_arriving_times_out(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\nonly part")
    loop = asyncio.get_running_loop()
    sent = loop.time()
    answer = await read_answer(reader)
    assert answer.status == 408 and 0.4 <= loop.time() - sent < 3
    assert await closed_by_server(reader)  # after lingering for the rest of the body
    writer.close()


@pytest.mark.parametrize(
    "garbage",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /healthz HTTP/1.1\r\nNo colon\r\n\r\n"],
)
async def test_a_request_that_is_not_http_is_a_400_and_closes(
    server: HttpServer, garbage: bytes
) -> None:
    reader, writer = await connect(server)
    writer.write(garbage)
    answer = await read_answer(reader)
    assert answer.status == 400 and answer.json()["error"]
    assert answer.headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()


async def test_a_huge_head_is_a_431(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    answer = await read_answer(reader)
    assert answer.status == 431 and answer.json()["error"]
    writer.close()


async def test_unknown_paths_and_methods_are_json_errors(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    missing = await read_answer(reader)
    assert (missing.status, missing.json()) == (404, {"error": "Not Found", "field": None})
    writer.write(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
    wrong = await read_answer(reader)
    assert wrong.status == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == "Method Not Allowed"
    writer.write(b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n")
    bug = await read_answer(reader)
    assert (bug.status, bug.json()["error"]) == (500, "internal error in the gateway")
    # HEAD on a GET route: the GET's head, no body; the connection still in step.
    writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await read_answer(reader, head_request=True)
    assert head.status == 200 and head.headers["content-length"] == str(len(b'{"status":"ok"}'))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await read_answer(reader)).json() == {"status": "ok"}
    writer.close()


async def test_http_1_0_is_closed_after_its_answer(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()


async def test_many_clients_at_once_each_get_their_own_answers(server: HttpServer) -> None:
    async def client(n: int) -> list[bytes]:
        reader, writer = await connect(server)
        bodies = []
        for i in range(10):
            writer.write(post("/echo", b"client %d request %d" % (n, i)))
            bodies.append((await read_answer(reader)).body)
        writer.close()
        return bodies

    results = await asyncio.gather(*(client(n) for n in range(32)))
    for n, bodies in enumerate(results):
        assert bodies == [b"client %d request %d" % (n, i) for i in range(10)]


async def test_stop_lets_the_request_in_progress_finish(app: App, server: HttpServer) -> None:
    reader, writer = await connect(server)
    idle_reader, idle_writer = await connect(server)
    writer.write(post("/slow", b"{}"))
    await asyncio.wait_for(app.started.wait(), 5)
    stopping = asyncio.create_task(server.stop(grace_s=5))
    await asyncio.sleep(0.1)
    assert not stopping.done()  # waiting for the slow request
    assert await closed_by_server(idle_reader)  # an idle connection is closed at once
    with pytest.raises(OSError):  # no longer listening
        await connect(server)
    app.release.set()
    answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"finished")
    assert answer.headers["connection"] == "close"
    await asyncio.wait_for(stopping, 5)
    writer.close()
    idle_writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive(app: App) -> None:
    server = HttpServer({"/healthz": {"GET": app.health}}, keepalive_s=0.3)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await connect(server)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_answer(reader)).status == 200
        assert await closed_by_server(reader)  # within the sweep after 0.3 s idle
        writer.close()
    finally:
        await server.stop(grace_s=1)


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    server: HttpServer,
) -> None:
    reader, writer = await connect(server)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"hello")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # the connection is kept
    assert (await read_answer(reader)).status == 200
    writer.close()


async def test_http_1_0_that_asks_for_keep_alive_is_told_it_is_kept(server: HttpServer) -> None:
    reader, writer = await connect(server)
    for _ in range(2):
        writer.write(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.headers["connection"] == "keep-alive"
    writer.close()


@pytest.mark.parametrize("size", [70_000, 1_000_000])  # in one read, and in several
async def test_one_header_that_never_ends_is_a_431_and_others_are_still_served(
    server: HttpServer, size: int
) -> None:
    reader, writer = await connect(server)
    # One header value, never ended: httptools holds it until its end.
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * size)
    answer = await read_answer(reader)
    assert answer.status == 431 and answer.json()["error"]
    assert answer.headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()
    other_reader, other_writer = await connect(server)
    other_writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await read_answer(other_reader)).status == 200
    other_writer.close()


async def test_a_head_under_the_limit_is_served_however_it_arrives(server: HttpServer) -> None:
    reader, writer = await connect(server)
    writer.write(post("/echo", b"first"))  # the big head begins mid-read after it
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
    for start in range(0, len(head), 10_000):  # one read each
        writer.write(head[start : start + 10_000])
        await writer.drain()
        await asyncio.sleep(0.02)
    assert (await read_answer(reader)).body == b"first"
    assert (await read_answer(reader)).status == 200
    writer.write(head)  # now beginning a read
    assert (await read_answer(reader)).status == 200
    writer.close()


def client_that_never_reads(server: HttpServer) -> socket.socket:
    """Asks for 16 MiB of answers through a 4 KiB receive buffer and reads none."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", server.port))
    client.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * 4)
    return client


async def connections_gone(server: HttpServer, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return not server.connections


async def test_a_client_that_never_reads_is_dropped_by_the_keepalive_sweep(app: App) -> None:
    server = HttpServer({"/big": {"GET": app.big}}, keepalive_s=0.3)
    await server.start("127.0.0.1", 0)
    client = client_that_never_reads(server)
    try:
        await asyncio.sleep(0.2)
        assert len(server.connections) == 1  # answered, its answers still unread
        assert await connections_gone(server, within_s=3)  # 0.3 s idle, then the sweep
    finally:
        client.close()
        await server.stop(grace_s=1)


async def test_a_client_that_never_reads_is_dropped_by_stop(app: App) -> None:
    server = HttpServer({"/big": {"GET": app.big}})  # the sweep would wait 75 s
    await server.start("127.0.0.1", 0)
    client = client_that_never_reads(server)
    try:
        await asyncio.sleep(0.2)
        assert len(server.connections) == 1
        await asyncio.wait_for(server.stop(grace_s=0.3), 5)
        assert await connections_gone(server, within_s=1)
    finally:
        client.close()


@pytest.mark.parametrize(("path", "status"), [("/nope", 404), ("/healthz", 405)])
async def test_an_answer_before_an_expected_body_closes_the_connection(
    server: HttpServer, path: str, status: int
) -> None:
    """The client waits for `100 Continue` and never sends its body: were the
    connection kept, the server would read the client's next request as that body."""
    reader, writer = await connect(server)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\nExpect: 100-continue\r\n\r\n"
        % path.encode()
    )
    answer = await read_answer(reader)
    assert answer.status == status and answer.headers["connection"] == "close"
    assert await closed_by_server(reader)
    writer.close()
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await read_answer(reader)).status == 200
    writer.close()


@pytest.mark.parametrize("path", ["/bad-header", "/not-a-response"])
async def test_an_answer_that_cannot_be_written_is_a_500(server: HttpServer, path: str) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    answer = await read_answer(reader)
    assert (answer.status, answer.json()["error"]) == (500, "internal error in the gateway")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # still in step
    assert (await read_answer(reader)).status == 200
    writer.close()
