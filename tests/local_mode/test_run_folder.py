"""Which run folder a command means, and that a recorded PID is only signalled while it
is still the process that was recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from recsys_operator.local.cli import resolve_folder
from recsys_operator.local.run_folder import (
    RunFolder,
    process_start_time,
    same_process,
    signal_group,
)


def write_state(root: Path, pid: int, start_time: int | None) -> RunFolder:
    root.mkdir(parents=True)
    (root / "state.json").write_text(
        json.dumps({"supervisor": {"pid": pid, "startTime": start_time}})
    )
    return RunFolder(root)


def test_the_running_system_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    me = os.getpid()
    write_state(Path(".runs/default.old"), me, (process_start_time(me) or 0) + 1)  # stale
    running = write_state(Path(".runs/default.live"), me, process_start_time(me))
    assert resolve_folder(None).root == running.root
    write_state(Path(".runs/default.other"), me, process_start_time(me))
    with pytest.raises(typer.Exit):  # two running: the user must choose
        resolve_folder(None)


def test_a_reused_pid_is_never_signalled() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
    )
    try:
        started = process_start_time(child.pid)
        assert same_process(child.pid, started)
        # The same PID with another start time is another process: left alone.
        assert not signal_group(child.pid, (started or 0) + 1, signal.SIGTERM)
        assert child.poll() is None
        assert signal_group(child.pid, started, signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
        assert not same_process(child.pid, started)
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.parametrize(
    ("version", "refusal"),
    [
        ("1", "spec.model.version is already '1': roll out another version"),
        ("v 2", "--version 'v 2' cannot run:"),
    ],
)
def test_rollout_start_refuses_a_version_it_cannot_roll_out_before_training(
    version: str, refusal: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from recsys_operator.cli import app

    me = os.getpid()  # stands for the running supervisor
    folder = write_state(tmp_path / "run", me, process_start_time(me))
    examples = Path(__file__).resolve().parents[2] / "examples"
    desired = (examples / "quickstart.yaml").read_text()
    folder.manifest.write_text(desired)
    result = CliRunner().invoke(
        app, ["rollout", "start", "--version", version, "--run-dir", str(folder.root)]
    )
    assert result.exit_code == 1, result.output
    assert refusal in result.stderr
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert folder.manifest.read_text() == desired  # the desired state is untouched
    assert not (folder.root / "trained").exists() and not (folder.root / "model-store").exists()


RECSYS_SIMULATE = [sys.executable, "-m", "recsys_operator.cli", "simulate", "--no-dashboard"]


def test_simulate_ends_by_itself_when_the_system_stops(tmp_path: Path) -> None:
    from recsys_operator.launchers.process import free_port

    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = write_state(tmp_path / "run", supervisor.pid, process_start_time(supervisor.pid))
        state = json.loads(folder.state_file.read_text())
        state["urls"] = {"gateway": f"http://127.0.0.1:{free_port()}"}  # nothing answers
        folder.state_file.write_text(json.dumps(state))
        examples = Path(__file__).resolve().parents[2] / "examples"
        folder.manifest.write_text((examples / "quickstart.yaml").read_text())
        simulate = subprocess.Popen(
            [*RECSYS_SIMULATE, "--run-dir", str(folder.root), "--rate", "5"],  # until Ctrl-C
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(3)
            assert simulate.poll() is None, simulate.communicate()
            supervisor.kill()  # what `recsys down` leaves: no supervisor
            supervisor.wait()  # reaped, as init reaps the detached one (no zombie left)
            out, err = simulate.communicate(timeout=30)
        finally:
            if simulate.poll() is None:
                simulate.kill()
                simulate.wait()
        assert simulate.returncode == 0, err
        assert "stopped early: the local system is no longer running" in out
    finally:
        supervisor.kill()
        supervisor.wait()
