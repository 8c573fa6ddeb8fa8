"""The run folder of a local system: everything `recsys up` writes, in one place.

    .runs/<namespace>.<name>/
      system.yaml       the desired state (the manifest; `recsys rollout ...` edits it)
      state.json        what the supervisor reports: parts, PIDs, URLs, the rollout
      rollout-action    a one-shot manual action (abort, promote), like the annotation
      routing.json      the gateway's routing, rewritten on every traffic change
      request-id.key    the gateway's request-id signing key (made once, mode 0600)
      gateway-events.spill  events a stopped gateway had not sent yet (resent at start)
      model-store/      <name>-<version>.mar archives TorchServe loads
      embeddings/       <version>.mar links: the feature job keeps every served version fresh
      trained/          models trained on synthetic data (reused across runs)
      event-log/        the offline event log: Parquet by date and hour (docs/event-log.md)
      training-verdict.json  the verdict of the last retraining run (spec.training)
      logs/             one log per part

The supervisor is the only writer of state.json; the CLI reads it, and writes only
system.yaml and rollout-action (as a user would patch a resource).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS_ROOT = Path(".runs")
SUPERVISOR_MODULE = "recsys_operator.local.supervisor"


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone.

    A PID alone can be reused by an unrelated process; PID plus start time cannot,
    so we only ever signal a process whose pair matches what we recorded."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after its ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def same_process(pid: int | None, start_time: int | None) -> bool:
    if not pid or start_time is None:
        return False
    return process_start_time(pid) == start_time


def signal_group(pid: int | None, start_time: int | None, sig: signal.Signals) -> bool:
    """Signal the process group led by `pid` (our parts run in sessions of their own),
    only if `pid` is still the process we started. True if a signal was sent."""
    if pid is None or not same_process(pid, start_time):
        return False
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @classmethod
    def for_system(cls, system_id: str, runs_root: Path = RUNS_ROOT) -> RunFolder:
        return cls(runs_root / system_id)

    @property
    def manifest(self) -> Path:
        return self.root / "system.yaml"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def action_file(self) -> Path:
        return self.root / "rollout-action"

    @property
    def routing(self) -> Path:
        return self.root / "routing.json"

    def request_id_key(self) -> str:
        """The local gateway's signing key, made on first use and kept for the folder's
        life, so a restarted gateway still verifies the ids it issued before."""
        path = self.root / "request-id.key"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_hex(32))
        return path.read_text().strip()

    @property
    def model_store(self) -> Path:
        return self.root / "model-store"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def event_log(self) -> Path:
        """Root of the offline event log (`recsys_contracts.event_log_layout`)."""
        return self.root / "event-log"

    @property
    def training_verdict(self) -> Path:
        """Where the running retraining run writes its verdict (`retraining`)."""
        return self.root / "training-verdict.json"

    @property
    def training_log(self) -> Path:
        return self.logs / "training.log"

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"

    def archive(self, model_name: str, version: str) -> Path:
        return self.model_store / f"{model_name}-{version}.mar"

    def read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state

    def supervisor_running(self) -> bool:
        """True while the supervisor that wrote state.json is alive."""
        state = self.read_state()
        if not state:
            return False
        supervisor = state.get("supervisor") or {}
        return same_process(supervisor.get("pid"), supervisor.get("startTime"))


def find_run_folders(runs_root: Path = RUNS_ROOT) -> list[RunFolder]:
    if not runs_root.is_dir():
        return []
    return sorted(
        (RunFolder(p) for p in runs_root.iterdir() if (p / "state.json").is_file()),
        key=lambda f: f.root.name,
    )
