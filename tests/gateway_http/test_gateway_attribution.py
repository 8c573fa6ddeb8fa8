"""Request ids carry the variant and model version, so any replica can attribute a click,
and a signature, so only ids a gateway issued count."""

from __future__ import annotations

import hmac
import re
import secrets

import pytest

from gateway.attribution import (
    REQUEST_ID_PATTERN,
    Attribution,
    HmacSha256,
    RequestIds,
    UnverifiedRequestId,
    parse_request_id,
)
from recsys_contracts.model_version import FALLBACK_MODEL_VERSION, MODEL_VERSION_PATTERN
from recsys_contracts.variant_assignment import Variant
from recsys_operator.api import recommender_system

SIGNER = RequestIds(b"k" * 32)


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
    request_id = SIGNER.issue(variant, version)
    assert re.fullmatch(REQUEST_ID_PATTERN, request_id)
    assert parse_request_id(request_id) == Attribution(variant, version)
    assert SIGNER.verify(request_id) == Attribution(variant, version)


def test_request_ids_are_unique() -> None:
    assert len({SIGNER.issue(Variant.STABLE, "1") for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "request_id",
    [
        "",
        "r-1",
        "0" * 32 + ".stable.1",  # an unsigned id of the old form
        "0" * 64 + ".green.1",  # not a variant
        "0" * 63 + ".stable.1",  # short random part
        "A" * 64 + ".stable.1",  # upper-case hex
        "0" * 64 + ".stable.",  # no version
        "0" * 64 + ".stable.-1",  # version must start with a letter or digit
        "0" * 64 + ".stable.1\n",
        "0" * 64 + ".stable." + "v" * 64,  # version longer than the API allows
    ],
)
def test_anything_else_is_not_a_request_id(request_id: str) -> None:
    with pytest.raises(ValueError, match="request_id"):
        parse_request_id(request_id)


def test_versions_follow_the_api_pattern() -> None:
    # The gateway takes the pattern from the event contract; both must be the API's.
    assert MODEL_VERSION_PATTERN == recommender_system.MODEL_VERSION_PATTERN


def test_a_forged_or_altered_request_id_does_not_verify() -> None:
    genuine = SIGNER.issue(Variant.STABLE, "1")
    forged = [
        "0" * 64 + ".canary.999",  # the shape, without the key
        genuine.replace(".stable.", ".canary."),  # a real signature, another variant
        genuine[:-1] + "2",  # another version
        genuine[:32] + "0" * 32 + ".stable.1",  # a real nonce, no signature
        RequestIds(b"x" * 32).issue(Variant.STABLE, "1"),  # another key
    ]
    for request_id in forged:
        with pytest.raises(UnverifiedRequestId):
            SIGNER.verify(request_id)


def test_after_a_rotation_ids_of_the_previous_key_verify_and_older_ones_do_not() -> None:
    old, new, newer = b"o" * 32, b"n" * 32, b"w" * 32
    issued_before = RequestIds(old).issue(Variant.CANARY, "2")
    rotated = RequestIds(new, previous_key=old)
    assert rotated.verify(issued_before) == Attribution(Variant.CANARY, "2")
    with pytest.raises(UnverifiedRequestId):
        RequestIds(newer, previous_key=new).verify(issued_before)
    # new ids are signed with the current key: the next rotation still accepts them
    assert RequestIds(newer, previous_key=new).verify(rotated.issue(Variant.STABLE, "1"))


def test_keys_come_from_the_environment_and_must_be_long_enough() -> None:
    env = {
        "RECSYS_GATEWAY_REQUEST_ID_KEY": "n" * 32,
        "RECSYS_GATEWAY_REQUEST_ID_PREVIOUS_KEY": "o" * 32,
    }
    from_env = RequestIds.from_env(env)
    assert from_env.verify(RequestIds(b"o" * 32).issue(Variant.STABLE, "1"))
    assert from_env.verify(RequestIds(b"n" * 32).issue(Variant.STABLE, "1"))
    with pytest.raises(ValueError, match="16 bytes"):
        RequestIds.from_env({"RECSYS_GATEWAY_REQUEST_ID_KEY": "short"})
    # no key: a random one, so ids of one instance do not verify at another
    one, other = RequestIds.from_env({}), RequestIds.from_env({})
    with pytest.raises(UnverifiedRequestId):
        other.verify(one.issue(Variant.STABLE, "1"))


@pytest.mark.parametrize("key_bytes", [16, 32, 64, 65, 200])
def test_the_signature_is_hmac_sha256_so_replicas_and_older_gateways_agree(key_bytes: int) -> None:
    """The precomputed HMAC must be exactly HMAC-SHA256: ids signed by a gateway of an
    earlier release (hmac.digest) still verify during a rolling update."""
    key = secrets.token_bytes(key_bytes)
    for size in (0, 1, 63, 64, 90, 1000):
        message = secrets.token_bytes(size)
        assert HmacSha256(key).digest(message) == hmac.digest(key, message, "sha256")
