"""Simulated users against the local gateway, and the live dashboard.

Users come from the synthetic world the local model was trained on, at the end of its
period: their interests have drifted since the interactions the model learned from.
With a `Drift` (the demo's), they start earlier in the period and their interests move
on while the simulation runs: the world's clock runs from there to the period's end.
Each visit is a user viewing an item drawn from their current interests (an event the
stream job turns into fresh features), asking for recommendations, and clicking at
most one recommended item with the probability the ground truth gives. Requests are
open-loop at `rate` per second, so a slow server shows up as latency, not as less load.

Latency and CTR per model version are measured here, at the client (what users see);
feature freshness and events/s come from the local Prometheus; the rollout from the
supervisor's state.json.
"""

from __future__ import annotations

import csv
import math
import queue
import random
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from recsys_operator.local.desired_state import parse_system, read_manifest
from recsys_operator.local.model_source import synthetic_world_config
from recsys_operator.local.run_folder import RunFolder

K = 10
WINDOW_S = 10.0
WORKERS = 16
REQUEST_TIMEOUT_S = 5.0
MAX_QUEUED = 200  # visits waiting for a worker; beyond this they are counted as shed


@dataclass(frozen=True)
class Drift:
    """Interests that move while users visit: the world's clock goes from
    `start_fraction` of its period to its end over `seconds` of the simulation, then stays."""

    start_fraction: float
    seconds: float


DRIFT_REFRESH_S = 2.0
"""How often moving interests are recomputed (all users over all items)."""


@dataclass
class Sample:
    at: float
    version: str
    latency_ms: float
    clicked: bool
    ok: bool


@dataclass
class Stats:
    """What the simulation measured; thread-safe."""

    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=200_000))
    totals: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    """version -> [impressions, clicks, errors]."""
    events_sent: int = 0
    shed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)
            total = self.totals[sample.version]
            total[0] += sample.ok
            total[1] += sample.clicked
            total[2] += not sample.ok

    def window(self, now: float, seconds: float = WINDOW_S) -> dict[str, dict[str, float]]:
        """Per version over the last `seconds`: req/s, p50/p99 ms, CTR, errors."""
        with self.lock:
            recent = [s for s in self.samples if s.at >= now - seconds]
            if self.samples:  # during the first seconds the window is what has elapsed
                seconds = max(1.0, min(seconds, now - self.samples[0].at))
        by_version: dict[str, list[Sample]] = defaultdict(list)
        for s in recent:
            by_version[s.version].append(s)
        out = {}
        for version, samples in sorted(by_version.items()):
            latencies = np.array([s.latency_ms for s in samples if s.ok])
            ok = [s for s in samples if s.ok]
            out[version] = {
                "rps": len(samples) / seconds,
                "p50": float(np.percentile(latencies, 50)) if len(latencies) else math.nan,
                "p99": float(np.percentile(latencies, 99)) if len(latencies) else math.nan,
                "ctr": sum(s.clicked for s in ok) / len(ok) if ok else math.nan,
                "errors": sum(not s.ok for s in samples),
                "n": len(samples),
            }
        return out


class SimulatedUsers:
    def __init__(
        self,
        folder: RunFolder,
        gateway_url: str,
        rate: float,
        seed: int,
        drift: Drift | None = None,
    ) -> None:
        from model_handlers.synthetic import SyntheticWorld

        system = parse_system(read_manifest(folder.manifest))
        self.world = SyntheticWorld(synthetic_world_config(system.spec.model))
        self.drift = drift
        self._started = time.monotonic()
        self.gateway_url = gateway_url
        self.rate = rate
        self.rng = random.Random(seed)
        self.stats = Stats()
        # (user index, seed of the visit's own draws): the same --seed sends the same
        # visits with the same clicks, whichever worker thread runs each one.
        self.visits: queue.Queue[tuple[int, int]] = queue.Queue(maxsize=MAX_QUEUED)
        self.stop = threading.Event()
        self._local = threading.local()
        self._known_items = set(self.world.item_ids)  # fallback answers may name others
        self.now_ms = self.world_ms()
        self._view_cdf = self._interests(self.now_ms)
        self._refreshed = time.monotonic()
        self._refresh_lock = threading.Lock()

    def world_ms(self) -> int:
        """The world's clock: the end of its period (interests as they are now, after the
        drift), or with a `Drift` the point its interests have moved to by now."""
        world = self.world
        if self.drift is None:
            return world.end_ms
        span = world.end_ms - world.config.start_ms
        progress = min(1.0, (time.monotonic() - self._started) / max(self.drift.seconds, 1e-9))
        fraction = self.drift.start_fraction + (1.0 - self.drift.start_fraction) * progress
        return world.config.start_ms + int(fraction * span)

    def _interests(self, at_ms: int) -> np.ndarray:
        """Current interest of every user over every item (a CDF per user): what they view."""
        users = np.arange(self.world.config.users)
        prefs = self.world.preference_vectors(users, at_ms)
        logits = self.world.config.affinity_sharpness * prefs @ self.world.item_vectors.T
        logits += 0.5 * self.world.item_log_popularity
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)

    def _follow_drift(self) -> None:
        if self.drift is None or time.monotonic() - self._refreshed < DRIFT_REFRESH_S:
            return
        if not self._refresh_lock.acquire(blocking=False):
            return  # another worker is recomputing
        try:
            now_ms = self.world_ms()
            self._view_cdf, self.now_ms = self._interests(now_ms), now_ms
            self._refreshed = time.monotonic()
        finally:
            self._refresh_lock.release()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def visit(self, user_index: int, rng: random.Random) -> None:
        self._follow_drift()
        now_ms, view_cdf = self.now_ms, self._view_cdf
        user = self.world.user_ids[user_index]
        session = self._session()
        viewed = int(np.searchsorted(view_cdf[user_index], rng.random()))
        viewed = min(viewed, self.world.config.items - 1)
        try:
            session.post(
                f"{self.gateway_url}/v1/events",
                json={"type": "view", "user_id": user, "item_id": self.world.item_ids[viewed]},
                timeout=REQUEST_TIMEOUT_S,
            )
            with self.stats.lock:
                self.stats.events_sent += 1
        except requests.RequestException:
            pass
        started = time.monotonic()
        try:
            response = session.post(
                f"{self.gateway_url}/v1/recommend",
                json={"user_id": user, "k": K},
                timeout=REQUEST_TIMEOUT_S,
            )
            latency_ms = (time.monotonic() - started) * 1000
            answer = response.json() if response.ok else {}
        except (requests.RequestException, ValueError):
            self.stats.add(Sample(time.monotonic(), "?", 0.0, False, False))
            return
        if not response.ok:
            self.stats.add(Sample(time.monotonic(), "?", latency_ms, False, False))
            return
        version = str(answer.get("model_version"))
        items = [i for i in answer.get("item_ids") or [] if i in self._known_items]
        clicked = False
        if items:
            probabilities = self.world.click_probability([user] * len(items), items, now_ms)
            for item, p in zip(items, probabilities, strict=True):
                if rng.random() < p:
                    clicked = True
                    try:
                        session.post(
                            f"{self.gateway_url}/v1/events",
                            json={
                                "type": "click",
                                "user_id": user,
                                "item_id": item,
                                "request_id": answer["request_id"],
                            },
                            timeout=REQUEST_TIMEOUT_S,
                        )
                        with self.stats.lock:
                            self.stats.events_sent += 1
                    except requests.RequestException:
                        pass
                    break
        self.stats.add(Sample(time.monotonic(), version, latency_ms, clicked, True))

    def run(self, duration: float, stop: threading.Event) -> None:
        """Issue visits at `rate` per second until `duration` passes or `stop` is set."""
        workers = [threading.Thread(target=self._worker, daemon=True) for _ in range(WORKERS)]
        for worker in workers:
            worker.start()
        started = time.monotonic()
        issued = 0
        try:
            while not stop.is_set() and (duration <= 0 or time.monotonic() - started < duration):
                due = int((time.monotonic() - started) * self.rate)
                while issued < due:
                    issued += 1
                    try:
                        user = self.rng.randrange(len(self.world.user_ids))
                        self.visits.put_nowait((user, self.rng.getrandbits(64)))
                    except queue.Full:
                        with self.stats.lock:
                            self.stats.shed += 1
                time.sleep(0.005)
        finally:
            self.stop.set()
            for worker in workers:
                worker.join(timeout=REQUEST_TIMEOUT_S + 1)

    def _worker(self) -> None:
        while not self.stop.is_set():
            try:
                user_index, visit_seed = self.visits.get(timeout=0.1)
            except queue.Empty:
                continue
            self.visit(user_index, random.Random(visit_seed))


def prometheus_figures(prometheus: str | None) -> dict[str, float]:
    """Feature freshness p50/p99 (s) and events/s the stream job processed, last 30 s."""
    if not prometheus:
        return {}
    queries = {
        "events_per_s": "sum(rate(recsys_feature_events_total[30s]))",
        "freshness_p50": "histogram_quantile(0.5, sum by (le) (rate(recsys_feature_freshness_seconds_bucket[30s])))",
        "freshness_p99": "histogram_quantile(0.99, sum by (le) (rate(recsys_feature_freshness_seconds_bucket[30s])))",
    }
    figures = {}
    for name, query in queries.items():
        try:
            answer = requests.get(
                f"{prometheus}/api/v1/query", params={"query": query}, timeout=1
            ).json()
            result = answer["data"]["result"]
            figures[name] = float(result[0]["value"][1]) if result else math.nan
        except (requests.RequestException, ValueError, KeyError, IndexError):
            figures[name] = math.nan
    return figures


def _fmt(value: float, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}{unit}"


def render_dashboard(
    stats: Stats, state: dict[str, Any], figures: dict[str, float], elapsed: float
) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"recsys local - {state.get('system')} - {elapsed:.0f}s", expand=False)
    for column in (
        "version",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CTR",
        "errors",
        "impressions",
        "clicks",
    ):
        table.add_column(column, justify="right")
    window = stats.window(time.monotonic())
    for version, figures_v in window.items():
        impressions, clicks, _ = stats.totals.get(version, [0, 0, 0])
        table.add_row(
            version,
            _fmt(figures_v["rps"]),
            _fmt(figures_v["p50"]),
            _fmt(figures_v["p99"]),
            _fmt(100 * figures_v["ctr"], "%", 2),
            str(int(figures_v["errors"])),
            str(impressions),
            str(clicks),
        )
    rollout = state.get("rollout") or {}
    canary = rollout.get("canary")
    health = rollout.get("health") or {}
    events = [e for e in state.get("events") or [] if e["reason"] not in ("SpecChanged",)]
    lines = [
        f"events/s (stream job) {_fmt(figures.get('events_per_s', math.nan))}   "
        f"feature freshness p50 {_fmt(1000 * figures.get('freshness_p50', math.nan), ' ms', 0)} "
        f"p99 {_fmt(1000 * figures.get('freshness_p99', math.nan), ' ms', 0)}   "
        f"sent {stats.events_sent} events, shed {stats.shed} visits",
        f"stable {rollout.get('stableVersion')}   "
        + (
            f"canary {canary['version']} weight {canary['weight']}% step {canary.get('step', 0) + 1}"
            if canary
            else "no canary"
        )
        + f"   {health.get('reason', '')}: {health.get('message', '')}",
    ]
    if events:
        last = events[-1]
        lines.append(f"last decision {last['time'][11:19]} {last['reason']}: {last['message']}")
    return Group(table, *(Text(line) for line in lines))


def run_simulation(
    folder: RunFolder,
    *,
    rate: float,
    duration: float,
    stop: threading.Event,
    dashboard: bool = True,
    record: Path | None = None,
    seed: int = 1,
    drift: Drift | None = None,
) -> str:
    """Run simulated users; returns a one-paragraph summary."""
    state = folder.read_state() or {}
    urls = state.get("urls") or {}
    users = SimulatedUsers(folder, urls["gateway"], rate, seed, drift)
    thread = threading.Thread(target=users.run, args=(duration, stop), daemon=True)
    started = time.monotonic()
    thread.start()
    recorder = _Recorder(record) if record else None
    system_stopped = False

    def system_gone() -> bool:
        # `recsys down` (or a crash) ends the system: visits would only fail from now on.
        nonlocal system_stopped
        if not folder.supervisor_running():
            system_stopped = True
            stop.set()
        return system_stopped

    try:
        if dashboard:
            from rich.live import Live

            with Live(refresh_per_second=2, transient=False) as live:
                while thread.is_alive() and not system_gone():
                    state = folder.read_state() or state
                    figures = prometheus_figures(urls.get("prometheus"))
                    live.update(
                        render_dashboard(users.stats, state, figures, time.monotonic() - started)
                    )
                    if recorder:
                        recorder.write(users.stats, state, time.monotonic() - started)
                    thread.join(timeout=1.0)
        else:
            while thread.is_alive() and not system_gone():
                thread.join(timeout=1.0)
                if recorder:
                    recorder.write(
                        users.stats, folder.read_state() or state, time.monotonic() - started
                    )
    finally:
        stop.set()
        thread.join(timeout=REQUEST_TIMEOUT_S * 2)
        if recorder:
            recorder.close()
    summary = summarize(users.stats, time.monotonic() - started)
    if system_stopped:
        summary += "\n  stopped early: the local system is no longer running (`recsys status`)"
    return summary


def summarize(stats: Stats, elapsed: float) -> str:
    parts = [f"simulated {elapsed:.0f}s:"]
    for version, (impressions, clicks, errors) in sorted(stats.totals.items()):
        ctr = clicks / impressions if impressions else math.nan
        parts.append(
            f"version {version}: {impressions} responses, CTR {_fmt(100 * ctr, '%', 2)}, {errors} errors"
        )
    parts.append(f"{stats.events_sent} events sent, {stats.shed} visits shed")
    return "\n  ".join(parts)


class _Recorder:
    """Per-second rows: time, version, req/s, p50, p99, CTR (10 s window), canary weight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
        self.writer = csv.writer(self.file)
        self.writer.writerow(
            ["t", "version", "n", "rps", "p50_ms", "p99_ms", "ctr", "canary_weight", "stable"]
        )
        self.last = -1

    def write(self, stats: Stats, state: dict[str, Any], elapsed: float) -> None:
        second = int(elapsed)
        if second == self.last:
            return
        self.last = second
        rollout = state.get("rollout") or {}
        canary = rollout.get("canary") or {}
        for version, figures in stats.window(time.monotonic()).items():
            self.writer.writerow(
                [
                    second,
                    version,
                    int(figures["n"]),
                    f"{figures['rps']:.2f}",
                    f"{figures['p50']:.2f}",
                    f"{figures['p99']:.2f}",
                    f"{figures['ctr']:.4f}",
                    canary.get("weight", 0),
                    rollout.get("stableVersion"),
                ]
            )
        self.file.flush()

    def close(self) -> None:
        self.file.close()
