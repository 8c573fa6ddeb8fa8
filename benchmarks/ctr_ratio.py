"""The relative change of a click-through rate between two arms, with its 95% interval:
the delta method on log(p_b / p_a) (unpooled), what the end-to-end and the
continuous-learning benchmarks both report."""

from __future__ import annotations

import math

Z95 = 1.959964


def relative_ctr_change(
    clicks_a: int, n_a: int, clicks_b: int, n_b: int
) -> tuple[float, float, float]:
    """(p_b / p_a - 1, low, high) of arm b against arm a."""
    p_a, p_b = clicks_a / n_a, clicks_b / n_b
    se_log = math.sqrt((1 - p_a) / (n_a * p_a) + (1 - p_b) / (n_b * p_b))
    ratio = p_b / p_a
    return ratio - 1, ratio * math.exp(-Z95 * se_log) - 1, ratio * math.exp(Z95 * se_log) - 1
