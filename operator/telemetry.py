"""Names of the metrics every component exports, in one place.

The gateway and stream jobs export them; alert rules, KEDA triggers and the
rollout analysis query them. All are `recsys_*`; per-version metrics carry
`model_version` and `variant` (stable | canary) labels, and every metric a
`system` label (`<namespace>.<name>`), so one Prometheus can watch many systems.
"""

# Gateway (histogram in seconds; counters).
GATEWAY_LATENCY = "recsys_gateway_request_duration_seconds"
GATEWAY_REQUESTS = "recsys_gateway_requests_total"  # + code label
IMPRESSIONS = "recsys_impressions_total"
CLICKS = "recsys_clicks_total"
# Guardrails of the rollout analysis, attributed like clicks (through the request id).
DWELL_SECONDS = "recsys_dwell_seconds_total"  # sum of dwell_ms / 1000 of dwell events
PURCHASES = "recsys_purchases_total"
# Impressions, clicks, dwell and purchases also carry a `bucket` label: a hash of the
# user id into ANALYSIS_BUCKETS values, independent of the variant assignment, so the
# rollout analysis can measure how much users differ (cluster-robust variance).
# Sum over it (`sum by (model_version, variant)`) for per-version totals.
BUCKET_LABEL = "bucket"
ANALYSIS_BUCKETS = 64
GATEWAY_FALLBACKS = "recsys_gateway_fallbacks_total"  # + model_version, variant, reason
GATEWAY_EVENTS_SENT = "recsys_gateway_events_sent_total"  # + stream
GATEWAY_EVENTS_DROPPED = "recsys_gateway_events_dropped_total"  # + reason
GATEWAY_ROUTING_RELOADS = "recsys_gateway_routing_reloads_total"  # + result

# Stream feature job (stream_jobs/metrics.py exports these).
FEATURES_EVENTS = "recsys_feature_events_total"  # + type label
FEATURES_DEAD_LETTERED = "recsys_feature_dead_letters_total"  # + reason label
FEATURES_FRESHNESS = "recsys_feature_freshness_seconds"
FEATURES_BACKLOG = "recsys_feature_consumer_backlog"

# Operator.
OPERATOR_RECONCILES = "recsys_operator_reconciles_total"
OPERATOR_RECONCILE_ERRORS = "recsys_operator_reconcile_errors_total"
OPERATOR_RECONCILE_DURATION = "recsys_operator_reconcile_duration_seconds"
OPERATOR_ROLLOUT_DECISIONS = "recsys_operator_rollout_decisions_total"  # + reason label
