"""The handler's request contract: what is accepted, and the reason for what is not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_contracts.retrieval_request import (
    MAX_LIST_LENGTH,
    BadRequest,
    RetrievalRequest,
    decode_body,
    parse_request,
)


def test_a_full_request_is_parsed() -> None:
    body = {"user_id": "u1", "recent_item_ids": ["a", "b"], "k": 7, "exclude_item_ids": ["c"]}
    assert parse_request(body, max_k=50) == RetrievalRequest("u1", ("a", "b"), 7, ("c",))


def test_everything_but_the_body_is_optional_and_k_defaults_to_max_k() -> None:
    assert parse_request({}, max_k=50) == RetrievalRequest(None, (), 50, ())
    assert parse_request({"user_id": None, "recent_item_ids": None}, max_k=3).k == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "must be a JSON object, got a list"),
        ({"k": 1.5}, "k must be an integer, got the number 1.5"),
        ({"k": 51}, "k must be between 1 and 50, got 51"),
        ({"user_id": ""}, "user_id must be a non-empty string"),
        ({"user_id": "x" * 300}, "a string of 300 characters"),
        ({"recent_item_ids": ["a", None]}, "recent_item_ids[1] must be a non-empty string"),
        (
            {"exclude_item_ids": {"a": 1}},
            "exclude_item_ids must be a list of strings, got an object",
        ),
        ({"exclude_item_ids": ["a"] * (MAX_LIST_LENGTH + 1)}, f"at most {MAX_LIST_LENGTH}"),
        ({"user_id": "u", "K": 5, "extra": 1}, "unknown field(s) K, extra"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: Any, reason: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_request(body, max_k=50)
    assert reason in refused.value.reason and refused.value.status == 400


@pytest.mark.parametrize(
    ("raw", "json_decoded", "expected"),
    [
        (b'{"k": 3}', False, {"k": 3}),
        (bytearray(b'{"k": 3}'), False, {"k": 3}),
        ('{"k": 3}', False, {"k": 3}),
        ({"k": 3}, True, {"k": 3}),
        ("a JSON string", True, "a JSON string"),
    ],
)
def test_bodies_are_decoded_once(raw: Any, json_decoded: bool, expected: Any) -> None:
    assert decode_body(raw, json_decoded=json_decoded) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(None, "no body"), (b"  ", "no body"), (b"\xff", "UTF-8"), (b"{", "not valid JSON")],
)
def test_undecodable_bodies_are_refused(raw: Any, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        decode_body(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": json_values,
        "k": json_values | st.integers(-5, 60),
        "recent_item_ids": json_values | st.lists(st.text(min_size=1, max_size=4), max_size=5),
        "exclude_item_ids": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, request_like))
def test_any_json_is_either_a_valid_request_or_refused_with_a_reason(body: Any) -> None:
    raw = json.dumps(body).encode()
    try:
        parsed = parse_request(decode_body(raw), max_k=50)
    except BadRequest as refused:
        assert refused.reason and refused.status == 400
        return
    assert 1 <= parsed.k <= 50
    assert parsed.user_id is None or (isinstance(parsed.user_id, str) and parsed.user_id)
    assert all(isinstance(i, str) and i for i in parsed.recent_item_ids + parsed.exclude_item_ids)
