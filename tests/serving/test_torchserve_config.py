"""TorchServe's configuration files as the operator renders them (the TorchServe tests
start a real server with exactly this output)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import yaml

from recsys_contracts.handler_metrics import DIMENSIONS, HANDLER_METRICS
from recsys_operator.api.recommender_system import ModelSpec, ServingSpec
from recsys_operator.render.torchserve_config import (
    CONFIG_PROPERTIES,
    LOG4J2_XML,
    METRICS_YAML,
    TorchServePorts,
    jvm_heap_mib,
    render_config_properties,
    render_log4j2_xml,
    render_metrics_yaml,
    render_torchserve_files,
)

MODEL = ModelSpec(name="retrieval", version="3", embedding_dim=64)
SERVING = ServingSpec(
    workers=2,
    batching={"maxBatchSize": 16, "maxBatchDelayMs": 4},
    responseTimeoutS=7,
    resources={"requests": {"memory": "1Gi"}, "limits": {"memory": "4Gi"}},
)


def properties(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), "a key is set twice"
    return dict(pairs)


def test_listeners_auth_and_model_api_are_explicit() -> None:
    ports = TorchServePorts(
        inference=1, management=2, metrics=3, grpc_inference=4, grpc_management=5
    )
    p = properties(render_config_properties(MODEL, SERVING, ports=ports, bind_address="127.0.0.1"))
    assert p["inference_address"] == "http://127.0.0.1:1"
    assert p["management_address"] == "http://127.0.0.1:2"
    assert p["metrics_address"] == "http://127.0.0.1:3"
    assert (p["grpc_inference_address"], p["grpc_inference_port"]) == ("127.0.0.1", "4")
    assert (p["grpc_management_address"], p["grpc_management_port"]) == ("127.0.0.1", "5")
    assert p["disable_token_authorization"] == "true"
    assert p["enable_model_api"] == "false"
    assert p["metrics_mode"] == "prometheus"
    assert p["number_of_gpu"] == "0"


def test_each_version_gets_workers_batching_and_timeout() -> None:
    p = properties(
        render_config_properties(MODEL, SERVING, versions=["2", "3"], model_store="/store")
    )
    assert p["model_store"] == "/store"
    assert p["load_models"] == "retrieval-2.mar,retrieval-3.mar"
    models = json.loads(p["models"])
    assert models["retrieval"]["3"] == {
        "defaultVersion": True,
        "marName": "retrieval-3.mar",
        "minWorkers": 2,
        "maxWorkers": 2,
        "batchSize": 16,
        "maxBatchDelay": 4,
        "responseTimeout": 7,
    }
    assert models["retrieval"]["2"]["defaultVersion"] is False
    assert p["default_workers_per_model"] == "2" and p["default_response_timeout"] == "7"


def test_a_zero_batch_delay_is_rendered_as_one_millisecond() -> None:
    """TorchServe reads maxBatchDelay 0 as unset and waits 100 ms."""
    no_wait = ServingSpec(batching={"maxBatchDelayMs": 0})
    models = json.loads(properties(render_config_properties(MODEL, no_wait))["models"])
    assert models["retrieval"]["3"]["maxBatchDelay"] == 1


def test_the_jvm_heap_follows_the_memory_limit() -> None:
    p = properties(render_config_properties(MODEL, SERVING, config_dir="/etc/ts"))
    assert p["vmargs"].split() == [
        "-Xmx1024m",
        "-XX:+ExitOnOutOfMemoryError",
        "-Dlog4j.configurationFile=file:///etc/ts/log4j2.xml",
    ]
    assert p["metrics_config"] == "/etc/ts/metrics.yaml"
    explicit = properties(render_config_properties(MODEL, SERVING, memory_limit="512Mi"))
    assert explicit["vmargs"].startswith("-Xmx128m ")
    assert jvm_heap_mib(None) == 1024
    assert jvm_heap_mib("2Gi") == 512 and jvm_heap_mib(2 * 2**30) == 512
    assert jvm_heap_mib("256Gi") == 4096 and jvm_heap_mib("100Mi") == 128


def test_gpus_are_passed_on() -> None:
    gpu = ServingSpec(resources={"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}})
    assert properties(render_config_properties(MODEL, gpu))["number_of_gpu"] == "1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_store": "relative/store"}, "absolute path"),
        ({"config_dir": "/with space"}, "without spaces"),
        ({"versions": ["1", "1"]}, "distinct"),
    ],
)
def test_unusable_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_config_properties(MODEL, SERVING, **kwargs)  # type: ignore[arg-type]


def test_log4j2_is_quiet_and_console_only() -> None:
    root = ET.fromstring(render_log4j2_xml())
    assert [a.tag for a in root.find("Appenders")] == ["Console"]
    levels = {logger.get("name"): logger.get("level") for logger in root.find("Loggers")}
    assert levels["ACCESS_LOG"] == "off" and levels["MODEL_METRICS"] == "off"
    assert levels["org.pytorch.serve"] == "warn" and levels["MODEL_LOG"] == "warn"
    loud = ET.fromstring(render_log4j2_xml(level="INFO", access_log=True))
    assert {lg.get("name"): lg.get("level") for lg in loud.find("Loggers")}["ACCESS_LOG"] == "info"
    with pytest.raises(ValueError, match="level"):
        render_log4j2_xml(level="loud")


def test_the_metrics_config_declares_every_handler_metric() -> None:
    document = yaml.safe_load(render_metrics_yaml())
    model_metrics = document["model_metrics"]
    for metric in HANDLER_METRICS:
        declared = {m["name"]: m for m in model_metrics[metric.kind]}
        assert declared[metric.name]["dimensions"] == list(DIMENSIONS), metric.name
        assert metric.name.startswith("recsys_")
    assert {m["name"] for m in model_metrics["histogram"]} >= {
        "recsys_handler_latency_ms",
        "recsys_search_latency_ms",
    }
    assert {m["name"] for m in document["ts_metrics"]["counter"]} >= {
        "Requests2XX",
        "ts_inference_requests_total",
    }


def test_all_three_files_by_name() -> None:
    files = render_torchserve_files(MODEL, SERVING, versions=["3"])
    assert set(files) == {CONFIG_PROPERTIES, LOG4J2_XML, METRICS_YAML}
    assert files[CONFIG_PROPERTIES] == render_config_properties(MODEL, SERVING, versions=["3"])
