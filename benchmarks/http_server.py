"""The gateway's HTTP server by itself, against aiohttp's web server as the peer.

Each runs in a process of its own on uvloop with one trivial route, `POST /x`: read the
body, answer a 90-byte JSON recommendation list from memory. The load generator is the
thin raw-socket client of `benchmarks/gateway.py` (`load`); the two servers are loaded in
alternating rounds, so that other load on the machine hits both alike. Printed per
concurrency (1 and 32): CPU per request of each server process (user + system,
/proc/PID/stat), requests per second, and the ratio lean / aiohttp.

    .venv/bin/python benchmarks/http_server.py            # seconds
    .venv/bin/python benchmarks/http_server.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import uvloop

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on the import path, and its gateway.py would
# shadow the gateway package.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    del sys.path[0]
ANSWER = b'{"item_ids":["a","b","c","d","e","f","g","h","i","j"],"scores":[1,1,1,1,1,1,1,1,1,1]}'
SERVERS = ("lean", "aiohttp")


def _gateway_benchmark() -> ModuleType:
    """benchmarks/gateway.py as a module (its name would be taken by the gateway package)."""
    spec = importlib.util.spec_from_file_location(
        "gateway_benchmark", ROOT / "benchmarks" / "gateway.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def serve(kind: str, port: int) -> None:
    if kind == "lean":
        from gateway.http_server import HttpServer, Request, Response

        async def lean_answer(request: Request) -> Response:
            await request.body(10.0)
            return Response(200, ANSWER)

        server = HttpServer({"/x": {"POST": lean_answer}})
        await server.start("127.0.0.1", port)
    else:
        from aiohttp import web

        async def aiohttp_answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=ANSWER, content_type="application/json")

        app = web.Application()
        app.router.add_post("/x", aiohttp_answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=3000, help="per server, round and concurrency"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 requests, 1 round")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve[0], int(args.serve[1])))
        return
    if args.quick:
        args.requests, args.rounds = 300, 1
    bench = _gateway_benchmark()
    from recsys_operator.launchers.process import free_port

    print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    processes: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for kind in SERVERS:
            port = free_port()
            command = [sys.executable, __file__, "--serve", kind, str(port)]
            processes[kind] = (subprocess.Popen(command), f"http://127.0.0.1:{port}/x")
        for _, url in processes.values():
            _wait_until_listening(url)
        for concurrency in (1, 32):
            cpu: dict[str, list[float]] = {kind: [] for kind in SERVERS}
            rps: dict[str, list[float]] = {kind: [] for kind in SERVERS}
            for _, url in processes.values():
                uvloop.run(bench.load(url, 4 * concurrency, concurrency))  # warm up
            for _ in range(args.rounds):
                for kind, (process, url) in processes.items():
                    before = bench.cpu_seconds(process.pid)
                    run = uvloop.run(bench.load(url, args.requests, concurrency))
                    spent = bench.cpu_seconds(process.pid) - before
                    cpu[kind].append(1000 * spent / len(run.latencies_s))
                    rps[kind].append(run.rps)
            lean, peer = statistics.median(cpu["lean"]), statistics.median(cpu["aiohttp"])
            print(
                f"concurrency {concurrency:>2}: CPU per request lean {lean:.3f} ms "
                f"[{min(cpu['lean']):.3f}-{max(cpu['lean']):.3f}], aiohttp {peer:.3f} ms "
                f"[{min(cpu['aiohttp']):.3f}-{max(cpu['aiohttp']):.3f}], ratio "
                f"{lean / max(peer, 1e-9):.2f} | requests/s lean {statistics.median(rps['lean']):.0f}, "
                f"aiohttp {statistics.median(rps['aiohttp']):.0f}"
            )
    finally:
        for process, _ in processes.values():
            process.terminate()
            process.wait(timeout=10)
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def _wait_until_listening(url: str, timeout_s: float = 20.0) -> None:
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((where.hostname, where.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    main()
