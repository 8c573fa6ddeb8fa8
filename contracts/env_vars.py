"""The environment variables each deployable reads: what the operator renders into pods
(and local mode sets on processes) must be what the component reads, so both import the
names from here.

The stream feature job reads one variable per field of its settings model,
`RECSYS_<FIELD>`; `feature_job_settings.env_name` gives those names.
"""

PREFIX = "RECSYS_"


class ModelServerEnv:
    """The TorchServe handler (`model_handlers.handler_settings` says what each means)."""

    REDIS_URL = "RECSYS_REDIS_URL"
    REDIS_MODE = "RECSYS_REDIS_MODE"
    REDIS_PASSWORD = "RECSYS_REDIS_PASSWORD"
    SYSTEM_ID = "RECSYS_SYSTEM_ID"
    STORE_TIMEOUT_MS = "RECSYS_STORE_TIMEOUT_MS"
    MAX_K = "RECSYS_MAX_K"
    QUANTIZE_TOWER = "RECSYS_QUANTIZE_TOWER"
    FAISS_DEVICE = "RECSYS_FAISS_DEVICE"
    MODEL_VERSION = "RECSYS_MODEL_VERSION"
    CACHE_MAX_ENTRIES = "RECSYS_CACHE_MAX_ENTRIES"
    CACHE_TTL_MS = "RECSYS_CACHE_TTL_MS"
    SESSION_WEIGHT = "RECSYS_SESSION_WEIGHT"
    SESSION_ITEMS = "RECSYS_SESSION_ITEMS"
    SESSION_DECAY = "RECSYS_SESSION_DECAY"
    SESSION_POPULARITY_WEIGHT = "RECSYS_SESSION_POPULARITY_WEIGHT"
    SESSION_CANDIDATES = "RECSYS_SESSION_CANDIDATES"

    ALL = (
        REDIS_URL,
        REDIS_MODE,
        REDIS_PASSWORD,
        SYSTEM_ID,
        STORE_TIMEOUT_MS,
        MAX_K,
        QUANTIZE_TOWER,
        FAISS_DEVICE,
        MODEL_VERSION,
        CACHE_MAX_ENTRIES,
        CACHE_TTL_MS,
        SESSION_WEIGHT,
        SESSION_ITEMS,
        SESSION_DECAY,
        SESSION_POPULARITY_WEIGHT,
        SESSION_CANDIDATES,
    )


class GatewayEnv:
    """The gateway (`recsys gateway run`)."""

    ADDRESS = "RECSYS_GATEWAY_ADDRESS"
    """host:port to listen on when no flag gives them."""
    PULSAR_TOKEN = "RECSYS_PULSAR_TOKEN"
    """JWT for the broker the gateway sends impressions and clicks to."""
    REQUEST_ID_KEY = "RECSYS_GATEWAY_REQUEST_ID_KEY"
    """HMAC key the gateway signs request ids with (at least 16 bytes; from a Secret)."""
    REQUEST_ID_PREVIOUS_KEY = "RECSYS_GATEWAY_REQUEST_ID_PREVIOUS_KEY"
    """The key before the last rotation: ids it signed still verify."""


class EventWireEnv:
    """Every event producer (`recsys events send`, `EventProducer`, the gateway)."""

    FORMAT = "RECSYS_EVENT_WIRE_FORMAT"
    """`avro` (default) or `json`: how events are encoded (`recsys_contracts.event_wire`)."""


class OperatorEnv:
    """The operator process (`recsys operator run` / the chart's Deployment)."""

    PROMETHEUS_URL = "RECSYS_PROMETHEUS_URL"
    PROMETHEUS_NAMESPACE = "RECSYS_PROMETHEUS_NAMESPACE"
    RESYNC_SECONDS = "RECSYS_RESYNC_SECONDS"
    ROLLOUT_TICK_SECONDS = "RECSYS_ROLLOUT_TICK_SECONDS"
    TRIGGER_TICK_SECONDS = "RECSYS_TRIGGER_TICK_SECONDS"
    TOOLS_DIR = "RECSYS_TOOLS_DIR"
