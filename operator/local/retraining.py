"""Local mode's retraining: spec.training's runs against the run folder's event log.

In a cluster a CronJob runs `recsys retrain` on `spec.training.schedule`. A local system
lives for minutes, not days, so here the supervisor starts the same command as a child
process every `--retrain-every` (`recsys up`; the cron schedule is not read locally),
one run at a time and none during a rollout, against the run folder: the log the event-log sink writes
(`event-log/`) and the model store TorchServe loads (`model-store/`). The stable version
it is compared with is the one serving as stable at the moment the run starts.

Each verdict becomes status.training as the operator records it (spec.model.version
noted when the verdict is first seen), an event, and `training` in state.json. With
`autoRollout`, the operator's own rule (`desired_model.serving_system`) stands a passing
candidate in for spec.model, so the local rollout canaries it exactly as it would a
version a person set; a gated-out or failed run publishes nothing and serving is left
alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from recsys_contracts.training_report import GateResult, TrainingVerdict
from recsys_operator.api.desired_model import serving_system
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.api.status import RecommenderSystemStatus, TrainingStatus
from recsys_operator.controller.training_runs import training_status
from recsys_operator.local.model_source import link_embeddings
from recsys_operator.local.run_folder import RunFolder
from recsys_operator.local.traffic import Say
from recsys_operator.render.training import retrain_args

log = logging.getLogger("recsys.local")

DEFAULT_EVERY_S = 300.0
"""`recsys up` without --retrain-every: a run every five minutes when spec.training is set."""
TRAINING_THREADS = 1
"""The run shares the machine with every serving part: one CPU thread."""

EVENT_REASONS = {
    GateResult.PASSED: "TrainingPassed",
    GateResult.GATED_OUT: "TrainingGatedOut",
    GateResult.FAILED: "TrainingFailed",
}


def retrain_command(system: RecommenderSystem, folder: RunFolder, stable_version: str) -> list[str]:
    """`recsys retrain` with the spec's window and gate on the run folder's log and store:
    `system` is the localized one (`desired_state.localize` points spec.training's URIs
    at the run folder, and the candidate's archiveUri follows from the same URI)."""
    training = system.spec.training
    assert training is not None
    return [
        sys.executable, "-m", "recsys_operator.cli",
        *retrain_args(
            system,
            training.log_uri,
            training.model_store_uri,
            stable_version,
            TRAINING_THREADS,
            str(folder.training_verdict.resolve()),
        ),
    ]  # fmt: skip


class LocalTraining:
    """Starts a run when one is due, reads its verdict when it ends, and keeps
    status.training for the rollout and state.json."""

    def __init__(
        self,
        folder: RunFolder,
        every_s: float | None,
        record: Say,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.every_s = every_s
        self.status: TrainingStatus | None = None
        self.runs = 0
        self._record = record
        self._clock = clock
        self._next_at: float | None = None
        """Set by the first step: the interval counts from the moment the system runs."""
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._stable = ""

    # -- the schedule --------------------------------------------------------------

    def collect(self, system: RecommenderSystem) -> None:
        """Read the verdict of a run that ended."""
        if self._process is not None and self._process.poll() is not None:
            self._finish(system)

    def start_when_due(
        self, system: RecommenderSystem, stable_version: str, rolling_out: bool
    ) -> None:
        """Start a run when one is due, none is going and no rollout is pending or in
        progress (`rolling_out`: the stable a run would be compared with is about to
        change, and its verdict would replace the candidate on its way)."""
        training = system.spec.training
        if training is None or training.suspend or not self.every_s:
            return
        if self._next_at is None:
            self._next_at = self._clock() + self.every_s
        if self._process is None and not rolling_out and self._clock() >= self._next_at:
            self._next_at = self._clock() + self.every_s
            self._start(system, stable_version)

    def _start(self, system: RecommenderSystem, stable_version: str) -> None:
        self.folder.training_verdict.unlink(missing_ok=True)
        self.folder.logs.mkdir(parents=True, exist_ok=True)
        command = retrain_command(system, self.folder, stable_version)
        env = {**os.environ, "OMP_NUM_THREADS": str(TRAINING_THREADS)}
        with open(self.folder.training_log, "ab") as out:
            self._process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own group: stopped with it, never half of it
            )
        self._started_at = self._clock()
        self._stable = stable_version
        self.runs += 1
        self._record(
            "TrainingStarted",
            f"run {self.runs}: retraining from the event log against stable {stable_version} "
            f"(log {self.folder.training_log})",
        )

    def _finish(self, system: RecommenderSystem) -> None:
        assert self._process is not None
        code = self._process.returncode
        self._process = None
        verdict = self._read_verdict()
        if verdict is None:
            self._record(
                "TrainingFailed",
                f"run {self.runs} exited with code {code} without a verdict; "
                f"see {self.folder.training_log}",
                warning=True,
            )
            return
        self.status = training_status(verdict, "local", system, self.status)
        if verdict.result is GateResult.PASSED and verdict.archive:
            link_embeddings(
                self.folder, verdict.candidate_version, self.folder.model_store / verdict.archive
            )
        self._record(
            EVENT_REASONS[verdict.result],
            f"candidate {verdict.candidate_version}: {verdict.reason}",
            warning=verdict.result is GateResult.FAILED,
        )

    def _read_verdict(self) -> TrainingVerdict | None:
        try:
            return TrainingVerdict.model_validate_json(self.folder.training_verdict.read_text())
        except (OSError, ValueError, ValidationError):
            return None

    # -- what the rollout serves -----------------------------------------------------

    def serving(self, system: RecommenderSystem) -> RecommenderSystem:
        """`system` with status.training, as the operator's rule serves it (with
        autoRollout, a passing candidate in place of spec.model)."""
        if self.status is None:
            return system
        status = (system.status or RecommenderSystemStatus()).model_copy(
            update={"training": self.status}
        )
        return serving_system(system.model_copy(update={"status": status}))

    # -- reporting and stopping ------------------------------------------------------

    def describe(self) -> dict[str, Any] | None:
        if self.every_s is None:
            return None
        running = self._process is not None
        return {
            "everySeconds": self.every_s,
            "runs": self.runs,
            "running": running,
            "runningForSeconds": round(self._clock() - self._started_at) if running else None,
            "nextRunInSeconds": (
                max(0, round(self._next_at - self._clock())) if self._next_at else None
            ),
            "log": str(self.folder.training_log),
            "status": self.status.to_wire() if self.status else None,
        }

    def stop(self) -> None:
        """Stop a run in progress (it publishes nothing: the archive is written last)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
