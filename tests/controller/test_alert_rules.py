"""The rendered PrometheusRule, unit-tested with the real `promtool test rules`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.render import RenderOptions, render_system
from recsys_operator.tools import find_tool

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.prometheus

SYSTEM = 'system="recsys-prod.home-feed"'


def rules(tmp_path: Path) -> Path:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "production-gpu.yaml").read_text()))
    policies = list(yaml.safe_load_all((ROOT / "examples" / "scaling-policy.yaml").read_text()))
    objects = render_system(
        RecommenderSystem.model_validate(docs[0]),
        ScalingPolicy.model_validate(policies[1]),
        RenderOptions(monitoring=True),
    )
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def promtool_test(tmp_path: Path, tests: list[dict]) -> subprocess.CompletedProcess[str]:
    spec = {"rule_files": [str(rules(tmp_path))], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run(
        [find_tool("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_latency_alert_fires_after_ten_minutes_above_target(tmp_path: Path) -> None:
    bucket = "recsys_gateway_request_duration_seconds_bucket"
    series = [  # 600 requests a minute, all between 10 and 500 ms: p99 = 10 + 0.99 x 490 = 495.1 ms > 35 ms
        {"series": f'{bucket}{{{SYSTEM},variant="canary",le="0.01"}}', "values": "0+0x30"},
        {"series": f'{bucket}{{{SYSTEM},variant="canary",le="0.5"}}', "values": "0+600x30"},
        {"series": f'{bucket}{{{SYSTEM},variant="canary",le="+Inf"}}', "values": "0+600x30"},
    ]
    alert = {"system": "recsys-prod.home-feed", "severity": "warning", "variant": "canary"}
    result = promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": "RecsysLatencyHigh", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "RecsysLatencyHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": alert,
                                "exp_annotations": {
                                    "summary": "recsys-prod.home-feed: p99 latency above 35 ms",
                                    "description": "The canary variant's p99 latency is 495.1 ms.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_events_and_lag_alerts(tmp_path: Path) -> None:
    result = promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'recsys_feature_events_total{{{SYSTEM},type="view"}}',
                        "values": "100+0x40",
                    },
                    {
                        "series": f"recsys_feature_consumer_backlog{{{SYSTEM}}}",
                        "values": "200000+0x40",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "RecsysNoEvents",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "system": "recsys-prod.home-feed",
                                    "severity": "critical",
                                },
                                "exp_annotations": {
                                    "summary": "recsys-prod.home-feed: no user events processed for 15 minutes"
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "RecsysConsumerLag",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "system": "recsys-prod.home-feed",
                                    "severity": "warning",
                                },
                                "exp_annotations": {
                                    "summary": "recsys-prod.home-feed: stream feature job backlog above 160000 events"
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_healthy_system_raises_no_alert(tmp_path: Path) -> None:
    bucket = "recsys_gateway_request_duration_seconds_bucket"
    result = promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'{bucket}{{{SYSTEM},variant="stable",le="0.01"}}',
                        "values": "0+600x40",
                    },
                    {
                        "series": f'{bucket}{{{SYSTEM},variant="stable",le="+Inf"}}',
                        "values": "0+600x40",
                    },
                    {
                        "series": f'recsys_feature_events_total{{{SYSTEM},type="view"}}',
                        "values": "0+500x40",
                    },
                    # Two replicas each report the subscription's whole backlog (100k):
                    # below the 160k threshold, however many replicas report it.
                    {
                        "series": f'recsys_feature_consumer_backlog{{{SYSTEM},pod="a"}}',
                        "values": "100000+0x40",
                    },
                    {
                        "series": f'recsys_feature_consumer_backlog{{{SYSTEM},pod="b"}}',
                        "values": "100000+0x40",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "35m", "alertname": name, "exp_alerts": []}
                    for name in (
                        "RecsysLatencyHigh",
                        "RecsysNoEvents",
                        "RecsysConsumerLag",
                        "RecsysCtrDrop",
                    )
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_recorded_ctr_per_version(tmp_path: Path) -> None:
    result = promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'recsys_impressions_total{{{SYSTEM},model_version="2",variant="canary"}}',
                        "values": "0+100x70",
                    },
                    {
                        "series": f'recsys_clicks_total{{{SYSTEM},model_version="2",variant="canary"}}',
                        "values": "0+25x70",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": "recsys:ctr:rate1h",
                        "eval_time": "65m",
                        "exp_samples": [
                            {
                                "labels": 'recsys:ctr:rate1h{model_version="2",system="recsys-prod.home-feed",variant="canary"}',
                                "value": 0.25,  # 25 clicks per 100 impressions
                            }
                        ],
                    }
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_recorded_ctr_sums_the_user_buckets(tmp_path: Path) -> None:
    # The gateway labels impressions and clicks with a user bucket: the recorded CTR per
    # version must still be one series, over all buckets ((20 + 10) / (100 + 100)).
    version = f'{SYSTEM},model_version="2",variant="canary"'
    series = [
        {"series": f'recsys_impressions_total{{{version},bucket="{b}"}}', "values": "0+100x70"}
        for b in ("0", "1")
    ] + [
        {"series": f'recsys_clicks_total{{{version},bucket="0"}}', "values": "0+20x70"},
        {"series": f'recsys_clicks_total{{{version},bucket="1"}}', "values": "0+10x70"},
    ]
    result = promtool_test(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": "recsys:ctr:rate1h",
                        "eval_time": "65m",
                        "exp_samples": [
                            {
                                "labels": 'recsys:ctr:rate1h{model_version="2",system="recsys-prod.home-feed",variant="canary"}',
                                "value": 0.15,
                            }
                        ],
                    }
                ],
            }
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_alert_follows_the_operators_drift_reading(tmp_path: Path) -> None:
    # examples/retraining.yaml: drift of served scores by PSI, threshold 0.25.
    doc = yaml.safe_load((ROOT / "examples" / "retraining.yaml").read_text())
    objects = render_system(
        RecommenderSystem.model_validate(doc), None, RenderOptions(monitoring=True)
    )
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    path = tmp_path / "drift-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    gauge = 'recsys_operator_training_drift{system="default.retraining",source="ServedScores",test="PSI"}'
    labels = {"system": "default.retraining", "severity": "warning"}
    spec = {
        "rule_files": [str(path)],
        "evaluation_interval": "1m",
        "tests": [
            {  # 0.1 for 20 minutes, then 0.4
                "interval": "1m",
                "input_series": [{"series": gauge, "values": "0.1x20 0.4x40"}],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "RecsysDataDrift", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "RecsysDataDrift", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "RecsysDataDrift",
                        "exp_alerts": [
                            {
                                "exp_labels": labels,
                                "exp_annotations": {
                                    "summary": "default.retraining: ServedScores drifted beyond PSI 0.25",
                                    "description": "PSI over 24h against the training window is 0.400; spec.training.triggers.drift retrains.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "drift-test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [find_tool("promtool"), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # No drift trigger, no drift alert.
    del doc["spec"]["training"]["triggers"]["drift"]
    objects = render_system(
        RecommenderSystem.model_validate(doc), None, RenderOptions(monitoring=True)
    )
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert "RecsysDataDrift" not in alerts
