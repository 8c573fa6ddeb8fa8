"""Prometheus Operator objects: what to scrape and when to alert.

Rendered only when the cluster serves `monitoring.coreos.com`.
"""

from __future__ import annotations

from typing import Any

from recsys_contracts.metric_names import (
    CLICKS,
    FEATURES_BACKLOG,
    FEATURES_EVENTS,
    GATEWAY_LATENCY,
    IMPRESSIONS,
    OPERATOR_TRAINING_DRIFT,
)
from recsys_operator.api.effective_scaling import EffectiveScaling
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.naming import (
    INSTANCE_LABEL,
    Component,
    child_name,
    metadata,
    selector_labels,
    system_id,
)
from recsys_operator.render.pods import METRICS_PORT

MONITORING_GROUP = "monitoring.coreos.com"
DEFAULT_BACKLOG_ALERT = 100_000


def build_features_metrics_service(system: RecommenderSystem) -> dict[str, Any]:
    """A headless Service so the stream jobs' metrics can be scraped through a ServiceMonitor."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(system, child_name(system, "features-metrics"), Component.FEATURES),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(system, Component.FEATURES),
            "ports": [
                {
                    "name": "metrics",
                    "port": METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_service_monitor(system: RecommenderSystem) -> dict[str, Any]:
    return {
        "apiVersion": f"{MONITORING_GROUP}/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(system, child_name(system, "metrics"), "monitoring"),
        "spec": {
            "selector": {"matchLabels": {INSTANCE_LABEL: system.metadata.name}},
            "endpoints": [
                # Stream-job and TorchServe metrics carry no `system` label of their own;
                # the gateway's (port http) already do.
                {
                    "port": "metrics",
                    "path": "/metrics",
                    "interval": "15s",
                    "relabelings": [{"targetLabel": "system", "replacement": system_id(system)}],
                },
                {"port": "http", "path": "/metrics", "interval": "15s"},
            ],
        },
    }


def build_prometheus_rule(
    system: RecommenderSystem, scaling: EffectiveScaling | None
) -> dict[str, Any]:
    name = system_id(system)
    sel = f'system="{name}"'
    p99_target = (
        scaling.target_p99_latency_ms
        if scaling
        else system.spec.rollout.analysis.max_p99_latency_ms
    )
    backlog = (
        scaling.backlog_per_replica * scaling.stream_jobs.max_replicas
        if scaling
        else DEFAULT_BACKLOG_ALERT
    )
    labels = {"system": name}
    alerts = [
        {
            "alert": "RecsysLatencyHigh",
            "expr": (
                f"histogram_quantile(0.99, sum by (le, variant) (rate({GATEWAY_LATENCY}_bucket{{{sel}}}[5m])))"
                f" * 1000 > {p99_target:g}"
            ),
            "for": "10m",
            "labels": {**labels, "severity": "warning"},
            "annotations": {
                "summary": f"{name}: p99 latency above {p99_target:g} ms",
                "description": "The {{ $labels.variant }} variant's p99 latency is {{ $value | humanize }} ms.",
            },
        },
        {
            "alert": "RecsysCtrDrop",
            "expr": (
                f"(sum(rate({CLICKS}{{{sel}}}[1h])) / sum(rate({IMPRESSIONS}{{{sel}}}[1h])))"
                f" < 0.7 * (sum(rate({CLICKS}{{{sel}}}[1d] offset 1d)) / sum(rate({IMPRESSIONS}{{{sel}}}[1d] offset 1d)))"
            ),
            "for": "30m",
            "labels": {**labels, "severity": "warning"},
            "annotations": {
                "summary": f"{name}: click-through rate fell over 30% below yesterday's"
            },
        },
        {
            "alert": "RecsysConsumerLag",
            # Every replica reports the whole subscription's backlog: max, not sum.
            "expr": f"max({FEATURES_BACKLOG}{{{sel}}}) > {backlog}",
            "for": "10m",
            "labels": {**labels, "severity": "warning"},
            "annotations": {
                "summary": f"{name}: stream feature job backlog above {backlog} events"
            },
        },
        {
            "alert": "RecsysNoEvents",
            "expr": f"sum(rate({FEATURES_EVENTS}{{{sel}}}[10m])) == 0",
            "for": "15m",
            "labels": {**labels, "severity": "critical"},
            "annotations": {"summary": f"{name}: no user events processed for 15 minutes"},
        },
    ]
    drift = system.spec.training.triggers.drift if system.spec.training else None
    if drift is not None:
        # The operator measures the drift (PSI and KS need every bucket's share, which
        # PromQL cannot take) and exports it; the trigger retrains, this alert tells people.
        alerts.append(
            {
                "alert": "RecsysDataDrift",
                "expr": f"max({OPERATOR_TRAINING_DRIFT}{{{sel}}}) > {drift.threshold:g}",
                "for": "15m",
                "labels": {**labels, "severity": "warning"},
                "annotations": {
                    "summary": (
                        f"{name}: {drift.source.value} drifted beyond {drift.test.value} "
                        f"{drift.threshold:g}"
                    ),
                    "description": (
                        f"{drift.test.value} over {drift.window} against the training window "
                        'is {{ printf "%.3f" $value }}; spec.training.triggers.drift retrains.'
                    ),
                },
            }
        )
    # Recorded series for dashboards and for comparing versions over time.
    records = [
        {
            "record": "recsys:gateway_latency_p99_ms:rate5m",
            "expr": (
                "histogram_quantile(0.99, sum by (le, model_version, variant) "
                f"(rate({GATEWAY_LATENCY}_bucket{{{sel}}}[5m]))) * 1000"
            ),
            "labels": labels,
        },
        {
            "record": "recsys:ctr:rate1h",
            "expr": (
                f"sum by (model_version, variant) (rate({CLICKS}{{{sel}}}[1h]))"
                f" / sum by (model_version, variant) (rate({IMPRESSIONS}{{{sel}}}[1h]))"
            ),
            "labels": labels,
        },
    ]
    return {
        "apiVersion": f"{MONITORING_GROUP}/v1",
        "kind": "PrometheusRule",
        "metadata": metadata(system, child_name(system, "alerts"), "monitoring"),
        "spec": {
            "groups": [
                {"name": f"recsys.{name}.records", "rules": records},
                {"name": f"recsys.{name}.alerts", "rules": alerts},
            ]
        },
    }
