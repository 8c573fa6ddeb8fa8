"""The job's settings from environment variables and flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys_contracts.feature_job_settings import FeatureJobSettings, SubscriptionType
from stream_jobs.user_features import FeatureParams


def test_environment_variables_fill_the_settings() -> None:
    settings = FeatureJobSettings.from_env(
        {
            "RECSYS_SYSTEM_ID": "shop.recs",
            "RECSYS_SUBSCRIPTION_TYPE": "Failover",
            "RECSYS_WINDOWS": "5m, 1h,24h",
            "RECSYS_LAST_N": "20",
            "RECSYS_LEARNING_RATE": "0.25",
            "RECSYS_EMBEDDINGS_PATH": "/models",
            "RECSYS_ONLINE_UPDATES": "false",
            "RECSYS_METRICS_ADDRESS": "",
            "RECSYS_PULSAR_TOKEN": "secret-jwt",
            "UNRELATED": "x",
        }
    )
    assert settings.system_id == "shop.recs"
    assert settings.subscription_type is SubscriptionType.FAILOVER
    assert settings.windows == ["5m", "1h", "24h"]
    assert settings.last_n == 20 and settings.learning_rate == 0.25
    assert settings.embeddings_path == Path("/models")
    assert settings.online_updates is False
    assert settings.metrics_endpoint is None  # empty turns /metrics off
    assert "secret-jwt" not in repr(settings)


def test_the_environment_the_operator_renders_is_understood() -> None:
    """The variables of recsys_operator.render.features.feature_job_env."""
    settings = FeatureJobSettings.from_env(
        {
            "RECSYS_SYSTEM_ID": "shop.recs",
            "RECSYS_PULSAR_SERVICE_URL": "pulsar://pulsar:6650",
            "RECSYS_INTERACTIONS_TOPIC": "persistent://recsys/shop-recs/interactions",
            "RECSYS_DEAD_LETTER_TOPIC": "persistent://recsys/shop-recs/dead-letter",
            "RECSYS_SUBSCRIPTION": "recsys-features",
            "RECSYS_SUBSCRIPTION_TYPE": "KeyShared",
            "RECSYS_REDIS_URL": "redis://redis:6379/0",
            "RECSYS_REDIS_MODE": "cluster",
            "RECSYS_STORE_TTL_SECONDS": "604800",
            "RECSYS_LAST_N": "50",
            "RECSYS_WINDOWS": "1h,24h",
            "RECSYS_BATCH_SIZE": "500",
            "RECSYS_ONLINE_UPDATES": "true",
            "RECSYS_LEARNING_RATE": "0.1",
            "RECSYS_DECAY": "0.98",
            "RECSYS_MODEL_VERSION": "v3",
            "RECSYS_METRICS_ADDRESS": "0.0.0.0:9090",
            "RECSYS_MODEL_ARCHIVE_URI": "http://models/recs-v3.mar",
            "RECSYS_PULSAR_TOKEN": "jwt",
            "RECSYS_REDIS_PASSWORD": "pw",
        }
    )
    assert settings.dead_letters == "persistent://recsys/shop-recs/dead-letter"
    assert settings.store_endpoint.cluster and settings.store_endpoint.url == settings.redis_url
    assert settings.store_ttl_seconds == 604_800
    assert settings.metrics_endpoint == ("0.0.0.0", 9090)
    assert settings.model_archive_uri == "http://models/recs-v3.mar"
    assert (
        settings.redis_password is not None and settings.redis_password.get_secret_value() == "pw"
    )


def test_flags_win_over_the_environment_and_none_means_not_given() -> None:
    env = {"RECSYS_SYSTEM_ID": "a.b", "RECSYS_BATCH_SIZE": "50"}
    settings = FeatureJobSettings.from_env(env, batch_size=7, interactions_topic=None)
    assert settings.batch_size == 7
    assert settings.interactions_topic == "persistent://public/default/interactions"


def test_defaults_match_production_and_derive_the_dead_letter_topic() -> None:
    settings = FeatureJobSettings(
        system_id="a.b", interactions_topic="persistent://t/n/interactions"
    )
    assert settings.subscription_type is SubscriptionType.KEY_SHARED
    assert settings.metrics_endpoint == ("127.0.0.1", 9102)
    assert settings.dead_letters == "persistent://t/n/interactions-dead-letter"
    assert FeatureJobSettings(system_id="a.b", dead_letter_topic="dlq").dead_letters == "dlq"


def test_feature_params_are_in_milliseconds() -> None:
    params = FeatureParams.from_settings(
        FeatureJobSettings(system_id="a.b", windows=["90s", "1h30m"], session_gap="10m")
    )
    assert params.windows == (("90s", 90_000), ("1h30m", 5_400_000))
    assert params.session_gap_ms == 600_000


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"system_id": ""}, "system_id"),
        ({"windows": ["1h", "1h"]}, "windows"),
        ({"windows": ["soon"]}, "windows"),
        ({"redis_url": "http://x"}, "redis_url"),
        ({"redis_mode": "sharded"}, "redis_mode"),
        ({"redis_mode": "cluster", "redis_url": "redis://x:1/4"}, "database 0 only"),
        ({"redis_mode": "cluster", "redis_url": "unix:///run/redis.sock"}, "cluster store URL"),
        ({"subscription_type": "Exclusive"}, "subscription_type"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"metrics_address": "9102"}, "metrics_address"),
        ({"popular_half_life": "1h"}, "popular_half_life must be at least 1d"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        FeatureJobSettings.model_validate({"system_id": "a.b", **changes})
    assert field in str(info.value)


def test_the_system_id_is_required() -> None:
    with pytest.raises(ValidationError, match="system_id"):
        FeatureJobSettings.from_env({})
