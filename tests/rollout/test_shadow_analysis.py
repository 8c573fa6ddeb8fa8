"""Judging the shadow phase on hand-computed numbers."""

from __future__ import annotations

from recsys_operator.api.recommender_system import ShadowSpec
from recsys_operator.api.status import AnalysisDecision
from recsys_operator.rollout.shadow_analysis import ShadowNumbers, judge_shadow, shadow_queries

SPEC = ShadowSpec(minRequests=200, minOverlap=0.2, minPredictedCtrRatio=0.9, maxErrorRate=0.01)


def judge(**numbers: float | None) -> tuple[AnalysisDecision, str]:
    base = {
        "compared": 400.0,
        "failed": 0.0,
        "mean_overlap": 0.45,
        "canary_predicted_ctr": 0.050,
        "stable_predicted_ctr": 0.052,
    }
    result = judge_shadow(ShadowNumbers(**{**base, **numbers}), SPEC)
    return result.decision, result.reason


def test_a_similar_canary_passes_with_its_numbers() -> None:
    decision, reason = judge()
    assert decision is AnalysisDecision.PASS
    assert reason == "400 compared, overlap 0.450, predicted CTR canary 0.0500 vs stable 0.0520"


def test_nothing_mirrored_is_inconclusive_never_a_pass() -> None:
    assert judge(compared=None)[0] is AnalysisDecision.INCONCLUSIVE
    assert judge(compared=0.0, failed=0.0)[0] is AnalysisDecision.INCONCLUSIVE
    assert judge(mean_overlap=None)[0] is AnalysisDecision.INCONCLUSIVE


def test_a_canary_that_fails_mirrored_requests_fails() -> None:
    # 5 of 405 failed: 0.0123 > 0.01
    decision, reason = judge(failed=5.0)
    assert decision is AnalysisDecision.FAIL
    assert reason == "canary failed 5 of 405 mirrored requests (0.0123 > maxErrorRate 0.01)"
    assert judge(failed=4.0)[0] is AnalysisDecision.PASS  # 4 of 404: 0.0099


def test_too_few_compared_waits() -> None:
    decision, reason = judge(compared=150.0)
    assert decision is AnalysisDecision.WAIT and "150, need 200" in reason


def test_low_overlap_or_predicted_ctr_fails() -> None:
    assert judge(mean_overlap=0.05)[0] is AnalysisDecision.FAIL
    # 0.046 / 0.052 = 0.885 < 0.9; 0.047 / 0.052 = 0.904 passes
    decision, reason = judge(canary_predicted_ctr=0.046)
    assert (
        decision is AnalysisDecision.FAIL and "ratio 0.885 below minPredictedCtrRatio 0.9" in reason
    )
    assert judge(canary_predicted_ctr=0.047)[0] is AnalysisDecision.PASS


def test_queries_select_the_canary_version_and_window() -> None:
    queries = shadow_queries("prod.home", "2", 600)
    assert 'system="prod.home",model_version="2"' in queries["compared"]
    assert (
        "[600s]" in queries["mean_overlap"]
        and "recsys_gateway_shadow_overlap_sum" in queries["mean_overlap"]
    )
    assert 'variant="canary"' in queries["canary_predicted_ctr"]
