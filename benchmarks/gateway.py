"""What the gateway costs, and how fast a routing change takes effect.

1. Added latency: the same recommendation requests sent straight to the model server
   and through the gateway (`python -m gateway run`, its own process, with a real
   pulsar-lite broker taking its impression events), at concurrency 1 and 32; p50,
   p99, the difference and the ratio; throughput through the gateway / direct; CPU per
   request of the gateway process (all its threads), of the stub and of the load
   generator (a thin raw-socket client, see `load`). Direct and gateway runs alternate
   in rounds so that load from elsewhere on the machine hits both alike; the per-round
   spread is printed too.
2. Weight change and rollback: requests run continuously while the routing file is
   rewritten (canary weight 0 -> 100, then canary removed); the time from the write
   to the last answer that still followed the old routing.
3. Overload: a serving stub of bounded capacity (2 workers x 20 ms: 100 req/s) behind
   two gateways, one with admission control (`maxInFlight` 4) and one without it in
   effect (`maxInFlight` 100000, the peer), each offered 3x that rate, open loop, for a
   few seconds: goodput (model answers within the 250 ms timeout per second), shed rate
   (fast 503s), fallback rate, p99 of the served requests and of the 503s.

The model server is a real TorchServe serving two versions of a tiny two-tower +
FAISS archive (trained and packed here with the project's trainer and archiver)
when Java is available, else the serving stub of the tests (`--upstream stub`).

    .venv/bin/python benchmarks/gateway.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/gateway.py --quick    # a smoke run: fewer requests, 1 trial
    .venv/bin/python benchmarks/gateway.py --upstream stub --quick   # seconds, no Java
    .venv/bin/python benchmarks/gateway.py --upstream stub --latency-only --requests 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.pulsar_broker import broker_process, service_url
from recsys_operator.tools import ToolNotFound, find_tool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder lives with the tests
MODEL = "recs"
K = 10
USERS = [f"u{n}" for n in range(1000)]


# --- the model server ------------------------------------------------------------


def start_torchserve(work: Path, stack: ExitStack) -> tuple[dict[str, str], int | None]:
    """A tiny model, packed as versions 1 and 2, served by TorchServe on 127.0.0.1."""
    from tiny_model import TinyModel, pack

    from model_handlers.synthetic import SyntheticConfig
    from model_handlers.training import TrainingConfig
    from recsys_operator.api.recommender_system import ServingSpec
    from recsys_operator.launchers.torchserve import torchserve_server

    tiny = TinyModel(
        world=SyntheticConfig(users=1000, items=2000, sessions_per_user=2),
        training=TrainingConfig(dim=32, hidden=64, max_epochs=1, max_eval_users=200, threads=1),
    )
    model_dir = tiny.write(work / "model")
    store = pack({"1": model_dir, "2": model_dir}, work / "store", name=MODEL, top_k=50)
    server = torchserve_server(
        work / "torchserve",
        model=store.model_spec("2"),
        serving=ServingSpec(),
        model_store=store.path,
        versions=["1", "2"],
    )
    server.start(timeout=180)
    stack.callback(server.stop)
    # No server pid: its CPU is spread over the frontend (Java) and worker processes.
    return {version: server.predictions_url(version) for version in ("1", "2")}, None


def start_stub(work: Path, stack: ExitStack) -> tuple[dict[str, str], int | None]:
    port = free_port()
    stub = ManagedProcess(
        "serving-stub",
        [sys.executable, str(ROOT / "tests" / "gateway_http" / "serving_stub.py"), str(port)],
        work / "stub.log",
        port,
    ).start()
    stack.callback(stub.stop)
    urls = {v: f"http://127.0.0.1:{port}/predictions/{MODEL}/{v}" for v in ("1", "2")}
    return urls, stub.pid


# --- routing and gateway ---------------------------------------------------------


def routing(urls: dict[str, str], pulsar: str, *, canary: bool, weight: int) -> dict[str, Any]:
    return {
        "system": "bench.recs",
        "stable": {"version": "1", "url": urls["1"]},
        "canary": {"version": "2", "url": urls["2"]} if canary else None,
        "canaryWeight": weight if canary else 0,
        "salt": "bench:2",
        "timeoutMs": 2000,  # latency is measured, not cut short by the fallback
        "defaultK": K,
        "maxK": 50,
        "pulsarServiceUrl": pulsar,
        "interactionsTopic": "persistent://public/default/bench-interactions",
        "impressionsTopic": "persistent://public/default/bench-impressions",
    }


def write_routing(path: Path, document: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, path)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (Linux /proc)."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def loop_thread_cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread (the gateway's event loop): the rest of
    `cpu_seconds` is its other threads' (the event sink's sender, the Pulsar client's)."""
    return cpu_seconds_of(Path(f"/proc/{pid}/task/{pid}/stat"))


def cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(
    work: Path, routing_path: Path, stack: ExitStack, name: str = "gateway"
) -> tuple[str, int]:
    port = free_port()
    gateway = ManagedProcess(
        name,
        [sys.executable, "-m", "gateway", "run", "--routing", str(routing_path),
         "--port", str(port), "--log-level", "WARNING"],
        work / f"{name}.log",
        port,
    ).start()  # fmt: skip
    stack.callback(gateway.stop)
    assert gateway.pid is not None
    return f"http://127.0.0.1:{port}", gateway.pid


# --- load --------------------------------------------------------------------------


@dataclass
class Run:
    latencies_s: list[float]
    wall_s: float

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.wall_s


def request_bytes(url: str, body: dict[str, Any]) -> bytes:
    """One complete HTTP/1.1 keep-alive POST of `body` to `url`, ready to write."""
    parsed = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def load(url: str, requests: int, concurrency: int) -> Run:
    """`requests` POSTs of random users' recommend requests from `concurrency`
    keep-alive connections, each sending its next request when the answer is in.

    A deliberately thin client (requests encoded once, up front; answers read by their
    Content-Length and checked for a 200, nothing parsed): on two shared cores the load
    generator competes with what it measures, and an HTTP client library would spend
    about as much CPU per request as the gateway does."""
    parsed = urlsplit(url)
    bodies = [request_bytes(url, {"user_id": user, "k": K}) for user in USERS]
    latencies: list[float] = []
    remaining = iter(range(requests))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        try:
            for _ in remaining:
                started = time.perf_counter()
                writer.write(random.choice(bodies))
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{url}: {head.splitlines()[0]!r}")
                length = head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
                await reader.readexactly(int(length))
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return Run(latencies, time.perf_counter() - started)


def random_request() -> dict[str, Any]:
    # The same body suits both: the gateway's request is a superset of the handler's.
    return {"user_id": random.choice(USERS), "k": K}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def added_latency(
    direct_url: str,
    gateway_url: str,
    pids: dict[str, int],
    requests: int,
    rounds: int = 3,
) -> dict[str, Any]:
    """Direct and through the gateway, alternating in `rounds` rounds per concurrency.

    CPU per request is each process's user + system time (/proc/PID/stat) over the
    requests of its own runs: the gateway's (event loop and Pulsar client threads)
    over the gateway runs; the stub's and this load generator's over the direct runs."""
    gateway = f"{gateway_url}/v1/recommend"
    results: dict[str, Any] = {}
    for concurrency in (1, 32):
        per_round = max(concurrency, requests // rounds)
        direct = Run([], 0.0)
        through = Run([], 0.0)
        await load(direct_url, 4 * concurrency, concurrency)  # warm up
        await load(gateway, 4 * concurrency, concurrency)
        cpu = {"gateway": 0.0, "gateway_loop": 0.0, "stub": 0.0, "load": 0.0}
        per_round_figures: dict[str, list[float]] = {
            "rps_ratio": [], "added_p50_ms": [], "gateway_cpu_ms": []
        }  # fmt: skip
        for _ in range(rounds):
            stub_before, load_before = cpu_seconds(pids["stub"]), cpu_seconds(os.getpid())
            d = await load(direct_url, per_round, concurrency)
            cpu["stub"] += cpu_seconds(pids["stub"]) - stub_before
            cpu["load"] += cpu_seconds(os.getpid()) - load_before
            gateway_before = cpu_seconds(pids["gateway"])
            loop_before = loop_thread_cpu_seconds(pids["gateway"])
            g = await load(gateway, per_round, concurrency)
            gateway_round_s = cpu_seconds(pids["gateway"]) - gateway_before
            cpu["gateway_loop"] += loop_thread_cpu_seconds(pids["gateway"]) - loop_before
            cpu["gateway"] += gateway_round_s
            per_round_figures["rps_ratio"].append(g.rps / d.rps)
            per_round_figures["added_p50_ms"].append(1000 * (g.percentile(0.5) - d.percentile(0.5)))
            per_round_figures["gateway_cpu_ms"].append(1000 * gateway_round_s / len(g.latencies_s))
            direct = Run(direct.latencies_s + d.latencies_s, direct.wall_s + d.wall_s)
            through = Run(through.latencies_s + g.latencies_s, through.wall_s + g.wall_s)
        row: dict[str, Any] = {
            "requests": len(direct.latencies_s),
            # What the gateway process itself spends, insensitive to other load on the
            # machine (as far as caches and frequency allow).
            "gateway_cpu_ms_per_request": 1000 * cpu["gateway"] / len(through.latencies_s),
            "gateway_loop_cpu_ms_per_request": 1000
            * cpu["gateway_loop"]
            / len(through.latencies_s),
            "stub_cpu_ms_per_request": 1000 * cpu["stub"] / len(direct.latencies_s),
            "load_cpu_ms_per_request": 1000 * cpu["load"] / len(direct.latencies_s),
            "rps_ratio": through.rps / direct.rps,
            "rounds": {name: spread(values) for name, values in per_round_figures.items()},
        }
        for name, run in (("direct", direct), ("gateway", through)):
            row[name] = {
                "p50_ms": 1000 * run.percentile(0.50),
                "p99_ms": 1000 * run.percentile(0.99),
                "rps": run.rps,
            }
        for q in ("p50_ms", "p99_ms"):
            row[f"added_{q}"] = row["gateway"][q] - row["direct"][q]
            row[f"ratio_{q.removesuffix('_ms')}"] = row["gateway"][q] / row["direct"][q]
        results[f"concurrency_{concurrency}"] = row
    return results


async def time_to_follow(
    gateway_url: str,
    routing_path: Path,
    before: dict[str, Any],
    after: dict[str, Any],
    new_variant: str,
) -> float:
    """Seconds from writing `after` until the last answer that still followed `before`."""
    write_routing(routing_path, before)
    users = USERS[:50]
    async with aiohttp.ClientSession() as session:

        async def variant_of(user: str) -> tuple[float, str]:
            sent = time.monotonic()
            async with session.post(
                f"{gateway_url}/v1/recommend", json={"user_id": user, "k": 1}
            ) as r:
                return sent, (await r.json())["variant"]

        # Wait until the gateway follows `before` (it polls the file).
        deadline = time.monotonic() + 10
        while any(v == new_variant for _, v in await asyncio.gather(*map(variant_of, users[:8]))):
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway never applied the starting routing")
        write_routing(routing_path, after)
        written = time.monotonic()
        last_old = written
        quiet_since = None
        deadline = written + 10
        while time.monotonic() < deadline:
            answers = await asyncio.gather(*(variant_of(random.choice(users)) for _ in range(8)))
            old = [sent for sent, v in answers if v != new_variant]
            if old:
                last_old = max(last_old, *old)
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:  # a full second of the new routing
                return last_old - written
        raise RuntimeError("the gateway did not follow the new routing within 10 s")


# --- main --------------------------------------------------------------------------


# --- overload ------------------------------------------------------------------------

STUB_WORKERS, STUB_SERVICE_MS = 2, 20
SUSTAINABLE_RPS = STUB_WORKERS * 1000 / STUB_SERVICE_MS
OVERLOAD_TIMEOUT_MS = 250


async def open_loop(url: str, rate: float, count: int) -> list[tuple[int, float, bool]]:
    """(status, seconds, fallback) of `count` requests started on a fixed schedule."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> tuple[int, float, bool]:
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/recommend", json=random_request(), timeout=aiohttp.ClientTimeout(30)
            ) as response:
                body = await response.json()
                fallback = response.status == 200 and bool(body.get("fallback"))
                return response.status, time.perf_counter() - started, fallback

        tasks = []
        begin = time.perf_counter()
        for n in range(count):
            delay = begin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        return await asyncio.gather(*tasks)


def overload_figures(results: list[tuple[int, float, bool]], seconds: float) -> dict[str, float]:
    def p99_ms(values: list[float]) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if values else 0.0

    served = [t for status, t, fallback in results if status == 200 and not fallback]
    shed = [t for status, t, _ in results if status == 503]
    fallbacks = sum(fallback for _, _, fallback in results)
    return {
        "goodput_rps": len(served) / seconds,
        "shed_share": len(shed) / len(results),
        "fallback_share": fallbacks / len(results),
        "served_p99_ms": p99_ms(served),
        "shed_p99_ms": p99_ms(shed),
        "all_p99_ms": p99_ms([t for _, t, _ in results]),
    }


def overload(
    work: Path, stack: ExitStack, pulsar: str, seconds: float
) -> dict[str, dict[str, float]]:
    port = free_port()
    stub = ManagedProcess(
        "limited-stub",
        [sys.executable, str(ROOT / "tests" / "gateway_http" / "serving_stub.py"), str(port),
         str(STUB_WORKERS), str(STUB_SERVICE_MS)],
        work / "limited-stub.log",
        port,
    ).start()  # fmt: skip
    stack.callback(stub.stop)
    urls = {v: f"http://127.0.0.1:{port}/predictions/{MODEL}/{v}" for v in ("1", "2")}
    figures = {}
    for name, max_in_flight in (("admission_off", 100_000), ("admission_on", 4)):
        document = routing(urls, pulsar, canary=False, weight=0)
        document |= {"timeoutMs": OVERLOAD_TIMEOUT_MS, "maxInFlight": max_in_flight}
        path = work / f"routing-{name}.json"
        write_routing(path, document)
        url, _ = start_gateway(work, path, stack, name=f"gateway-{name}")
        asyncio.run(open_loop(url, SUSTAINABLE_RPS / 2, 20))  # warm: the fallback learns items
        rate = 3 * SUSTAINABLE_RPS
        figures[name] = overload_figures(
            asyncio.run(open_loop(url, rate, int(rate * seconds))), seconds
        )
        time.sleep(1.0)  # the stub drains what the previous gateway left queued
    return figures


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for the load generator where it is installed (less of its CPU taken from
    what it measures), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _spread(figures: dict[str, float], spec: str) -> str:
    return f"{figures['median']:{spec}} [{figures['min']:{spec}} to {figures['max']:{spec}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", choices=["auto", "torchserve", "stub"], default="auto")
    parser.add_argument("--requests", type=int, default=1500, help="per path and concurrency")
    parser.add_argument("--trials", type=int, default=5, help="weight changes and rollbacks each")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 requests, 1 trial")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--latency-only", action="store_true", help="phase 1 only (no routing or overload)"
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.trials = 200, 1
    upstream = args.upstream
    if upstream == "auto":
        try:
            find_tool("java")
            upstream = "torchserve"
        except ToolNotFound:
            upstream = "stub"

    random.seed(0)
    started = time.monotonic()
    print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        print(f"upstream: {upstream}; machine: {os.cpu_count()} CPUs, {platform.python_version()}")
        urls, server_pid = (
            start_torchserve(work, stack) if upstream == "torchserve" else start_stub(work, stack)
        )
        broker = broker_process(work).start()
        stack.callback(broker.stop)
        pulsar = service_url(broker)
        routing_path = work / "routing.json"
        write_routing(routing_path, routing(urls, pulsar, canary=False, weight=0))
        gateway_url, gateway_pid = start_gateway(work, routing_path, stack)
        print(f"set up in {time.monotonic() - started:.0f}s")

        pids = {"gateway": gateway_pid, "stub": server_pid or gateway_pid}
        with asyncio.Runner(loop_factory=_fast_loop()) as runner:
            latency = runner.run(added_latency(urls["1"], gateway_url, pids, args.requests))
        if server_pid is None:  # TorchServe: no one process to read the server's CPU from
            for row in latency.values():
                row["stub_cpu_ms_per_request"] = None
        for name, row in latency.items():
            d, g = row["direct"], row["gateway"]
            print(
                f"{name:>15}: direct p50 {d['p50_ms']:6.2f} ms p99 {d['p99_ms']:6.2f} ms "
                f"({d['rps']:5.0f}/s) | gateway p50 {g['p50_ms']:6.2f} ms p99 {g['p99_ms']:6.2f} ms "
                f"({g['rps']:5.0f}/s) | added p50 {row['added_p50_ms']:+.2f} ms "
                f"p99 {row['added_p99_ms']:+.2f} ms | ratio p50 {row['ratio_p50']:.2f} p99 {row['ratio_p99']:.2f} "
                f"| gateway CPU {row['gateway_cpu_ms_per_request']:.3f} ms/request "
                f"(event loop {row['gateway_loop_cpu_ms_per_request']:.3f}, other threads "
                f"{row['gateway_cpu_ms_per_request'] - row['gateway_loop_cpu_ms_per_request']:.3f})"
            )
            stub_cpu = row["stub_cpu_ms_per_request"]
            rounds = row["rounds"]
            print(
                f"{'':>15}  per round (median [min-max] of 3): throughput "
                f"gateway/direct {_spread(rounds['rps_ratio'], '.2f')}, added p50 "
                f"{_spread(rounds['added_p50_ms'], '+.2f')} ms, gateway CPU "
                f"{_spread(rounds['gateway_cpu_ms'], '.3f')} ms/request | CPU per direct "
                f"request: server {'-' if stub_cpu is None else f'{stub_cpu:.3f}'} ms, "
                f"load generator {row['load_cpu_ms_per_request']:.3f} ms"
            )

        if args.latency_only:
            print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
            if args.json:
                args.json.write_text(json.dumps({"upstream": upstream, "latency": latency}))
            return
        no_canary = routing(urls, pulsar, canary=False, weight=0)
        canary_0 = routing(urls, pulsar, canary=True, weight=0)
        canary_100 = routing(urls, pulsar, canary=True, weight=100)
        weight_changes, rollbacks = [], []
        for _ in range(args.trials):
            weight_changes.append(
                asyncio.run(
                    time_to_follow(gateway_url, routing_path, canary_0, canary_100, "canary")
                )
            )
            rollbacks.append(
                asyncio.run(
                    time_to_follow(gateway_url, routing_path, canary_100, no_canary, "stable")
                )
            )
        follow = {
            "weight_change_s": {
                "median": statistics.median(weight_changes),
                "max": max(weight_changes),
            },
            "rollback_s": {"median": statistics.median(rollbacks), "max": max(rollbacks)},
            "trials": args.trials,
        }
        for name, figures in follow.items():
            if isinstance(figures, dict):
                print(f"{name:>15}: median {figures['median']:.2f} s, max {figures['max']:.2f} s")
        overload_s = 2.0 if args.quick else 5.0
        shedding = overload(work, stack, pulsar, overload_s)
        print(
            f"overload: {3 * SUSTAINABLE_RPS:.0f} req/s offered for {overload_s:.0f} s to a "
            f"stub sustaining {SUSTAINABLE_RPS:.0f} req/s (timeout {OVERLOAD_TIMEOUT_MS} ms)"
        )
        for name, f in shedding.items():
            print(
                f"{name:>15}: goodput {f['goodput_rps']:.0f} req/s, shed {100 * f['shed_share']:.0f}%, "
                f"fallback {100 * f['fallback_share']:.0f}%, served p99 {f['served_p99_ms']:.0f} ms, "
                f"503 p99 {f['shed_p99_ms']:.0f} ms, all p99 {f['all_p99_ms']:.0f} ms"
            )
        on, off = shedding["admission_on"], shedding["admission_off"]
        print(
            f"{'admission':>15}: goodput ratio on/off "
            f"{on['goodput_rps'] / max(off['goodput_rps'], 1e-9):.2f}, all p99 ratio on/off "
            f"{on['all_p99_ms'] / max(off['all_p99_ms'], 1e-9):.2f}"
        )
        gateway_log = "".join(log.read_text() for log in work.glob("gateway*.log"))
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"total {time.monotonic() - started:.0f}s")
    if "Traceback" in gateway_log:
        print("gateway log has tracebacks:\n" + gateway_log[-3000:])
    if args.json:
        args.json.write_text(
            json.dumps(
                {"upstream": upstream, "latency": latency, "routing": follow, "overload": shedding},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
