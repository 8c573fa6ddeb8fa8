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
GATEWAY_FALLBACKS = "recsys_gateway_fallbacks_total"  # + model_version, variant, reason
GATEWAY_EVENTS_SENT = "recsys_gateway_events_sent_total"  # + stream
GATEWAY_EVENTS_DROPPED = "recsys_gateway_events_dropped_total"  # + reason
GATEWAY_ROUTING_RELOADS = "recsys_gateway_routing_reloads_total"  # + result
# QA-pinned requests (X-Recsys-Variant) and their clicks, kept out of the analysis.
GATEWAY_PINNED_REQUESTS = "recsys_gateway_pinned_requests_total"  # + model_version, variant, code
GATEWAY_PINNED_CLICKS = "recsys_gateway_pinned_clicks_total"  # + model_version, variant
# Shadow phase: mirrored requests (+ model_version, outcome) and summaries of the comparisons.
GATEWAY_SHADOW_REQUESTS = "recsys_gateway_shadow_requests_total"
GATEWAY_SHADOW_OVERLAP = "recsys_gateway_shadow_overlap"  # summary; + model_version
GATEWAY_SHADOW_PREDICTED_CTR = "recsys_gateway_shadow_predicted_ctr"  # summary; + variant

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
