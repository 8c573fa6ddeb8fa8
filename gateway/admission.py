"""Admission control: a bounded number of recommend requests in flight, and deadlines.

Under overload a gateway that accepts everything queues requests behind a saturated
model server: every request waits out the serving timeout and gets a fallback, p99 goes
to seconds, and the model server still computes the answers nobody waits for. Instead:

- at most `Routing.max_in_flight` recommend requests are worked on at once; one more is
  answered 503 with Retry-After at once (`ShedReason.IN_FLIGHT`);
- each admitted request has a deadline, its start plus the routing's `timeoutMs`; when
  less than `MIN_SERVING_BUDGET_S` of it is left before the serving call (the event loop
  was too busy to start it in time) it is answered 503 too (`ShedReason.DEADLINE`);
- the serving call gets only what is left of the deadline, and the model server is told
  the deadline (`recsys_contracts.retrieval_request.DEADLINE_HEADER`) so it skips the
  requests that outlived it instead of computing them.

Shed requests get a 503, not the popularity fallback: a fallback answer looks like a
success to the client and to autoscaling, publishes an impression per request from a
gateway that is already overloaded, and is what made overload look like "88% fallbacks
at p99 5 s". The fallback stays the answer to a *failing* model server.
"""

from __future__ import annotations

import time
from enum import StrEnum

# Below this much time left there is no point in calling the model server.
MIN_SERVING_BUDGET_S = 0.005
# What a shed request's Retry-After says (seconds; HTTP allows whole seconds only).
RETRY_AFTER_S = 1


class ShedReason(StrEnum):
    """The `reason` label of `recsys_gateway_shed_total`."""

    IN_FLIGHT = "in_flight"
    DEADLINE = "deadline"


class InFlightLimit:
    """A counter of requests being worked on. Not a semaphore on purpose: nobody waits
    for a slot (a wait is exactly the queue this exists to avoid); `try_enter` says no."""

    def __init__(self) -> None:
        self.count = 0

    def try_enter(self, limit: int) -> bool:
        if self.count >= limit:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


class Deadline:
    """When the answer is no longer worth computing (monotonic and wall clock)."""

    def __init__(self, started: float, timeout_s: float) -> None:
        self._at = started + timeout_s  # time.perf_counter() scale
        self.wall_ms = int((time.time() + self.remaining_s()) * 1000)

    def remaining_s(self) -> float:
        return self._at - time.perf_counter()
