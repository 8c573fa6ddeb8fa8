"""Running a stream job in the foreground until the pod (or a person) asks it to stop.

SIGTERM (the kubelet, `recsys down`) and SIGINT (Ctrl-C) set the stop event the job's
loop watches, so the job finishes its batch, writes and acks it, and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


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
