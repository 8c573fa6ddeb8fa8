"""The whole local system under load, and what real-time features are worth.

Runs `recsys up` (pulsar-lite, Redis, TorchServe, the stream feature job, the gateway
and Prometheus, every listener on 127.0.0.1) on a manifest written here from
examples/quickstart.yaml (no archiveUri: the model is trained on the synthetic world,
once, and reused from the run folder's cache by every later `up`), then drives it with
simulated users from that world: each visit is a `view` of an item drawn from the
user's current (drifted) interests, sent to POST /v1/events, then `--think-ms` later a
POST /v1/recommend (k=10) and at most one click, drawn with the world's ground-truth
click probability. Requests are open-loop at a fixed rate, from one asyncio client in
this process (it shares the CPUs with everything it measures).

1. Latency and errors at fixed request rates (default 50, 200, 500 recommendations/s,
   each after a warm-up at the same rate): p50/p99 at the client, answers that were
   the gateway's popularity fallback, errors, visits shed (more than MAX_OUTSTANDING
   requests in flight) and how late the client sent (its schedule lag).
2. Event-to-feature freshness (p50/p99) and stream-job events/s under each load, from
   the job's histogram `recsys_feature_freshness_seconds` in the local Prometheus.
3. The value of real time: CTR with the stream feature job ON and OFF (`recsys up
   --no-features`: Redis stays empty and the handler uses the user tower on the
   user id alone), same model, same rate, same visits in the same order with the
   same random draws (common random numbers); the system is restarted between arms.
   A third arm keeps the feature job but turns `spec.features.onlineUpdates` off, so
   the handler feeds the store's recent items to the user tower instead of using the
   online embedding. Uplift against OFF with a 95% confidence interval (two-proportion
   normal approximation, unpooled; also the paired difference over visits both arms
   answered). The **ceiling** is the ground truth's best list for each answered visit
   (the K items of highest click probability for the user now); each arm reports the
   share of it its lists reach, and each uplift the share of OFF's gap to it closed.

Ratios compare against baselines in the same run: latency at each rate against the
lowest rate, CTR ON against OFF, and (full run) latency at 200/s with the feature job
against without it.

    .venv/bin/python benchmarks/end_to_end.py            # about 7 minutes on 2 cores
    .venv/bin/python benchmarks/end_to_end.py --quick    # a smoke run, about a minute
    .venv/bin/python benchmarks/end_to_end.py --run-dir /tmp/e2e --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import requests
import yaml
from ctr_ratio import Z95, relative_ctr_change

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_NAME = "e2e"
K = 10
REQUEST_TIMEOUT_S = 5.0
MAX_OUTSTANDING = 256  # HTTP requests in flight; a visit due beyond this is shed
UP_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 120.0
SETTLE_S = 4.0  # after a phase: two Prometheus scrapes (every 2 s) see its last events
QUICK_ITEMS = 500

STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


# --- the system --------------------------------------------------------------------


def write_manifest(path: Path, *, num_items: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    body["metadata"]["name"] = SYSTEM_NAME
    body["spec"]["model"].pop("archiveUri", None)  # train on the synthetic world
    if num_items is not None:  # a smaller catalogue trains in seconds
        body["spec"]["model"]["numItems"] = num_items
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return body


def recsys(*args: str, timeout: float) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "recsys_operator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"recsys {args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def up(manifest: Path, run_dir: Path, *, features: bool) -> dict[str, Any]:
    started = time.monotonic()
    say(f"recsys up, feature job {'ON' if features else 'OFF'} ({manifest.name})")
    args = ["up", "-f", str(manifest), "--run-dir", str(run_dir)]
    output = recsys(*args, *([] if features else ["--no-features"]), timeout=UP_TIMEOUT_S)
    for line in output.splitlines():
        if "epoch" in line or "training" in line or "archive" in line:
            say(f"  {line.strip()}")
    state: dict[str, Any] = json.loads((run_dir / "state.json").read_text())
    say(
        f"up in {time.monotonic() - started:.0f}s, feature job {'ON' if features else 'OFF'}: "
        + ", ".join(sorted(state["parts"]))
    )
    return state


def down(run_dir: Path) -> None:
    if not (run_dir / "state.json").is_file():
        return
    started = time.monotonic()
    try:
        recsys("down", "--run-dir", str(run_dir), timeout=DOWN_TIMEOUT_S)
        say(f"down in {time.monotonic() - started:.0f}s")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        say(f"warning: recsys down: {exc}")


def clock_ticks_by_group() -> dict[int, int]:
    """CPU clock ticks (user + system) of every live process, summed per process group."""
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgid = int(fields[2])
        ticks[pgid] = ticks.get(pgid, 0) + int(fields[11]) + int(fields[12])
    return ticks


class CpuMeter:
    """CPU seconds per part of the local system (each part leads its own process group),
    the supervisor, and this process (the load generator)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.groups = {name: part["pid"] for name, part in state["parts"].items() if part["pid"]}
        self.groups["supervisor"] = state["supervisor"]["pid"]
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float]:
        ticks = clock_ticks_by_group()
        out = {name: ticks.get(pgid, 0) / self.tick for name, pgid in self.groups.items()}
        out["load generator"] = time.process_time()
        return out

    @staticmethod
    def share(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
        """Cores used per part over the interval (2.0 = both cores of dev-2c)."""
        return {name: (after[name] - before.get(name, 0.0)) / wall_s for name in after}


def prometheus_scalar(prometheus: str, query: str, at: float) -> float:
    try:
        answer = requests.get(
            f"{prometheus}/api/v1/query", params={"query": query, "time": f"{at:.3f}"}, timeout=5
        ).json()
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else math.nan
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return math.nan


def prometheus_figures(prometheus: str, start: float, end: float) -> dict[str, float]:
    """What the system's own metrics say about [start, end] (wall clock)."""
    at = end + SETTLE_S  # events sent just before `end` are written and scraped by then
    window = f"{math.ceil(at - start)}s"
    seconds = end - start

    def q(expr: str) -> float:
        return prometheus_scalar(prometheus, expr, at)

    freshness = f"sum by (le) (increase(recsys_feature_freshness_seconds_bucket[{window}]))"
    gateway = f"sum by (le) (increase(recsys_gateway_request_duration_seconds_bucket[{window}]))"
    handled = q(f"sum(increase(recsys_handler_batch_size_sum[{window}]))")
    batches = q(f"sum(increase(recsys_handler_batch_size_count[{window}]))")
    return {
        "freshness_p50_ms": 1000 * q(f"histogram_quantile(0.5, {freshness})"),
        "freshness_p99_ms": 1000 * q(f"histogram_quantile(0.99, {freshness})"),
        "freshness_events": q(f"sum(increase(recsys_feature_freshness_seconds_count[{window}]))"),
        "feature_events_per_s": q(f"sum(increase(recsys_feature_events_total[{window}]))")
        / seconds,
        # The gateway's own view of POST /v1/recommend (bucket-interpolated): what the
        # client adds on top of it is the client's share of a busy machine.
        "gateway_p50_ms": 1000 * q(f"histogram_quantile(0.5, {gateway})"),
        "gateway_p99_ms": 1000 * q(f"histogram_quantile(0.99, {gateway})"),
        # Counters with labels appear with their first increment: none yet is zero.
        "gateway_events_dropped": q(
            f"sum(increase(recsys_gateway_events_dropped_total[{window}])) or vector(0)"
        ),
        "handler_requests": handled,
        "handler_mean_batch": handled / batches if batches else math.nan,
        "store_misses": q(f"sum(increase(recsys_store_misses_total[{window}])) or vector(0)"),
    }


# --- simulated users -----------------------------------------------------------------


class World:
    """The synthetic world the model was trained on, as it is now (after the drift)."""

    def __init__(self, manifest: Path) -> None:
        from model_handlers.synthetic import SyntheticWorld
        from recsys_operator.local.desired_state import parse_system, read_manifest
        from recsys_operator.local.model_source import synthetic_world_config

        system = parse_system(read_manifest(manifest))
        self.world = SyntheticWorld(synthetic_world_config(system.spec.model))
        self.now_ms = self.world.end_ms
        w = self.world
        prefs = w.preference_vectors(np.arange(w.config.users), self.now_ms)
        logits = w.config.affinity_sharpness * prefs @ w.item_vectors.T
        logits += 0.5 * w.item_log_popularity  # as recsys simulate draws views
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        self.view_cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
        self.known_items = set(w.item_ids)
        # The ceiling: each user's chance of a click on the ground truth's best K items.
        best = []
        for lo in range(0, w.config.users, 100):  # 100 users x every item per call
            users = np.arange(lo, min(lo + 100, w.config.users))
            p = w.click_probability_by_index(
                np.repeat(users, w.config.items),
                np.tile(np.arange(w.config.items), len(users)),
                self.now_ms,
            ).reshape(len(users), w.config.items)
            best.append(-np.partition(-p, K - 1, axis=1)[:, :K])
        self.ceiling_p_any_click = 1 - np.prod(1 - np.concatenate(best), axis=1)

    def _click_probabilities(self, user: int, items: np.ndarray) -> np.ndarray:
        return self.world.click_probability_by_index(np.full(len(items), user), items, self.now_ms)

    def plan(self, visits: int, seed: int) -> Plan:
        """`visits` visits: who comes, what they view, and the uniforms deciding clicks."""
        rng = np.random.default_rng(seed)
        users = rng.integers(0, self.world.config.users, size=visits)
        draws = rng.random(visits)
        viewed = np.array(
            [np.searchsorted(self.view_cdf[u], d) for u, d in zip(users, draws, strict=True)],
            dtype=np.int64,
        )
        viewed = np.minimum(viewed, self.world.config.items - 1)
        return Plan(users, viewed, rng.random((visits, K)))

    def judge(self, user: int, item_ids: list[str], uniforms: np.ndarray) -> Judgement:
        """The user's reaction to a list: the position clicked (the first whose uniform is
        under its ground-truth probability), the list's exact chance of a click, and the
        median popularity rank of its items (0 = the most popular item)."""
        positions = [p for p, i in enumerate(item_ids) if i in self.known_items]
        if not positions:
            return Judgement(None, 0.0, math.nan)
        items = np.array([self.world.item_index(item_ids[p]) for p in positions])
        p_click = self._click_probabilities(user, items)
        clicked = next(
            (pos for pos, p in zip(positions, p_click, strict=True) if uniforms[pos] < p), None
        )
        ranks = np.expm1(-self.world.item_log_popularity[items])
        return Judgement(clicked, float(1 - np.prod(1 - p_click)), float(np.median(ranks)))


@dataclass
class Judgement:
    clicked: int | None
    p_any_click: float
    popularity_rank: float


@dataclass
class Plan:
    users: np.ndarray
    viewed: np.ndarray
    click_uniforms: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Answer:
    visit: int
    due: float  # loop time the recommendation was due
    lag_ms: float  # how late the client sent it
    latency_ms: float
    status: int  # HTTP status; 0: timeout or connection error; -1: shed
    fallback: bool = False
    clicked: bool = False
    p_any_click: float = math.nan
    popularity_rank: float = math.nan


@dataclass
class PhaseResult:
    answers: list[Answer] = field(default_factory=list)
    views_sent: int = 0
    views_failed: int = 0
    views_shed: int = 0
    clicks_sent: int = 0


async def drive(
    gateway: str,
    world: World,
    plan: Plan,
    rate: float,
    think_s: float,
    *,
    events: bool = True,
) -> PhaseResult:
    """Visit i: view at t0 + i/rate, recommendation `think_s` later, maybe a click."""
    result = PhaseResult()
    loop = asyncio.get_running_loop()
    outstanding = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=MAX_OUTSTANDING)
    user_ids, item_ids = world.world.user_ids, world.world.item_ids
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post_event(body: dict[str, Any]) -> bool:
            nonlocal outstanding
            outstanding += 1
            try:
                async with session.post(f"{gateway}/v1/events", json=body) as response:
                    await response.read()
                    return response.status == 202
            except (aiohttp.ClientError, TimeoutError):
                return False
            finally:
                outstanding -= 1

        async def view(i: int) -> None:
            if outstanding >= MAX_OUTSTANDING:
                result.views_shed += 1
                return
            body = {"type": "view", "user_id": user_ids[plan.users[i]]}
            body["item_id"] = item_ids[plan.viewed[i]]
            ok = await post_event(body)
            result.views_sent += 1
            result.views_failed += not ok

        async def recommend(i: int, due: float) -> None:
            nonlocal outstanding
            await asyncio.sleep(max(0.0, due - loop.time()))
            sent = loop.time()
            answer = Answer(i, due, 1000 * (sent - due), math.nan, -1)
            result.answers.append(answer)
            if outstanding >= MAX_OUTSTANDING:
                return
            user = int(plan.users[i])
            outstanding += 1
            try:
                async with session.post(
                    f"{gateway}/v1/recommend", json={"user_id": user_ids[user], "k": K}
                ) as response:
                    body = await response.json() if response.status == 200 else {}
                    answer.status = response.status
            except (aiohttp.ClientError, TimeoutError, ValueError):
                answer.status = 0
                body = {}
            finally:
                outstanding -= 1
            answer.latency_ms = 1000 * (loop.time() - sent)
            if answer.status != 200:
                return
            answer.fallback = bool(body.get("fallback"))
            items = body.get("item_ids") or []
            judged = world.judge(user, items, plan.click_uniforms[i])
            answer.p_any_click, answer.popularity_rank = judged.p_any_click, judged.popularity_rank
            if judged.clicked is None:
                return
            answer.clicked = True
            if events:
                result.clicks_sent += 1
                await post_event(
                    {
                        "type": "click",
                        "user_id": user_ids[user],
                        "item_id": items[judged.clicked],
                        "request_id": body["request_id"],
                    }
                )

        tasks = []
        t0 = loop.time() + 0.05
        for i in range(len(plan)):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if events:
                tasks.append(asyncio.create_task(view(i)))
            tasks.append(asyncio.create_task(recommend(i, due + think_s)))
        await asyncio.gather(*tasks)
    return result


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summarize(answers: list[Answer], rate: float, seconds: float) -> dict[str, Any]:
    sent = [a for a in answers if a.status != -1]
    ok = [a for a in sent if a.status == 200]
    model = [a for a in ok if not a.fallback]
    return {
        "target_rps": rate,
        "due": len(answers),
        "sent_rps": len(sent) / seconds,
        "answered_rps": len(ok) / seconds,
        "model_answers_rps": len(model) / seconds,
        "shed": len(answers) - len(sent),
        "errors": len(sent) - len(ok),
        "error_rate": (len(sent) - len(ok)) / len(sent) if sent else math.nan,
        "fallbacks": len(ok) - len(model),
        "fallback_rate": (len(ok) - len(model)) / len(ok) if ok else math.nan,
        "p50_ms": percentile([a.latency_ms for a in ok], 50),
        "p99_ms": percentile([a.latency_ms for a in ok], 99),
        "lag_p99_ms": percentile([a.lag_ms for a in answers], 99),
    }


# --- phases ------------------------------------------------------------------------


def load_phase(
    state: dict[str, Any],
    world: World,
    rate: float,
    seconds: float,
    warmup: float,
    think_s: float,
    seed: int,
) -> dict[str, Any]:
    """`rate` visits/s for warmup + seconds; the figures cover the last `seconds`."""
    urls = state["urls"]
    plan = world.plan(int(rate * (warmup + seconds)), seed)
    meter = CpuMeter(state)
    load_before = os.getloadavg()[0]
    wall_start = time.time() + think_s + warmup  # when measured recommendations start
    cpu_before: dict[str, float] = {}

    async def run() -> PhaseResult:
        nonlocal cpu_before
        task = asyncio.create_task(drive(urls["gateway"], world, plan, rate, think_s))
        await asyncio.sleep(think_s + warmup)
        cpu_before = meter.sample()
        return await task

    result = asyncio.run(run())
    wall_end = time.time()
    cpu = CpuMeter.share(cpu_before, meter.sample(), wall_end - wall_start)
    first_due = min(a.due for a in result.answers)
    measured = [a for a in result.answers if a.due >= first_due + warmup]
    row = summarize(measured, rate, seconds)
    time.sleep(SETTLE_S)
    row.update(prometheus_figures(urls["prometheus"], wall_start, wall_start + seconds))
    row.update(
        load_average=load_before,
        views_failed=result.views_failed,
        views_shed=result.views_shed,
        cpu_cores=cpu,
    )
    return row


def ctr_arm(
    state: dict[str, Any], world: World, plan: Plan, rate: float, warmup: float, think_s: float
) -> dict[str, Any]:
    """The CTR plan, after a warm-up of recommendations only (no events, so the
    simulated users' feature state is untouched until the plan starts)."""
    urls = state["urls"]
    warm = world.plan(int(rate * warmup), seed=999)
    asyncio.run(drive(urls["gateway"], world, warm, rate, 0.0, events=False))
    wall_start = time.time()
    result = asyncio.run(drive(urls["gateway"], world, plan, rate, think_s))
    wall_end = time.time()
    time.sleep(SETTLE_S)
    figures = prometheus_figures(urls["prometheus"], wall_start, wall_end)
    row = summarize(result.answers, rate, wall_end - wall_start - think_s)
    answered = [a for a in result.answers if a.status == 200]
    clicks = sum(a.clicked for a in answered)
    handled, misses = figures["handler_requests"], figures["store_misses"]
    row.update(
        n=len(answered),
        clicks=clicks,
        ctr=clicks / len(answered) if answered else math.nan,
        expected_ctr=float(np.mean([a.p_any_click for a in answered])) if answered else math.nan,
        ceiling_expected_ctr=float(
            np.mean([world.ceiling_p_any_click[plan.users[a.visit]] for a in answered])
        )
        if answered
        else math.nan,
        median_popularity_rank=percentile([a.popularity_rank for a in answered], 50),
        store_hit_share=1 - misses / handled if handled else math.nan,
        freshness_p50_ms=figures["freshness_p50_ms"],
        freshness_p99_ms=figures["freshness_p99_ms"],
        views_failed=result.views_failed,
        clicked_by_visit={a.visit: a.clicked for a in answered},
        # Answers the model gave (not the gateway's popularity fallback): on a loaded
        # machine the fallbacks differ between arms, and say nothing about the handler.
        model_p_by_visit={a.visit: a.p_any_click for a in answered if not a.fallback},
    )
    return row


def uplift(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    p1, n1, p0, n0 = on["ctr"], on["n"], off["ctr"], off["n"]
    diff = p1 - p0
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    relative, relative_low, relative_high = relative_ctr_change(off["clicks"], n0, on["clicks"], n1)
    both = sorted(set(on["clicked_by_visit"]) & set(off["clicked_by_visit"]))
    d = np.array(
        [int(on["clicked_by_visit"][v]) - int(off["clicked_by_visit"][v]) for v in both],
        dtype=float,
    )
    paired_se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    model_both = sorted(set(on["model_p_by_visit"]) & set(off["model_p_by_visit"]))
    p_on = np.array([on["model_p_by_visit"][v] for v in model_both])
    p_off = np.array([off["model_p_by_visit"][v] for v in model_both])
    click_d = np.array(
        [int(on["clicked_by_visit"][v]) - int(off["clicked_by_visit"][v]) for v in model_both],
        dtype=float,
    )
    return {
        "method": "two-proportion normal approximation (unpooled SE); relative via log ratio",
        "absolute": diff,
        "absolute_ci95": [diff - Z95 * se, diff + Z95 * se],
        "ratio": relative + 1,
        "relative": relative,
        "relative_ci95": [relative_low, relative_high],
        "paired_visits": len(both),
        "paired_absolute": float(d.mean()) if len(d) else math.nan,
        "paired_absolute_ci95": [
            float(d.mean()) - Z95 * paired_se,
            float(d.mean()) + Z95 * paired_se,
        ]
        if len(d)
        else [math.nan, math.nan],
        "model_paired_visits": len(model_both),
        "model_paired_relative": float(
            click_d.mean() / np.mean([int(off["clicked_by_visit"][v]) for v in model_both])
        )
        if len(model_both)
        else math.nan,
        "model_paired_expected_relative": float(p_on.mean() / p_off.mean() - 1)
        if len(model_both)
        else math.nan,
    }


# --- report ------------------------------------------------------------------------


def no_nan(value: Any) -> Any:
    """NaN (a figure that could not be measured) as null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_load_row(label: str, row: dict[str, Any]) -> None:
    cores = row["cpu_cores"]
    top = ", ".join(f"{n} {c:.2f}" for n, c in sorted(cores.items(), key=lambda x: -x[1])[:4])
    say(
        f"{label}: target {row['target_rps']:.0f}/s sent {row['sent_rps']:.0f}/s answered "
        f"{row['answered_rps']:.0f}/s (model {row['model_answers_rps']:.0f}/s) | "
        f"p50 {fmt(row['p50_ms'])} ms p99 {fmt(row['p99_ms'])} ms (in the gateway "
        f"{fmt(row['gateway_p50_ms'])} / {fmt(row['gateway_p99_ms'])} ms) | errors {row['errors']} "
        f"fallbacks {row['fallbacks']} shed {row['shed']} (+{row['views_shed']} views), events "
        f"dropped by the gateway {fmt(row['gateway_events_dropped'], 0)} | client lag p99 "
        f"{fmt(row['lag_p99_ms'])} ms | freshness p50 {fmt(row['freshness_p50_ms'])} ms p99 "
        f"{fmt(row['freshness_p99_ms'])} ms, job {fmt(row['feature_events_per_s'])} events/s | "
        f"cores: {top} (total {sum(cores.values()):.2f})"
    )


ARMS = {
    "on": "feature job ON (default: recent items to the tower, session stage)",
    "recent_items": "feature job ON, onlineUpdates off (no online embeddings)",
    "off": "feature job OFF (static user state)",
}


def report(results: dict[str, Any]) -> None:
    print("\nLoad (feature job ON), per target rate of recommendations:")
    header = (
        f"{'target/s':>8} {'sent/s':>7} {'answered/s':>10} {'fallback':>8} {'errors':>6} "
        f"{'shed':>5} {'p50 ms':>7} {'p99 ms':>7} {'gw p50':>7} {'gw p99':>7} {'lag p99':>8} "
        f"{'fresh p50':>9} "
        f"{'fresh p99':>9} {'job ev/s':>8} {'cores':>5}"
    )
    print(header)
    rows = [("", row) for row in results["load"]]
    if "load_features_off" in results:
        rows.append((" (feature job OFF)", results["load_features_off"]))
    for note, row in rows:
        print(
            f"{row['target_rps']:>8.0f} {row['sent_rps']:>7.1f} {row['answered_rps']:>10.1f} "
            f"{100 * row['fallback_rate']:>7.1f}% {row['errors']:>6} {row['shed']:>5} "
            f"{fmt(row['p50_ms']):>7} {fmt(row['p99_ms']):>7} {fmt(row['gateway_p50_ms']):>7} "
            f"{fmt(row['gateway_p99_ms']):>7} {fmt(row['lag_p99_ms']):>8} "
            f"{fmt(row['freshness_p50_ms']):>9} {fmt(row['freshness_p99_ms']):>9} "
            f"{fmt(row['feature_events_per_s']):>8} {sum(row['cpu_cores'].values()):>5.2f}{note}"
        )
    ctr = results.get("ctr")
    if ctr:
        print("\nCTR of the drifting simulated users (same visits, same draws, in each arm):")
        for arm, label in ARMS.items():
            row = ctr.get(arm)
            if row is None:
                continue
            print(
                f"  {label}:\n    n {row['n']}, clicks {row['clicks']}, CTR {100 * row['ctr']:.2f}% "
                f"(expected from the lists {100 * row['expected_ctr']:.2f}%), answers with store "
                f"features {fmt(100 * row['store_hit_share'])}%, median popularity rank of "
                f"recommended items {fmt(row['median_popularity_rank'], 0)}, p50 "
                f"{fmt(row['p50_ms'])} ms p99 {fmt(row['p99_ms'])} ms, fallbacks "
                f"{row['fallbacks']}, errors {row['errors']}"
            )
            print(
                f"    ceiling (the ground truth's best {K} items for each answered visit): expected "
                f"CTR {100 * row['ceiling_expected_ctr']:.2f}%; the arm reaches "
                f"{100 * row['expected_ctr'] / row['ceiling_expected_ctr']:.1f}% of it"
            )
        for name, u in ctr["uplift"].items():
            lo, hi = u["absolute_ci95"]
            rlo, rhi = u["relative_ci95"]
            plo, phi = u["paired_absolute_ci95"]
            print(
                f"  {name}: {100 * u['absolute']:+.2f} points (95% CI {100 * lo:+.2f} to "
                f"{100 * hi:+.2f}); ratio {u['ratio']:.3f}, relative {100 * u['relative']:+.1f}% "
                f"(95% CI {100 * rlo:+.1f}% to {100 * rhi:+.1f}%); paired over "
                f"{u['paired_visits']} visits: {100 * u['paired_absolute']:+.2f} points "
                f"(95% CI {100 * plo:+.2f} to {100 * phi:+.2f}); closes "
                f"{100 * u['gap_to_ceiling_closed']:.1f}% of OFF's gap to the ceiling "
                f"(expected CTRs); over the {u['model_paired_visits']} visits both arms "
                f"answered from the model (no gateway fallback): CTR "
                f"{100 * u['model_paired_relative']:+.1f}%, expected CTR "
                f"{100 * u['model_paired_expected_relative']:+.1f}%"
            )
        if ctr["uplift"]:
            print(f"  ({next(iter(ctr['uplift'].values()))['method']})")
    print("\nRatios:")
    for name, value in results["ratios"].items():
        print(f"  {name}: {fmt(value, 2)}")


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    load = results["load"]
    base = load[0]
    for row in load[1:]:
        r, b = f"{row['target_rps']:.0f}", f"{base['target_rps']:.0f}"
        out[f"p50 at {r}/s / at {b}/s"] = row["p50_ms"] / base["p50_ms"]
        out[f"p99 at {r}/s / at {b}/s"] = row["p99_ms"] / base["p99_ms"]
    for row in load:
        out[f"answered / target at {row['target_rps']:.0f}/s"] = (
            row["answered_rps"] / row["target_rps"]
        )
    off = results.get("load_features_off")
    on = next((r for r in load if off and r["target_rps"] == off["target_rps"]), None)
    if off and on:
        rate = f"{off['target_rps']:.0f}/s"
        out[f"p50 at {rate}, feature job ON / OFF"] = on["p50_ms"] / off["p50_ms"]
        out[f"p99 at {rate}, feature job ON / OFF"] = on["p99_ms"] / off["p99_ms"]
    ctr = results.get("ctr") or {}
    for arm in ("on", "recent_items"):
        if arm in ctr and "off" in ctr:
            out[f"CTR {arm} / off"] = ctr[arm]["ctr"] / ctr["off"]["ctr"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,200,500", help="recommendations/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured, per rate")
    parser.add_argument("--warmup", type=float, default=5.0, help="unrecorded, per rate")
    parser.add_argument("--think-ms", type=float, default=1000.0, help="view -> recommendation")
    parser.add_argument("--ctr-rate", type=float, default=100.0, help="visits/s in the CTR arms")
    parser.add_argument("--ctr-seconds", type=float, default=45.0, help="per arm")
    parser.add_argument(
        "--no-recent-items-arm",
        action="store_true",
        help="skip the third CTR arm (feature job ON with spec.features.onlineUpdates off)",
    )
    parser.add_argument(
        "--off-latency-rate",
        type=float,
        default=200.0,
        help="also measure latency at this rate with the feature job OFF (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_ITEMS} items, one `up`, 50/s for 5 s, only the CTR arm ON (5 s)",
    )
    parser.add_argument("--run-dir", type=Path, help="keep the run folder (and trained model)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds, args.warmup = "50", 5.0, 2.0
        args.ctr_rate, args.ctr_seconds, args.off_latency_rate = 50.0, 5.0, 0.0
        args.no_recent_items_arm = True
    rates = [float(r) for r in args.rates.split(",")]
    think_s = args.think_ms / 1000

    say(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    temporary = args.run_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-")) if temporary else args.run_dir
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    manifest = work / "e2e.yaml"
    body = write_manifest(manifest, num_items=QUICK_ITEMS if args.quick else None)
    recent_items_manifest = work / "e2e-recent-items.yaml"
    body["spec"]["features"]["onlineUpdates"] = {"enabled": False}
    recent_items_manifest.write_text(yaml.safe_dump(body, sort_keys=False))
    world = World(manifest)
    ctr_plan = world.plan(int(args.ctr_rate * args.ctr_seconds), args.seed)
    say(
        f"run folder {run_dir}; {world.world.config.users} users, {world.world.config.items} "
        f"items; think time {args.think_ms:.0f} ms"
    )
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": os.getloadavg()[0],
        },
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("run_dir", "json")},
            "max_outstanding": MAX_OUTSTANDING,
            "request_timeout_s": REQUEST_TIMEOUT_S,
        },
        "load": [],
        "ctr": {},
    }

    def arm(name: str, state: dict[str, Any]) -> None:
        say(f"CTR arm {name}: {len(ctr_plan)} visits at {args.ctr_rate:.0f}/s ({ARMS[name]})")
        row = results["ctr"][name] = ctr_arm(
            state, world, ctr_plan, args.ctr_rate, args.warmup, think_s
        )
        say(
            f"  CTR {100 * row['ctr']:.2f}% over {row['n']} answers "
            f"(expected {100 * row['expected_ctr']:.2f}%)"
        )

    try:
        # Feature job ON: the CTR arm first, on an empty store, then the load ladder.
        state = up(manifest, run_dir, features=True)
        arm("on", state)
        for n, rate in enumerate(rates):
            say(f"load {rate:.0f}/s: {args.warmup:.0f} s warm-up + {args.seconds:.0f} s")
            row = load_phase(
                state, world, rate, args.seconds, args.warmup, think_s, args.seed + 100 + n
            )
            results["load"].append(row)
            print_load_row(f"  {rate:.0f}/s", row)
        down(run_dir)

        if not args.no_recent_items_arm:
            state = up(recent_items_manifest, run_dir, features=True)
            arm("recent_items", state)
            down(run_dir)

        # Feature job OFF: the same CTR plan on a fresh system with the same model.
        # (Not in a quick run: a second `up` would double its time.)
        if not args.quick:
            state = up(manifest, run_dir, features=False)
            arm("off", state)
        if args.off_latency_rate:
            rate = args.off_latency_rate
            say(f"load {rate:.0f}/s, feature job OFF")
            seed = args.seed + 100 + (rates.index(rate) if rate in rates else len(rates))
            row = load_phase(state, world, rate, args.seconds, args.warmup, think_s, seed)
            results["load_features_off"] = row
            print_load_row(f"  {rate:.0f}/s OFF", row)
    finally:
        down(run_dir)

    ctr = results["ctr"]
    ctr["uplift"] = {
        f"{arm} - off": uplift(ctr[arm], ctr["off"])
        for arm in ("on", "recent_items")
        if arm in ctr and "off" in ctr
    }
    for name, u in ctr["uplift"].items():
        # Of the gap from OFF to the ceiling (expected CTRs), the share the arm closes.
        arm_row, off = ctr[name.split(" - ")[0]], ctr["off"]
        u["gap_to_ceiling_closed"] = (arm_row["expected_ctr"] - off["expected_ctr"]) / (
            off["ceiling_expected_ctr"] - off["expected_ctr"]
        )
    results["ratios"] = ratios(results)
    report(results)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    say(f"total {time.monotonic() - STARTED:.0f}s, load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        for name in ARMS:
            if name in ctr:
                ctr[name].pop("clicked_by_visit")
                ctr[name].pop("model_p_by_visit")
        args.json.write_text(json.dumps(no_nan(results), indent=2, default=str))
    if temporary:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
