"""Request ids carry the variant and model version, so any replica can attribute a click."""

from __future__ import annotations

import re

import pytest

from gateway.attribution import (
    REQUEST_ID_PATTERN,
    Attribution,
    new_request_id,
    parse_request_id,
)
from recsys_contracts.model_version import FALLBACK_MODEL_VERSION, MODEL_VERSION_PATTERN
from recsys_contracts.variant_assignment import Variant
from recsys_operator.api import recommender_system


@pytest.mark.parametrize(
    ("variant", "version"),
    [
        (Variant.STABLE, "1"),
        (Variant.CANARY, "2026-11-02"),
        (Variant.CANARY, "1.2.0"),  # dots in the version: it is the rest of the id
        (Variant.STABLE, FALLBACK_MODEL_VERSION),
    ],
)
def test_request_ids_round_trip(variant: Variant, version: str) -> None:
    request_id = new_request_id(variant, version)
    assert re.fullmatch(REQUEST_ID_PATTERN, request_id)
    assert parse_request_id(request_id) == Attribution(variant, version)


def test_request_ids_are_unique() -> None:
    assert len({new_request_id(Variant.STABLE, "1") for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "request_id",
    [
        "",
        "r-1",
        "0" * 32 + ".green.1",  # not a variant
        "0" * 31 + ".stable.1",  # short random part
        "A" * 32 + ".stable.1",  # upper-case hex
        "0" * 32 + ".stable.",  # no version
        "0" * 32 + ".stable.-1",  # version must start with a letter or digit
        "0" * 32 + ".stable.1\n",
        "0" * 32 + ".stable." + "v" * 64,  # version longer than the API allows
    ],
)
def test_anything_else_is_not_a_request_id(request_id: str) -> None:
    with pytest.raises(ValueError, match="request_id"):
        parse_request_id(request_id)


def test_versions_follow_the_api_pattern() -> None:
    # The gateway takes the pattern from the event contract; both must be the API's.
    assert MODEL_VERSION_PATTERN == recommender_system.MODEL_VERSION_PATTERN
