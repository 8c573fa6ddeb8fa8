"""Rollouts decided by real numbers: simulated users -> real gateway -> real TorchServe,
real Prometheus scraping the gateway, and the rollout state machine with its Prometheus
analysis source moving traffic by rewriting the gateway's routing file.

Users are drawn from the synthetic ground truth and click with the probability it gives,
so a model that ranks well earns clicks and one with random item embeddings does not.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from recsys_operator.api.recommender_system import AnalysisSpec, RolloutSpec
from recsys_operator.api.status import RolloutOutcome
from recsys_operator.launchers.process import ManagedProcess, free_port
from recsys_operator.launchers.prometheus import prometheus_process, prometheus_url
from recsys_operator.rollout.prometheus_source import PrometheusSource
from recsys_operator.rollout.state_machine import RolloutState, Transition, tick

pytestmark = [
    pytest.mark.java,
    pytest.mark.prometheus,
    pytest.mark.slow,
    pytest.mark.xdist_group("rollout-e2e"),
]

MODEL = "recs"
SYSTEM = "test.recs"
K = 10


@dataclass
class Stack:
    world: Any
    user_ids: list[str]
    torchserve: Any
    gateway_url: str
    routing_path: Path
    prometheus: str


def write_routing(
    stack_dir: Path, torchserve: Any, stable: str, canary: str | None, weight: int
) -> None:
    routing = {
        "system": SYSTEM,
        "stable": {"version": stable, "url": torchserve.predictions_url(stable)},
        "canary": {"version": canary, "url": torchserve.predictions_url(canary)}
        if canary
        else None,
        "canaryWeight": weight if canary else 0,
        "salt": f"{MODEL}:{canary or stable}",
        "timeoutMs": 3000,
        "defaultK": K,
        "maxK": 20,
        "pulsarServiceUrl": None,  # events are not what these tests are about; drops are counted
    }
    tmp = stack_dir / "routing.json.tmp"
    tmp.write_text(json.dumps(routing))
    tmp.replace(stack_dir / "routing.json")  # atomic: the gateway never reads half a file


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from tiny_model import TinyModel, pack

    from model_handlers.synthetic import SyntheticConfig, SyntheticWorld
    from model_handlers.training import TrainingConfig
    from recsys_operator.api.recommender_system import ServingSpec
    from recsys_operator.launchers.torchserve import torchserve_server

    root = tmp_path_factory.mktemp("rollout")
    tiny = TinyModel(
        world=SyntheticConfig(users=2000, items=400, sessions_per_user=2, seed=7),
        training=TrainingConfig(dim=16, hidden=32, max_epochs=2, batch_size=256, threads=1),
    )
    world = SyntheticWorld(tiny.world)  # the simulated users come from the same world
    trained = tiny.write(root / "trained")
    # Version 3: the same model with random item embeddings - it ranks items at random.
    broken = root / "broken"
    shutil.copytree(trained, broken)
    embeddings = np.load(trained / "item_embeddings.npy")
    np.save(
        broken / "item_embeddings.npy",
        np.random.default_rng(3).normal(size=embeddings.shape).astype(np.float32),
    )
    store = pack({"1": trained, "2": trained, "3": broken}, root / "store", name=MODEL, top_k=20)
    torchserve = torchserve_server(
        root / "ts",
        model=store.model_spec("1"),
        serving=ServingSpec(),
        model_store=store.path,
        versions=["1", "2", "3"],
    )
    torchserve.start(timeout=240)
    write_routing(root, torchserve, "1", None, 0)
    port = free_port()
    gateway = ManagedProcess(
        "gateway",
        [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--routing",
            str(root / "routing.json"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        root / "logs" / "gateway.log",
        port,
    ).start(ready_timeout=60)
    prometheus = prometheus_process(root, [f"127.0.0.1:{port}"]).start(ready_timeout=60)
    try:
        user_ids = list(world.interactions().user_ids)
        yield Stack(
            world,
            user_ids,
            torchserve,
            f"http://127.0.0.1:{port}",
            root,
            prometheus_url(prometheus),
        )
    finally:
        prometheus.stop()
        gateway.stop()
        torchserve.stop()


class Users(threading.Thread):
    """Simulated users: ask for recommendations, click at most one item per response with
    the probability the ground truth gives. Bounded: stops when told or after `limit_s`."""

    def __init__(
        self,
        stack: Stack,
        seen: dict[str, set[str]],
        recording: threading.Event,
        limit_s: float = 240,
        canary_click_factor: float = 1.0,
        list_ctr: float | None = None,
        seed: int = 11,
        requests_per_s: float = 35,
    ):
        super().__init__(daemon=True)
        # Paced, so a faster machine cannot gather a look's impressions inside one interval:
        # the tests that expect the analysis to wait for impressions then see it wait.
        self.pause_s = 1 / requests_per_s
        # Users alike: each list is clicked (its first item) with this probability,
        # whatever the items. The ground truth's users differ so much that telling a
        # 10% drop apart would take many minutes of this harness's traffic.
        self.list_ctr = list_ctr
        self.stack, self.seen, self.recording, self.limit_s = stack, seen, recording, limit_s
        # Users who like the canary's lists less: a click they would make on a canary
        # list is kept with this probability, so the canary's true CTR is this x stable's.
        self.canary_click_factor = canary_click_factor
        self.stopped = threading.Event()
        # One seed per thread: threads with the same seed would send the same users the
        # same clicks in lockstep, tripling every visit (the analysis sees the clumps).
        self.rng = random.Random(seed)

    def run(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.limit_s
        next_at = time.monotonic()
        while not self.stopped.is_set() and time.monotonic() < deadline:
            next_at += self.pause_s
            self.stopped.wait(max(0.0, next_at - time.monotonic()))
            user = self.rng.choice(self.stack.user_ids)
            try:
                answer = session.post(
                    f"{self.stack.gateway_url}/v1/recommend",
                    json={"user_id": user, "k": K},
                    timeout=10,
                ).json()
            except requests.RequestException:
                continue
            if self.recording.is_set():
                self.seen.setdefault(user, set()).add(
                    f"{answer['variant']}:{answer['model_version']}"
                )
            now = self.stack.world.config.start_ms + int(self.stack.world.config.days * 86_400_000)
            probabilities = self.stack.world.click_probability(
                [user] * len(answer["item_ids"]), answer["item_ids"], now
            )
            if self.list_ctr is not None:
                probabilities = np.zeros(len(answer["item_ids"]))
                probabilities[:1] = self.list_ctr
            for item, p in zip(answer["item_ids"], probabilities, strict=True):
                if self.rng.random() < p:
                    if (
                        answer["variant"] == "canary"
                        and self.rng.random() >= self.canary_click_factor
                    ):
                        break
                    session.post(
                        f"{self.stack.gateway_url}/v1/events",
                        json={
                            "type": "click",
                            "user_id": user,
                            "item_id": item,
                            "request_id": answer["request_id"],
                        },
                        timeout=10,
                    )
                    break


def roll_out(
    stack: Stack,
    version: str,
    spec: RolloutSpec,
    prometheus: str | None = None,
    limit_s: float = 150,
    canary_click_factor: float = 1.0,
    list_ctr: float | None = None,
) -> tuple[RolloutState, list[Transition], dict[str, set[str]]]:
    """Drive the state machine until the rollout ends, moving traffic as it decides."""
    seen: dict[str, set[str]] = {}  # user -> variant:version answered while a weight held
    recording = threading.Event()
    users = [
        Users(
            stack,
            seen,
            recording,
            canary_click_factor=canary_click_factor,
            list_ctr=list_ctr,
            seed=11 + n,
        )
        for n in range(3)
    ]
    for u in users:
        u.start()
    state = RolloutState(stable_version="1")
    source = PrometheusSource(prometheus or stack.prometheus, SYSTEM, "1", spec, timeout_s=3)
    transitions = []
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            transition = asyncio.run(tick(version, spec, state, datetime.now(UTC), source))
            if transition.state != state:
                recording.clear()
                transitions.append(transition)
                state = transition.state
                canary = state.canary
                write_routing(
                    stack.routing_path,
                    stack.torchserve,
                    state.stable_version,
                    canary.version if canary else None,
                    canary.weight if canary else 0,
                )
                if canary is not None:  # record once every gateway reload has surely happened
                    threading.Timer(1.5, recording.set).start()
            if state.canary is None and state.last_rollout is not None:
                return state, transitions, seen
            time.sleep(0.5)
        raise AssertionError(f"rollout of {version} did not finish in {limit_s}s: {state}")
    finally:
        for u in users:
            u.stopped.set()
        for u in users:
            u.join(timeout=15)
        write_routing(stack.routing_path, stack.torchserve, "1", None, 0)


def spec(**analysis: Any) -> RolloutSpec:
    defaults = {
        "max_p99_latency_ms": 2000,
        "max_error_rate": 0.05,
        "min_ctr_ratio": 0.8,
        "min_impressions": 150,
        "confidence": 0.95,
    }
    return RolloutSpec(
        steps=[50, 100],
        interval="10s",
        progress_deadline="3m",
        max_inconclusive=3,
        analysis=AnalysisSpec(**{**defaults, **analysis}),
    )


def test_a_good_version_is_promoted_and_users_stay_on_their_variant(stack: Stack) -> None:
    state, _, seen = roll_out(stack, "2", spec())
    assert state.last_rollout.outcome is RolloutOutcome.PROMOTED, state.last_rollout
    assert state.stable_version == "2"
    analysis = state.last_rollout.last_analysis
    assert analysis.canary_impressions >= 150 and analysis.stable_impressions >= 150
    assert analysis.canary_p99_ms is not None and analysis.p_value is not None
    # Sticky assignment: while the 50% weight held, each user got one variant and version.
    assert len(seen) > 50
    assert all(len(answers) == 1 for answers in seen.values()), {
        u: v for u, v in seen.items() if len(v) > 1
    }
    variants = {next(iter(a)).split(":")[0] for a in seen.values()}
    assert variants == {"stable", "canary"}


def test_random_embeddings_are_rolled_back_on_ctr_with_the_numbers(stack: Stack) -> None:
    state, _, _ = roll_out(stack, "3", spec())
    record = state.last_rollout
    assert record.outcome is RolloutOutcome.ROLLED_BACK, record
    assert state.stable_version == "1"
    analysis = record.last_analysis
    assert "significantly below" in record.reason
    assert analysis.canary_ctr < analysis.stable_ctr
    assert analysis.p_value is not None and analysis.p_value < 0.05


def test_a_latency_threshold_below_what_the_canary_achieves_rolls_back(stack: Stack) -> None:
    state, _, _ = roll_out(stack, "2", spec(max_p99_latency_ms=0.5))
    assert state.last_rollout.outcome is RolloutOutcome.ROLLED_BACK
    assert (
        "p99 latency" in state.last_rollout.reason and "exceeds 0.5 ms" in state.last_rollout.reason
    )


def test_prometheus_down_is_inconclusive_then_rolled_back_never_promoted(stack: Stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    state, transitions, _ = roll_out(stack, "2", spec(), prometheus=dead)
    assert state.last_rollout.outcome is RolloutOutcome.ROLLED_BACK
    assert state.stable_version == "1"
    assert "inconclusive analyses in a row" in state.last_rollout.reason
    assert not any(t.promoted for t in transitions)
    assert all(t.state.canary is None or t.state.canary.weight == 50 for t in transitions)


def test_a_canary_whose_serving_fails_is_rolled_back_on_errors(stack: Stack) -> None:
    # TorchServe serves no version 9: every canary request fails and is answered from the
    # popularity fallback (a 200 to the client), which the analysis counts as an error.
    state, _, _ = roll_out(stack, "9", spec())
    record = state.last_rollout
    assert record.outcome is RolloutOutcome.ROLLED_BACK, record
    assert "error rate" in record.reason, record.reason
    assert record.last_analysis.canary_error_rate > 0.9


def judged_spec() -> RolloutSpec:
    """One look at 50% with 2,000 impressions a side (a few intervals: waiting gathers
    them), at confidence 0.999 so an identical canary is rolled back once in a thousand.
    With users alike at list CTR 0.8, a 10% drop is then about 6 standard errors below:
    caught with probability above 0.99."""
    return spec(min_ctr_ratio=1.0, min_impressions=2000, confidence=0.999).model_copy(
        update={"interval": "20s", "max_inconclusive": 5}
    )


def test_an_identical_canary_is_promoted_with_the_numbers_in_status(stack: Stack) -> None:
    state, transitions, _ = roll_out(stack, "2", judged_spec(), limit_s=170, list_ctr=0.8)
    record = state.last_rollout
    assert record.outcome is RolloutOutcome.PROMOTED, record
    waits = [t for t in transitions if t.state.canary and t.state.canary.inconclusive_count]
    assert waits and "too few impressions" in waits[0].state.canary.last_analysis.reason
    a = record.last_analysis
    assert a.canary_impressions >= 2000 and a.stable_impressions >= 2000
    assert a.canary_ctr == pytest.approx(0.8, abs=0.05) and a.stable_ctr == pytest.approx(
        0.8, abs=0.05
    )
    # Half of 0.001 is left to the sample-ratio check (at most half: one look at 0.001).
    assert a.alpha == pytest.approx(0.0005) and a.p_value > a.alpha
    assert 0 < a.ctr_std_error < 0.05
    assert a.impressions_needed is not None
    assert a.canary_share == pytest.approx(0.5, abs=0.1) and a.sample_ratio_p_value >= 0.001


def test_a_canary_users_click_ten_percent_less_is_rolled_back_with_the_numbers(
    stack: Stack,
) -> None:
    state, _, _ = roll_out(
        stack, "2", judged_spec(), limit_s=170, list_ctr=0.8, canary_click_factor=0.9
    )
    record = state.last_rollout
    assert record.outcome is RolloutOutcome.ROLLED_BACK, record
    assert state.stable_version == "1"
    assert "significantly below at 0.999 confidence" in record.reason
    a = record.last_analysis
    assert a.canary_ctr / a.stable_ctr == pytest.approx(0.9, abs=0.05)
    assert a.p_value < a.alpha == pytest.approx(0.0005)
    assert a.canary_impressions >= 2000 and a.stable_impressions >= 2000
