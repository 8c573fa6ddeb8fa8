"""How often a rollout rolls back a good canary, and how often it catches a bad one.

Simulated rollouts at the default spec (steps 10/25/50/100, confidence 0.95, three
analyses before promotion, up to maxInconclusive 3 holds per step), judged by

- OLD: the test before issue 17 (every impression independent, each look at
  1 - confidence, minCtrRatio 0.95): its formula is copied below;
- PER-STEP: the project's `analyse` on each step's own window (bucket-clustered
  variance, alpha spent over the steps in proportion to information and bounded by
  the union bound, the sample-ratio check): the test before cumulative looks;
- NEW: the project's `analyse` as the operator runs it: every look combines all steps
  so far (stratified by step) at the group-sequential levels of the spending plan,
  with the defaults (minCtrRatio 1.0, minDetectableDrop 0.10, power 0.8).

Users: 2,000 of them; per analysis window each user is shown Poisson(7) lists (the
issue's traffic); a user clicks a list with a propensity drawn once per rollout from
a Beta with mean 0.35 and the given concentration (50: users alike, 2: realistic
spread, 0.5: wide spread), or, for the synthetic rows, the probability that a user of
`model_handlers.synthetic` clicks one of the 10 items the ground truth ranks best
for them. Users are assigned to the canary by the gateway's sticky hash (a new salt
per rollout) and bucketed by the gateway's `analysis_bucket`. A canary "k% worse"
multiplies every user's propensity by 1 - k.

A rollback counts whatever caused it: a significant drop, or waiting out
maxInconclusive holds (too few impressions for the power asked, or a mismatch).

    .venv/bin/python benchmarks/rollout_analysis.py            # 1,000 trials per row
    .venv/bin/python benchmarks/rollout_analysis.py --quick    # 150 trials per row, < 60 s
    .venv/bin/python benchmarks/rollout_analysis.py --trials 400
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# benchmarks/gateway.py would shadow the gateway package this script imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from recsys_contracts.metric_names import ANALYSIS_BUCKETS  # noqa: E402
from recsys_contracts.variant_assignment import analysis_bucket  # noqa: E402
from recsys_operator.api.recommender_system import AnalysisSpec, RolloutSpec  # noqa: E402
from recsys_operator.api.status import AnalysisDecision  # noqa: E402
from recsys_operator.rollout.analysis import Look, StepMetrics, VariantMetrics, analyse  # noqa: E402
from recsys_operator.rollout.spending import look_alphas  # noqa: E402

USERS = 2000
LISTS_PER_USER = 7.0
MEAN_PROPENSITY = 0.35
CONCENTRATIONS = (50.0, 2.0, 0.5)
DROPS = (0.0, 0.10, 0.20)
# At 30 requests a second (`recsys demo`'s default rate) a default 5-minute window
# holds 9,000 lists: 4.5 per user of the 2,000.
DEMO_LISTS_PER_USER = 30 * 300 / USERS


def old_ctr_p_value(
    c_clicks: float, c_impr: float, s_clicks: float, s_impr: float, r: float
) -> float:
    """The analysis before issue 17: a two-proportion z-test, impressions independent."""
    p_c, p_s = c_clicks / c_impr, s_clicks / s_impr
    variance = p_c * (1 - p_c) / c_impr + r**2 * p_s * (1 - p_s) / s_impr
    diff = p_c - r * p_s
    if variance <= 0:
        return 0.0 if diff < 0 else 1.0
    return 0.5 * (1.0 + math.erf(diff / math.sqrt(variance) / math.sqrt(2.0)))


@dataclass(frozen=True)
class Window:
    """Per-bucket counts of one variant, accumulated over a step's windows."""

    impressions: np.ndarray
    clicks: np.ndarray

    def __add__(self, other: Window) -> Window:
        return Window(self.impressions + other.impressions, self.clicks + other.clicks)

    def as_buckets(self) -> tuple[dict[str, float], dict[str, float]]:
        labels = [str(b) for b in range(ANALYSIS_BUCKETS)]
        return dict(zip(labels, self.impressions.tolist(), strict=True)), dict(
            zip(labels, self.clicks.tolist(), strict=True)
        )


class Population:
    """Users with fixed click propensities, buckets as the gateway computes them."""

    def __init__(
        self, propensity: Callable[[np.random.Generator], np.ndarray], lists_per_user: float
    ):
        self.propensity = propensity
        self.lists_per_user = lists_per_user
        self.bucket = np.array([int(analysis_bucket(f"u{u:04d}")) for u in range(USERS)])

    def window(
        self, rng: np.random.Generator, propensity: np.ndarray, on_canary: np.ndarray, drop: float
    ) -> tuple[Window, Window]:
        lists = rng.poisson(self.lists_per_user, USERS)
        p = np.where(on_canary, propensity * (1 - drop), propensity)
        clicks = rng.binomial(lists, p)
        sides = []
        for side in (on_canary, ~on_canary):
            sides.append(
                Window(
                    np.bincount(self.bucket[side], lists[side], ANALYSIS_BUCKETS),
                    np.bincount(self.bucket[side], clicks[side], ANALYSIS_BUCKETS),
                )
            )
        return sides[0], sides[1]


def beta_users(concentration: float) -> Callable[[np.random.Generator], np.ndarray]:
    a = MEAN_PROPENSITY * concentration
    return lambda rng: rng.beta(a, concentration - a, USERS)


def synthetic_users() -> Callable[[np.random.Generator], np.ndarray]:
    """P(a synthetic user clicks one of the 10 items the ground truth ranks best for them)."""
    from model_handlers.synthetic import SyntheticConfig, SyntheticWorld

    world = SyntheticWorld(SyntheticConfig(users=USERS))
    at = world.end_ms
    items = np.arange(world.config.items)
    list_ctr = np.empty(USERS)
    for u in range(USERS):
        p = world.click_probability_by_index(np.full(len(items), u), items, at)
        top = np.sort(p)[-10:]
        list_ctr[u] = 1 - np.prod(1 - top)
    return lambda rng: list_ctr


def old_rollout(population: Population, rng: np.random.Generator, drop: float) -> bool:
    """True when rolled back. The old rules: min 500 impressions, each look at 0.05."""
    steps, alpha, min_ratio, min_impressions = [10, 25, 50], 0.05, 0.95, 500
    propensity = population.propensity(rng)
    position = rng.random(USERS) * 100
    for weight in steps:
        canary, stable = population.window(rng, propensity, position < weight, drop)
        n_c, n_s = canary.impressions.sum(), stable.impressions.sum()
        if n_c < min_impressions or n_s < min_impressions:
            continue  # (holds, then judges the next window: never the case at this traffic)
        p = old_ctr_p_value(canary.clicks.sum(), n_c, stable.clicks.sum(), n_s, min_ratio)
        if p < alpha:
            return True
    return False


@dataclass
class Outcome:
    rolled_back: bool
    waited_out: bool = False
    windows: int = 0


def metrics(window: Window) -> VariantMetrics:
    impressions, clicks = window.as_buckets()
    return VariantMetrics(10.0, float(window.impressions.sum()), 0.0, impressions, clicks)


def new_rollout(
    population: Population,
    rng: np.random.Generator,
    drop: float,
    spec: RolloutSpec,
    cumulative: bool = True,
) -> Outcome:
    """Drive the project's analysis through the steps as the state machine does.

    cumulative: every look combines all steps so far (the operator's analysis);
    otherwise each look judges its own step's window (the test before it)."""
    propensity = population.propensity(rng)
    position = rng.random(USERS) * 100
    windows = 0
    earlier: list[StepMetrics] = []
    for step, weight in enumerate(spec.steps):
        if weight == 100:
            return Outcome(False, windows=windows)
        if cumulative:
            look = Look.at(
                spec.steps,
                step,
                spec.analysis.confidence,
                sample_ratio_p_value=spec.analysis.sample_ratio_p_value,
            )
        else:  # the per-step test as it was: union-bound shares in proportion to information
            alpha = look_alphas(spec.steps, 1 - spec.analysis.confidence, rho=1.0)[step]
            look = Look(step=step, weight=weight, alpha=alpha)
        on_canary = position < weight
        canary, stable = population.window(rng, propensity, on_canary, drop)
        windows += 1
        for holds in range(spec.max_inconclusive + 1):
            result = analyse(metrics(canary), metrics(stable), spec.analysis, look, earlier)
            if result.decision is AnalysisDecision.FAIL:
                return Outcome(True, windows=windows)
            if result.decision is AnalysisDecision.PASS:
                if cumulative:
                    earlier.append(StepMetrics(metrics(canary), metrics(stable)))
                break
            if holds == spec.max_inconclusive:
                return Outcome(True, waited_out=True, windows=windows)
            more_canary, more_stable = population.window(rng, propensity, on_canary, drop)
            canary, stable = canary + more_canary, stable + more_stable
            windows += 1
    return Outcome(False, windows=windows)


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000, help="rollouts per row")
    parser.add_argument("--quick", action="store_true", help="150 trials per row, fewer rows")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    trials = 150 if args.quick else args.trials
    spec = RolloutSpec(analysis=AnalysisSpec())
    started = time.monotonic()
    print(
        f"# rollout analysis: {trials} rollouts per cell, {USERS} users, steps {spec.steps}, "
        f"machine {platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(
        "# NEW defaults: minCtrRatio 1.0, minDetectableDrop 0.10, power 0.8, confidence 0.95; "
        "OLD: minCtrRatio 0.95, each look at 0.05, binomial variance"
    )

    populations: list[tuple[str, Population]] = [
        (f"Beta users, concentration {c:g}", Population(beta_users(c), LISTS_PER_USER))
        for c in CONCENTRATIONS
    ]
    if not args.quick:
        synthetic = synthetic_users()
        mean = float(synthetic(np.random.default_rng(0)).mean())
        populations.append(
            (f"synthetic users (list CTR {mean:.2f})", Population(synthetic, LISTS_PER_USER))
        )
        populations.append(
            (
                f"Beta 2, demo traffic ({DEMO_LISTS_PER_USER:g} lists/user/window)",
                Population(beta_users(2.0), DEMO_LISTS_PER_USER),
            )
        )
    print(
        "\n| users | canary | OLD rolled back | PER-STEP rolled back | NEW rolled back "
        "| NEW of which waited out | NEW mean windows |"
    )
    print("|---|---|---|---|---|---|---|")
    headline: dict[str, float] = {}
    for p_index, (name, population) in enumerate(populations):
        for drop in DROPS:
            rng_old = np.random.default_rng([args.seed, p_index, int(drop * 100), 0])
            rng_step = np.random.default_rng([args.seed, p_index, int(drop * 100), 1])
            rng_new = np.random.default_rng([args.seed, p_index, int(drop * 100), 2])
            old = [old_rollout(population, rng_old, drop) for _ in range(trials)]
            per_step = [
                new_rollout(population, rng_step, drop, spec, cumulative=False).rolled_back
                for _ in range(trials)
            ]
            new = [new_rollout(population, rng_new, drop, spec) for _ in range(trials)]
            canary = "identical" if drop == 0 else f"{drop:.0%} worse CTR"
            new_rate = rate([o.rolled_back for o in new])
            print(
                f"| {name} | {canary} | {rate(old):.1%} | {rate(per_step):.1%} | {new_rate:.1%} | "
                f"{rate([o.waited_out for o in new]):.1%} | {np.mean([o.windows for o in new]):.2f} |",
                flush=True,
            )
            for prefix, row in (("Beta users, concentration 2", ""), ("Beta 2, demo", "demo ")):
                if name.startswith(prefix):
                    headline[f"{row}old {drop}"] = rate(old)
                    headline[f"{row}per-step {drop}"] = rate(per_step)
                    headline[f"{row}new {drop}"] = new_rate
    if not args.quick:
        # The old default tolerance with the new statistics: fewer rollbacks of a canary
        # a little worse, far less power against a 10% drop (half the distance).
        margin = RolloutSpec(analysis=AnalysisSpec(min_ctr_ratio=0.95))
        population = Population(beta_users(2.0), LISTS_PER_USER)
        print("\n| NEW with minCtrRatio 0.95, Beta 2 | canary | rolled back |")
        print("|---|---|---|")
        for drop in DROPS:
            rng = np.random.default_rng([args.seed, 99, int(drop * 100)])
            outcomes = [new_rollout(population, rng, drop, margin) for _ in range(trials)]
            canary = "identical" if drop == 0 else f"{drop:.0%} worse CTR"
            print(f"| | {canary} | {rate([o.rolled_back for o in outcomes]):.1%} |", flush=True)
    print()
    for row, label in (("", "defaults, realistic spread"), ("demo ", "demo traffic")):
        if f"{row}new 0.0" not in headline:
            continue
        print(f"{label}:")
        for drop, what in ((0.0, "A/A false rollback rate"), (0.1, "power at 10% worse")):
            print(
                f"{what}: {headline[f'{row}new {drop}']:.3f} (per-step test "
                f"{headline[f'{row}per-step {drop}']:.3f}, old test {headline[f'{row}old {drop}']:.3f})"
            )
    print(f"elapsed: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
