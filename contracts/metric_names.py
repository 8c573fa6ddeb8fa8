"""Names and labels of the metrics every component exports, in one place.

The gateway and the stream jobs export them; alert and recording rules, KEDA triggers,
dashboards and the rollout analysis query them. All are `recsys_*`; per-version metrics
carry `model_version` and `variant` (stable | canary) labels, and every metric a
`system` label (`<namespace>.<name>`), so one Prometheus can watch many systems.
Counter names end in `_total` as Prometheus exposes them (prometheus_client strips and
re-adds the suffix). The model handler's metrics are declared in `handler_metrics`.
"""

# --- labels ---------------------------------------------------------------------------
SYSTEM_LABEL = "system"
MODEL_VERSION_LABEL = "model_version"
VARIANT_LABEL = "variant"
VERSION_LABELS = (SYSTEM_LABEL, MODEL_VERSION_LABEL, VARIANT_LABEL)
"""Labels of every per-version gateway metric, in this order."""
BUCKET_LABEL = "bucket"
"""Impressions, clicks, dwell and purchases also carry a `bucket`: a hash of the user id into
ANALYSIS_BUCKETS values, independent of the variant assignment, so the rollout analysis can
measure how much users differ (cluster-robust variance). Sum over it
(`sum by (model_version, variant)`) for per-version totals."""
ANALYSIS_BUCKETS = 64
BUCKETED_LABELS = (*VERSION_LABELS, BUCKET_LABEL)

# --- gateway (histogram in seconds; counters) ------------------------------------------
GATEWAY_LATENCY = "recsys_gateway_request_duration_seconds"
GATEWAY_REQUESTS = "recsys_gateway_requests_total"  # + code
IMPRESSIONS = "recsys_impressions_total"
CLICKS = "recsys_clicks_total"
# Guardrails of the rollout analysis, attributed like clicks (through the request id).
DWELL_SECONDS = "recsys_dwell_seconds_total"  # sum of dwell_ms / 1000 of dwell events
PURCHASES = "recsys_purchases_total"
GATEWAY_FALLBACKS = "recsys_gateway_fallbacks_total"  # + reason
# Recommend requests answered 503 by admission control; system, reason (in_flight, deadline).
GATEWAY_SHED = "recsys_gateway_shed_total"
GATEWAY_IN_FLIGHT = "recsys_gateway_in_flight"  # gauge; system
GATEWAY_EVENTS_SENT = "recsys_gateway_events_sent_total"  # system, stream
GATEWAY_EVENTS_DROPPED = "recsys_gateway_events_dropped_total"  # system, reason
GATEWAY_EVENTS_BUFFERED = "recsys_gateway_events_buffered"  # gauge: buffer depth
GATEWAY_EVENTS_SPILLED = "recsys_gateway_events_spilled_total"  # system
GATEWAY_EVENTS_RESTORED = "recsys_gateway_events_restored_total"  # system
GATEWAY_ROUTING_RELOADS = "recsys_gateway_routing_reloads_total"  # result
# QA-pinned requests (X-Recsys-Variant) and their clicks, kept out of the analysis.
GATEWAY_PINNED_REQUESTS = "recsys_gateway_pinned_requests_total"  # + model_version, variant, code
GATEWAY_PINNED_CLICKS = "recsys_gateway_pinned_clicks_total"  # + model_version, variant
# Shadow phase: mirrored requests (+ model_version, outcome) and summaries of the comparisons.
GATEWAY_SHADOW_REQUESTS = "recsys_gateway_shadow_requests_total"
GATEWAY_SHADOW_OVERLAP = "recsys_gateway_shadow_overlap"  # summary; + model_version
GATEWAY_SHADOW_PREDICTED_CTR = "recsys_gateway_shadow_predicted_ctr"  # summary; + variant
GATEWAY_UNVERIFIED_REQUEST_IDS = "recsys_gateway_unverified_request_ids_total"  # system
# The best score of each answer a model ranked (VERSION_LABELS; not fallback or pinned
# answers): the served-score distribution the retraining drift trigger compares.
SERVED_TOP_SCORE = "recsys_served_top_score"
SERVED_SCORE_BUCKETS = (
    0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
    0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
)  # fmt: skip
"""Upper bounds of its buckets: the two-tower scores are cosine similarities, and a list's
best one lies above 0 (a negative one lands in the first bucket; no negative bound, so
the histogram keeps its `_sum`), hence buckets 0.05 wide from 0 to 1; anything above 1
(another model's scale) lands in +Inf, which the drift test counts like any bucket."""

# --- stream feature job -----------------------------------------------------------------
FEATURES_EVENTS = "recsys_feature_events_total"  # type, outcome
FEATURES_DEAD_LETTERED = "recsys_feature_dead_letters_total"  # reason
FEATURES_BATCH_SECONDS = "recsys_feature_batch_seconds"
FEATURES_BATCH_EVENTS = "recsys_feature_batch_events"
FEATURES_FRESHNESS = "recsys_feature_freshness_seconds"
FEATURES_STORE_ERRORS = "recsys_feature_store_errors_total"  # error
FEATURES_UNKNOWN_ITEMS = "recsys_feature_unknown_items_total"  # model_version
FEATURES_ITEM_EMBEDDINGS = "recsys_feature_item_embeddings"  # model_version
FEATURES_BACKLOG = "recsys_feature_consumer_backlog"  # topic, subscription
FEATURES_RESUBSCRIBES = "recsys_feature_resubscribes_total"
FEATURES_LAST_BATCH = "recsys_feature_last_batch_timestamp_seconds"
FEATURES_STORE_PERSISTENT = "recsys_feature_store_persistent"  # 1 AOF or RDB on, 0 off, -1 unknown

# --- event-log sink (all carry `system`; `table` is interactions | impressions) ----------
EVENT_LOG_ROWS = "recsys_event_log_rows_total"  # table: rows written in new files
EVENT_LOG_FILES = "recsys_event_log_files_total"  # table, kind (batch | compacted)
EVENT_LOG_BYTES = "recsys_event_log_bytes_total"  # table, kind: Parquet bytes written
EVENT_LOG_DUPLICATES = "recsys_event_log_duplicates_total"  # table, stage (sink | compaction)
EVENT_LOG_DEAD_LETTERED = "recsys_event_log_dead_letters_total"  # reason
EVENT_LOG_WRITE_ERRORS = "recsys_event_log_write_errors_total"  # error (retried, unacked)
EVENT_LOG_PENDING_IMPRESSIONS = "recsys_event_log_pending_impressions"  # gauge: awaiting clicks
EVENT_LOG_LAST_WRITE = "recsys_event_log_last_write_timestamp_seconds"  # gauge

# --- operator ---------------------------------------------------------------------------
OPERATOR_RECONCILES = "recsys_operator_reconciles_total"
OPERATOR_RECONCILE_ERRORS = "recsys_operator_reconcile_errors_total"
OPERATOR_RECONCILE_DURATION = "recsys_operator_reconcile_duration_seconds"
OPERATOR_ROLLOUT_DECISIONS = "recsys_operator_rollout_decisions_total"  # reason
# The drift statistic the retraining drift trigger last measured; system, source, test.
OPERATOR_TRAINING_DRIFT = "recsys_operator_training_drift"
