"""The gateway's event encoding: Avro by default, JSON kept by its environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ENCODE = textwrap.dedent(
    """
    from gateway.events import impression_payload
    from recsys_contracts.event_wire import decode_record, wire_format_of

    payload = impression_payload(
        event_id="e1", user_id="u1", item_ids=["i3", "i1"], request_id="r1", model_version="v2",
        ts_ms=1767225600000,
    )
    record = decode_record(payload)
    print(wire_format_of(payload).value, record["item_ids"], record["model_version"])
    """
)


def gateway_encoding(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_EVENT_WIRE_FORMAT"}
    return subprocess.run(
        [sys.executable, "-c", ENCODE],
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("environment", "expected"),
    [({}, "avro"), ({"RECSYS_EVENT_WIRE_FORMAT": "json"}, "json")],
    ids=["default", "keep-json"],
)
def test_impressions_are_avro_unless_the_environment_keeps_json(
    environment: dict[str, str], expected: str
) -> None:
    done = gateway_encoding(environment)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [expected, "['i3',", "'i1']", "v2"]


def test_a_misspelt_format_stops_the_gateway_with_its_name() -> None:
    done = gateway_encoding({"RECSYS_EVENT_WIRE_FORMAT": "avor"})
    assert done.returncode != 0
    assert "RECSYS_EVENT_WIRE_FORMAT='avor': expected one of avro, json" in done.stderr
