"""`recsys events send` and `recsys features run` as users call them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from stream_support import consume
from typer.testing import CliRunner

from recsys_contracts import feature_keys as keys
from recsys_contracts.event_log_settings import EventLogSettings
from recsys_contracts.event_wire import WireFormat, decode_event, wire_format_of
from recsys_contracts.feature_job_settings import FeatureJobSettings
from recsys_operator.cli import app
from recsys_operator.launchers.process import free_port

runner = CliRunner()

LINES = [
    '{"event_id": "a1", "user_id": "u1", "item_id": "i1", "type": "click", "ts": 1767225600000}',
    "# a comment",
    "",
    '{"event_id": "a2", "user_id": "u2", "item_id": "i2", "type": "view", "ts": 1767225600001}',
    '{"event_id": "a3", "user_id": "u1", "item_id": "i3", "type": "like", "ts": 1767225600002}',
    '{"event_id": "a4", "user_id": "u3", "item_id": "i4", "type": "purchase", "ts": 1767225600003}',
    "not json at all",
]


@pytest.mark.broker
def test_events_send_sends_valid_lines_keyed_by_user_and_reports_the_rest(
    tmp_path: Path, pulsar_url: str, topic: str
) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    result = runner.invoke(
        app, ["events", "send", str(source), "--service-url", pulsar_url, "--topic", topic]
    )
    assert result.exit_code == 1, result.output
    assert f"sent 3 events to {topic}; 2 invalid lines" in result.stdout
    assert (
        "line 5: type: Input should be 'view', 'click', 'purchase', 'dwell' or 'impression'"
        in result.stderr
    )
    assert "line 7: Invalid JSON" in result.stderr
    messages = consume(pulsar_url, topic, 3, timeout=20)
    events = {
        decode_event(m.data()).event_id: (m.partition_key(), decode_event(m.data()))
        for m in messages
    }
    assert set(events) == {"a1", "a2", "a4"}
    assert all(key == event.user_id for key, event in events.values())


@pytest.mark.broker
def test_events_send_reports_a_line_that_is_no_utf8_and_sends_the_others(
    tmp_path: Path, pulsar_url: str, topic: str
) -> None:
    source = tmp_path / "events.jsonl"
    bad = b'{"event_id": "b1", "user_id": "u\xff", "item_id": "i1", "type": "view", "ts": 1767225600000}'
    source.write_bytes(LINES[0].encode() + b"\n" + bad + b"\n" + LINES[3].encode() + b"\n")
    result = runner.invoke(
        app, ["events", "send", str(source), "--service-url", pulsar_url, "--topic", topic]
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert f"sent 2 events to {topic}; 1 invalid lines" in result.stdout
    assert "line 2: " in result.stderr
    messages = consume(pulsar_url, topic, 2, timeout=20)
    assert {decode_event(m.data()).event_id for m in messages} == {"a1", "a2"}


@pytest.mark.broker
@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, WireFormat.AVRO),
        (["--wire-format", "json"], {}, WireFormat.JSON),
        ([], {"RECSYS_EVENT_WIRE_FORMAT": "json"}, WireFormat.JSON),
    ],
    ids=["default", "flag", "environment"],
)
def test_events_send_writes_avro_unless_told_to_keep_json(
    args: list[str], env: dict[str, str], expected: WireFormat, pulsar_url: str, topic: str
) -> None:
    result = runner.invoke(
        app,
        ["events", "send", "--service-url", pulsar_url, "--topic", topic, *args],
        input=LINES[0] + "\n",
        env=env,
    )
    assert result.exit_code == 0, result.output
    (message,) = consume(pulsar_url, topic, 1, timeout=20)
    assert wire_format_of(message.data()) is expected
    assert decode_event(message.data()).event_id == "a1"


def test_events_send_refuses_an_unknown_wire_format() -> None:
    result = runner.invoke(app, ["events", "send", "--wire-format", "protobuf"], input="")
    assert result.exit_code == 2
    assert "--wire-format 'protobuf': expected avro or json" in result.stderr


@pytest.mark.broker
def test_events_send_reads_stdin_and_can_fill_ids_and_times(pulsar_url: str, topic: str) -> None:
    lines = '{"user_id": "u9", "item_id": "i1", "type": "view"}\n' * 2
    result = runner.invoke(
        app,
        ["events", "send", "--fill-missing"],
        input=lines,
        env={"RECSYS_EVENTS_SERVICE_URL": pulsar_url, "RECSYS_EVENTS_TOPIC": topic},
    )
    assert result.exit_code == 0, result.output
    assert "sent 2 events" in result.stdout
    events = [decode_event(m.data()) for m in consume(pulsar_url, topic, 2, timeout=20)]
    assert len({e.event_id for e in events}) == 2  # each line got its own id
    assert all(e.ts > 1_700_000_000_000 for e in events)


@pytest.mark.broker
def test_events_send_without_fill_refuses_incomplete_events(
    tmp_path: Path, pulsar_url: str, topic: str
) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text('{"user_id": "u9", "item_id": "i1", "type": "view"}\n')
    result = runner.invoke(
        app, ["events", "send", str(source), "--service-url", pulsar_url, "--topic", topic]
    )
    assert result.exit_code == 1
    assert "line 1: event_id: Field required; ts: Field required" in result.stderr
    assert "sent 0 events" in result.stdout
    assert "1 of the invalid lines have no event_id or ts: --fill-missing" in result.stderr


@pytest.mark.parametrize("where", ["no-such-file.jsonl", "."])
def test_events_send_names_a_file_it_cannot_read_before_looking_for_a_broker(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    nowhere = ["--service-url", f"pulsar://127.0.0.1:{free_port()}", "--topic", "t"]
    result = runner.invoke(app, ["events", "send", where, *nowhere])
    assert result.exit_code == 2, result.output
    why = "no such file" if where != "." else "is a folder"
    assert f"error: cannot read events from {where}: {why}" in result.stderr
    assert isinstance(result.exception, SystemExit)  # not a FileNotFoundError


def test_features_run_reports_bad_settings_by_field() -> None:
    result = runner.invoke(
        app, ["features", "run", "--system-id", "a.b", "--learning-rate", "2", "--windows", "1h,x"]
    )
    assert result.exit_code == 2
    assert "learning_rate: Input should be less than or equal to 1" in result.stderr
    assert "windows.1:" in result.stderr


@pytest.mark.parametrize(
    ("command", "model"),
    [
        (["features", "run"], FeatureJobSettings),
        (["features", "rebuild"], FeatureJobSettings),
        (["event-log", "run"], EventLogSettings),
    ],
)
def test_the_jobs_help_shows_each_settings_default(command: list[str], model: Any) -> None:
    # The options default to None ("not given here"): the help must show the model's.
    result = runner.invoke(app, [*command, "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    lines: dict[str, str] = {}  # option -> its help, continuation lines joined
    option = ""
    for line in result.stdout.split("Options:", 1)[1].splitlines():
        if line.startswith("  -"):
            option = line.split()[0]
            lines[option] = line
        elif option:
            lines[option] += " " + line.strip()
    shown = 0
    for name, field in model.model_fields.items():
        help_text = lines.get("--" + name.replace("_", "-"))
        if help_text is None or "/ --no-" in help_text:  # not an option here, or a bool flag
            continue
        if field.is_required():
            assert f"[required: here or RECSYS_{name.upper()}]" in help_text
            continue
        default = field.get_default(call_default_factory=True)
        if default is None:
            assert "[default:" not in help_text
            continue
        text = ",".join(default) if isinstance(default, list) else str(default)
        assert f"[default: {text}]" in help_text, help_text
        shown += 1
    assert shown >= 4


def test_python_m_stream_jobs_features_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_jobs.features", "--windows", "1h,1h"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
        check=False,
    )
    assert result.returncode == 2
    assert "system_id: Field required" in result.stderr
    assert "windows: Value error, windows must be distinct" in result.stderr


def test_the_cli_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert "events" in result.stdout and "features" in result.stdout
    options = runner.invoke(app, ["features", "run", "--help"]).stdout
    for flag in (
        "--subscription-type",
        "--redis-url",
        "--model-archive-uri",
        "--metrics-address",
        "--learning-rate",
    ):
        assert flag in options


@pytest.mark.broker
@pytest.mark.redis
def test_features_rebuild_replays_the_topic_into_the_store_and_reports_what_it_did(
    tmp_path: Path, pulsar_url: str, topic: str, store_url: str, system: str
) -> None:
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    runner.invoke(
        app, ["events", "send", str(source), "--service-url", pulsar_url, "--topic", topic]
    )
    args = ["features", "rebuild", "--system-id", system, "--pulsar-service-url", pulsar_url]
    args += ["--interactions-topic", topic, "--redis-url", store_url]
    env = {"RECSYS_MAX_PAST": "3650d", "RECSYS_ONLINE_UPDATES": "false"}
    first = runner.invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    assert "read 3 events" in first.stdout and "3 applied" in first.stdout
    again = runner.invoke(app, args, env=env)
    assert "3 duplicate" in again.stdout and "applied" not in again.stdout
    store = redis.Redis.from_url(store_url)
    assert store.hget(keys.user_key(system, "u1"), "recent") == b"i1"


def test_events_send_without_a_target_says_what_it_could_not_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECSYS_EVENTS_SERVICE_URL", raising=False)
    monkeypatch.delenv("RECSYS_EVENTS_TOPIC", raising=False)
    result = runner.invoke(app, ["events", "send"], input=LINES[0] + "\n")
    assert result.exit_code == 2
    assert "no running local system found" in result.stderr and "recsys up" in result.stderr
    assert "Traceback" not in result.output


def test_events_send_to_an_unreachable_broker_fails_fast_and_clearly(tmp_path: Path) -> None:
    nowhere = ["--service-url", f"pulsar://127.0.0.1:{free_port()}"]
    nowhere += ["--topic", "persistent://public/default/nowhere", "--timeout", "2"]
    started = time.monotonic()
    result = runner.invoke(app, ["events", "send", *nowhere], input=LINES[0] + "\n")
    assert result.exit_code == 2, result.output
    assert time.monotonic() - started < 15
    assert "could not send to persistent://public/default/nowhere" in result.stderr
    assert "may still have been stored" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.broker
def test_events_send_targets_the_running_local_system_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pulsar_url: str, topic: str
) -> None:
    run = tmp_path / ".runs" / "default.quickstart"
    run.mkdir(parents=True)
    state = {
        "system": "default.quickstart",
        "supervisor": {"pid": os.getpid()},  # a live process: the system is running
        "urls": {"pulsar": pulsar_url},
        "topics": {"interactions": topic},
    }
    (run / "state.json").write_text(json.dumps(state))
    stopped = tmp_path / ".runs" / "default.stopped"
    stopped.mkdir()
    (stopped / "state.json").write_text(json.dumps({**state, "supervisor": {"pid": 2**22 + 7}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECSYS_EVENTS_SERVICE_URL", raising=False)
    monkeypatch.delenv("RECSYS_EVENTS_TOPIC", raising=False)
    result = runner.invoke(app, ["events", "send"], input=LINES[0] + "\n")
    assert result.exit_code == 0, result.output
    assert f"sent 1 events to {topic}" in result.stdout
    assert decode_event(consume(pulsar_url, topic, 1, timeout=20)[0].data()).event_id == "a1"
