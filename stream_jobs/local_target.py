"""Where `recsys events send` sends by default: the local system `recsys up` is running.

The local supervisor writes `.runs/<namespace>.<name>/state.json` with, among others,
`supervisor.pid`, `urls.pulsar` and `topics.interactions`; a system whose supervisor
process is gone is not running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

RUNS_ROOT = Path(".runs")


class LocalTargetError(RuntimeError):
    """No running local system to send to, or no single one; the message says what to do."""


@dataclass(frozen=True)
class LocalTarget:
    system: str
    service_url: str
    interactions_topic: str


def running_local_target(system: str | None = None, runs_root: Path = RUNS_ROOT) -> LocalTarget:
    running = [t for t in _targets(runs_root) if system is None or t.system == system]
    if len(running) == 1:
        return running[0]
    hint = "give --service-url and --topic (or RECSYS_EVENTS_SERVICE_URL/_TOPIC)"
    if not running:
        where = f"{runs_root.resolve()}/*/state.json"
        which = f"system {system} " if system else "local system "
        raise LocalTargetError(
            f"no running {which}found ({where}); start one with `recsys up -f FILE`, or {hint}"
        )
    names = ", ".join(sorted(t.system for t in running))
    raise LocalTargetError(f"several local systems are running ({names}): pick one with --system")


def _targets(runs_root: Path) -> list[LocalTarget]:
    found = []
    for state_file in sorted(runs_root.glob("*/state.json")):
        try:
            state = json.loads(state_file.read_text())
            pid = int(state["supervisor"]["pid"])
            target = LocalTarget(
                state["system"], state["urls"]["pulsar"], state["topics"]["interactions"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not running, still starting, or from an older version
        if _alive(pid):
            found.append(target)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
