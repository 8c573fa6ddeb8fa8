"""Logging that stays readable when something fails thousands of times a second.

A broker outage makes every event fail; logging each would bury everything else
(and cost more than the requests). (The Pulsar client's own reconnect warnings are
written by the client itself, backed off by it: `gateway.event_sink.PULSAR_LOG`.) `RateLimitFilter` lets one record of a kind through per interval and
tells, on the next one let through, how many were held back. Nothing is lost that
matters: the counts live in the metrics.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitFilter(logging.Filter):
    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()  # send outcomes are logged on the Pulsar client's threads
        self._last: dict[tuple[str, int, str], float] = {}
        self._held_back: dict[tuple[str, int, str], int] = {}

    def reset(self) -> None:
        """Forget what was let through: the next record of every kind passes."""
        with self._lock:
            self._last.clear()
            self._held_back.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        # Records of one kind share a format string; the Pulsar client's come
        # pre-formatted, so their start stands in for it.
        kind = (record.name, record.levelno, str(record.msg)[:48])
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self.interval_s) < self.interval_s:
                self._held_back[kind] = self._held_back.get(kind, 0) + 1
                return False
            self._last[kind] = now
            held_back = self._held_back.pop(kind, 0)
        if held_back:
            record.msg = (
                f"{record.msg} (and {held_back} similar in the last {self.interval_s:.0f}s)"
            )
        return True


def rate_limited_logger(name: str, interval_s: float = 10.0) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, RateLimitFilter) for f in logger.filters):
        logger.addFilter(RateLimitFilter(interval_s))
    return logger
