"""Running a stream job in the foreground until the pod (or a person) asks it to stop.

SIGTERM (the kubelet, `recsys down`) and SIGINT (Ctrl-C) set the stop event the job's
loop watches, so the job finishes its batch, writes and acks it, and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class DrainDeadline:
    """How long a stopping job keeps retrying what fails (a write, a dead letter):
    `seconds` (`drain_timeout`) from the first time it asks after `stop` was set. Then
    it gives up and leaves the rest unacked, for the next consumer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._since: float | None = None

    def expired(self, stop: threading.Event) -> bool:
        if not stop.is_set():
            return False
        if self._since is None:
            self._since = time.monotonic()
        return time.monotonic() - self._since >= self.seconds

    @staticmethod
    def pause(stop: threading.Event, seconds: float) -> None:
        """Wait `seconds` before the next try: cut short by `stop` while running, whole
        once stopping (a retry while draining must not spin)."""
        if stop.is_set():
            time.sleep(seconds)
        else:
            stop.wait(seconds)


def run_until_signalled(run: Callable[[threading.Event], None]) -> int:
    """`run(stop)` in this process, `stop` set on SIGTERM or SIGINT; the exit code."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    run(stop)
    return 0
