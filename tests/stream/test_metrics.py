"""The feature job's metrics: a batch's freshness counted at once reads as one by one."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from stream_jobs.metrics import FRESHNESS_BUCKETS, observe_all


def samples(registry: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_observing_a_batch_at_once_counts_what_observing_one_by_one_counts() -> None:
    rng = random.Random(7)
    # On the bounds exactly, between them, zero, past the last, negative, none at all.
    amounts = [*FRESHNESS_BUCKETS, 0.0, 1e9, -1.0, *(rng.expovariate(2.0) for _ in range(500))]
    for batch in ([], amounts[:1], amounts):
        one, at_once = CollectorRegistry(), CollectorRegistry()
        by_one = Histogram("fresh", "f", buckets=FRESHNESS_BUCKETS, registry=one)
        batched = Histogram("fresh", "f", buckets=FRESHNESS_BUCKETS, registry=at_once)
        for amount in batch:
            by_one.observe(amount)
        observe_all(batched, batch)
        expected, got = samples(one), samples(at_once)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12), name
