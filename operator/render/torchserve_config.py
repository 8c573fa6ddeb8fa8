"""TorchServe's configuration files, rendered from the API models.

Three texts, which the operator puts into one ConfigMap mounted at `config_dir` (and
local mode writes to a folder):

- `config.properties`: listeners (the management API on its own address: loopback in
  pods), token auth off, model API off, the model store and
  the archives to load, per-version workers/batching/timeout in the `models=` JSON,
  Prometheus metrics with the handler's metrics declared, the JVM heap and the log
  configuration in `vmargs`;
- `log4j2.xml`: warnings and errors to the console only (TorchServe's default logs
  every request at DEBUG into files);
- `metrics.yaml`: TorchServe's own metrics plus the handler's (`recsys_*`), which
  TorchServe drops unless they are declared.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from recsys_contracts.api_base import quantity_value
from recsys_contracts.archive_layout import mar_file_name
from recsys_contracts.handler_metrics import DIMENSIONS, HANDLER_METRICS
from recsys_operator.api.recommender_system import ModelSpec, ServingSpec

CONFIG_PROPERTIES = "config.properties"
LOG4J2_XML = "log4j2.xml"
METRICS_YAML = "metrics.yaml"

DEFAULT_MODEL_STORE = "/home/model-server/model-store"
DEFAULT_CONFIG_DIR = "/home/model-server/config"

MIN_HEAP_MIB = 128
MAX_HEAP_MIB = 4096
DEFAULT_HEAP_MIB = 1024
HEAP_SHARE = 0.25
"""Share of the container's memory limit given to the JVM frontend: the Python workers,
which hold the user tower and the FAISS index, need the rest."""


@dataclass(frozen=True)
class TorchServePorts:
    """TorchServe's listeners (gRPC always starts, so its ports are set too)."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def jvm_heap_mib(memory_limit: str | int | None) -> int:
    """JVM heap for a container memory limit (a Kubernetes quantity; None: no limit)."""
    if memory_limit is None:
        return DEFAULT_HEAP_MIB
    limit_mib = quantity_value(memory_limit) / 2**20
    return int(min(MAX_HEAP_MIB, max(MIN_HEAP_MIB, limit_mib * HEAP_SHARE)))


def torchserve_batch_delay_ms(max_batch_delay_ms: int) -> int:
    """TorchServe's `maxBatchDelay` for the spec's: TorchServe reads 0 as "not set" and
    waits its default 100 ms, so "do not wait" is rendered as 1 ms."""
    return max(1, max_batch_delay_ms)


def models_json(model: ModelSpec, serving: ServingSpec, versions: Sequence[str]) -> dict[str, Any]:
    """The `models=` value: per-version archive, workers, batching and timeout."""
    default = model.version if model.version in versions else versions[0]
    return {
        model.name: {
            v: {
                "defaultVersion": v == default,
                "marName": mar_file_name(model.name, v),
                "minWorkers": serving.workers,
                "maxWorkers": serving.workers,
                "batchSize": serving.batching.max_batch_size,
                "maxBatchDelay": torchserve_batch_delay_ms(serving.batching.max_batch_delay_ms),
                "responseTimeout": serving.response_timeout_s,
            }
            for v in versions
        }
    }


def render_config_properties(
    model: ModelSpec,
    serving: ServingSpec,
    *,
    versions: Sequence[str] | None = None,
    ports: TorchServePorts = TorchServePorts(),
    bind_address: str = "0.0.0.0",
    management_bind_address: str | None = None,
    model_store: str = DEFAULT_MODEL_STORE,
    config_dir: str = DEFAULT_CONFIG_DIR,
    memory_limit: str | int | None = None,
    enable_model_api: bool = False,
) -> str:
    """The text of `config.properties`.

    `versions`: the model versions this server loads (default: `model.version`), each
    from `<model_store>/<name>-<version>.mar`; `model.version` is the default version
    when listed. `memory_limit` sizes the JVM heap (default: the serving container's
    memory limit). `config_dir` is where `log4j2.xml` and `metrics.yaml` are mounted.
    `management_bind_address` (default `bind_address`) is where the management API (HTTP
    and gRPC) listens: it can unload models and scale workers, and token auth is off, so
    pods bind it to loopback where no other pod reaches it.
    """
    versions = list(versions or [model.version])
    if len(set(versions)) != len(versions):
        raise ValueError(f"versions must be distinct, got {versions}")
    for name, path in (("model_store", model_store), ("config_dir", config_dir)):
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise ValueError(f"{name} must be an absolute path without spaces, got {path!r}")
    if memory_limit is None:
        memory_limit = serving.resources.limits.get("memory")
    heap = jvm_heap_mib(memory_limit)
    management_bind = management_bind_address or bind_address
    vmargs = [
        f"-Xmx{heap}m",
        "-XX:+ExitOnOutOfMemoryError",
        f"-Dlog4j.configurationFile=file://{config_dir}/{LOG4J2_XML}",
    ]
    properties = {
        "inference_address": f"http://{bind_address}:{ports.inference}",
        "management_address": f"http://{management_bind}:{ports.management}",
        "metrics_address": f"http://{bind_address}:{ports.metrics}",
        "grpc_inference_address": bind_address,
        "grpc_management_address": management_bind,
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_port": ports.grpc_management,
        "disable_token_authorization": "true",
        "enable_model_api": str(enable_model_api).lower(),
        "model_store": model_store,
        "load_models": ",".join(mar_file_name(model.name, v) for v in versions),
        "models": json.dumps(models_json(model, serving, versions), separators=(",", ":")),
        "default_workers_per_model": serving.workers,
        "default_response_timeout": serving.response_timeout_s,
        "job_queue_size": 1000,
        "number_of_gpu": serving.resources.gpus,
        "install_py_dep_per_model": "false",
        "metrics_mode": "prometheus",
        "metrics_config": f"{config_dir}/{METRICS_YAML}",
        "disable_system_metrics": "true",
        "vmargs": " ".join(vmargs),
    }
    lines = [
        "# TorchServe configuration rendered by recsys-operator; do not edit by hand.",
        *(f"{key}={value}" for key, value in properties.items()),
    ]
    return "\n".join(lines) + "\n"


_LOG4J2_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<!-- TorchServe logging rendered by recsys-operator: console only, {level} and above. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{{ISO8601}} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="{access}" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Logger name="MODEL_LOG" level="{level}" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Logger name="MODEL_METRICS" level="off" additivity="false"/>
    <Logger name="TS_METRICS" level="off" additivity="false"/>
    <Logger name="org.pytorch.serve" level="{level}" additivity="false"><AppenderRef ref="STDOUT"/></Logger>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Root level="{level}"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""

LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "off")


def render_log4j2_xml(*, level: str = "warn", access_log: bool = False) -> str:
    """The text of `log4j2.xml`. Metrics go to Prometheus, not to logs; `access_log`
    adds one INFO line per request."""
    level = level.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return _LOG4J2_TEMPLATE.format(level=level, access="info" if access_log else "off")


_TS_COUNTERS = {
    "Requests2XX": ("Count", ["Level", "Hostname"]),
    "Requests4XX": ("Count", ["Level", "Hostname"]),
    "Requests5XX": ("Count", ["Level", "Hostname"]),
    "ts_inference_requests_total": ("Count", ["model_name", "model_version", "hostname"]),
    "ts_inference_latency_microseconds": (
        "Microseconds",
        ["model_name", "model_version", "hostname"],
    ),
    "ts_queue_latency_microseconds": ("Microseconds", ["model_name", "model_version", "hostname"]),
}
_TS_GAUGES = {
    "QueueTime": ("Milliseconds", ["Level", "Hostname"]),
    "WorkerThreadTime": ("Milliseconds", ["Level", "Hostname"]),
    "WorkerLoadTime": ("Milliseconds", ["WorkerName", "Level", "Hostname"]),
}
_TS_MODEL_GAUGES = {
    "HandlerTime": ("ms", ["ModelName", "Level"]),
    "PredictionTime": ("ms", ["ModelName", "Level"]),
}


def _specs(table: dict[str, tuple[str, list[str]]]) -> list[dict[str, Any]]:
    return [{"name": n, "unit": unit, "dimensions": dims} for n, (unit, dims) in table.items()]


def render_metrics_yaml() -> str:
    """The text of the metrics config: TorchServe's own metrics and the handler's."""
    model_metrics: dict[str, list[dict[str, Any]]] = {
        "counter": [],
        "gauge": _specs(_TS_MODEL_GAUGES),
        "histogram": [],
    }
    for metric in HANDLER_METRICS:
        model_metrics[metric.kind].append(
            {"name": metric.name, "unit": metric.unit, "dimensions": list(DIMENSIONS)}
        )
    document = {
        "ts_metrics": {"counter": _specs(_TS_COUNTERS), "gauge": _specs(_TS_GAUGES)},
        "model_metrics": model_metrics,
    }
    header = "# TorchServe metrics rendered by recsys-operator; `recsys_*` are the handler's.\n"
    return header + yaml.safe_dump(document, sort_keys=False)


def render_torchserve_files(
    model: ModelSpec, serving: ServingSpec, **properties: Any
) -> dict[str, str]:
    """All three files by name (for a ConfigMap's `data`); keyword arguments go to
    `render_config_properties`."""
    return {
        CONFIG_PROPERTIES: render_config_properties(model, serving, **properties),
        LOG4J2_XML: render_log4j2_xml(),
        METRICS_YAML: render_metrics_yaml(),
    }
