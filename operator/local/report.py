"""What the supervisor reports in the run folder's state.json: its phase, every part with
its PID, port and log, the URLs, the rollout and the recent decisions and incidents.

The supervisor is the only writer; `recsys status`, `down` and the dashboard read it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from recsys_operator.launchers.process import ManagedProcess
from recsys_operator.local.run_folder import RunFolder, process_start_time, write_json_atomic

log = logging.getLogger("recsys.local")

MAX_EVENTS = 50


DEGRADED_EXIT_CODE = 4
"""`recsys status` exits with this while the system runs degraded (3: supervisor gone)."""


class Phase:
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Record:
    """A decision or incident shown by `recsys status` and the dashboard."""

    time: str
    reason: str
    message: str
    warning: bool = False


def part_entry(process: ManagedProcess, problem: tuple[str, str] | None = None) -> dict[str, Any]:
    """One part; `problem` is (status, why) when it was given up or fails its probes."""
    pid = process.pid
    code = process.popen.poll() if process.popen else None
    if problem is not None:
        status = problem[0]
    elif code is not None:
        status = f"exited ({code})"
    else:
        status = "running" if process.ready else "starting"
    entry = {
        "pid": pid,
        "startTime": process_start_time(pid) if pid else None,
        "port": process.port,
        "log": str(process.log_path),
        "status": status,
    }
    if problem is not None:
        entry["problem"] = problem[1]
    return entry


@dataclass
class Report:
    """The supervisor's phase and recent events, written with a snapshot of the parts."""

    folder: RunFolder
    phase: str = Phase.STARTING
    error: str | None = None
    events: deque[Record] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def record(self, reason: str, message: str, *, warning: bool = False) -> None:
        (log.warning if warning else log.info)("%s: %s", reason, message)
        self.events.append(Record(datetime.now(UTC).isoformat(), reason, message, warning))

    def document(
        self,
        *,
        system: str | None,
        desired_version: str | None,
        parts: dict[str, ManagedProcess],
        given_up: dict[str, str] | None = None,
        unhealthy: dict[str, str] | None = None,
        urls: dict[str, str],
        topics: dict[str, str],
        rollout: dict[str, Any] | None,
        training: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`given_up`: parts left stopped past their restart budget; `unhealthy`: parts
        failing their probes now (restarted once they fail enough in a row). Either makes
        the system `degraded`, which `recsys status` turns into a non-zero exit."""
        problems = {name: ("unhealthy", why) for name, why in (unhealthy or {}).items()}
        problems.update({name: ("failed", why) for name, why in (given_up or {}).items()})
        return {
            "system": system,
            "phase": self.phase,
            "error": self.error,
            "startedAt": self.started_at,
            "supervisor": {"pid": os.getpid(), "startTime": process_start_time(os.getpid())},
            "degraded": bool(problems) and self.phase == Phase.RUNNING,
            "failedParts": {name: why for name, (_, why) in problems.items()},
            "parts": {
                name: part_entry(process, problems.get(name)) for name, process in parts.items()
            },
            "urls": urls,
            # `recsys events send` targets the running system with these by default.
            "topics": topics,
            "desiredVersion": desired_version,
            "rollout": rollout,
            # Retraining (spec.training): the schedule and status.training of the last run.
            "training": training,
            "events": [vars(e) for e in self.events],
        }

    def write(self, document: Callable[[], dict[str, Any]]) -> None:
        """Write state.json with what `document` describes at this moment."""
        with self._lock:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder.state_file, document())
