"""Whether each running part still answers, judged over consecutive probes.

A part is hung after PROBE_FAILURES failed probes in a row (one slow answer on a busy
machine is not a hang); the supervisor then restarts it as it would an exited one.
Parts without a probe, not yet ready, or not running are not judged.
"""

from __future__ import annotations

from recsys_operator.launchers.probes import PROBE_TIMEOUT_S
from recsys_operator.launchers.process import ManagedProcess

PROBE_FAILURES = 3
"""Failed probes in a row before a part counts as hung: with the 1 s tick and the probe
timeout, a frozen part is restarted within about 10 s."""


class Liveness:
    def __init__(self, failures: int = PROBE_FAILURES, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.failures = failures
        self.timeout = timeout
        self._failed: dict[str, tuple[int, str]] = {}
        """Part -> (failed probes in a row, the last failure's words)."""

    def hung(self, name: str, process: ManagedProcess) -> str | None:
        """Probe `name` once; the reason once it failed `failures` probes in a row."""
        if process.probe is None or not process.ready or not process.alive():
            self._failed.pop(name, None)
            return None
        problem = process.probe(process.port, self.timeout)
        if problem is None:
            self._failed.pop(name, None)
            return None
        count = self._failed.get(name, (0, ""))[0] + 1
        self._failed[name] = (count, problem)
        if count < self.failures:
            return None
        return f"failed {count} probes in a row ({problem})"

    def forget(self, name: str) -> None:
        """After a restart the count starts again."""
        self._failed.pop(name, None)

    def unhealthy(self) -> dict[str, str]:
        """Parts whose last probe failed, with how many in a row and why."""
        return {
            name: f"{count}/{self.failures} probes failed: {problem}"
            for name, (count, problem) in self._failed.items()
        }
