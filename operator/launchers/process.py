"""A child process the project started itself: logs to a file, waits until its
port answers, and is stopped by its own PID only (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from recsys_operator.launchers.probes import Probe

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral
    range. A port the kernel hands out (bind to 0) comes from that range, and so does
    the source port of every outgoing connection: one opened before the server binds
    (TorchServe's JVM takes seconds) can take it. Random, so that concurrent callers
    (test workers, several systems starting) rarely pick the same one."""
    if LISTEN_PORTS is not None:
        low, high = LISTEN_PORTS
        for _ in range(200):
            port = _PORTS.randint(low, high)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    continue  # in use (or in TIME_WAIT): another
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))  # that range is full: one the kernel picks
        return int(s.getsockname()[1])


def _listen_ports(floor: int = 10_000) -> tuple[int, int] | None:
    """[floor, start of the ephemeral range) (Linux's ip_local_port_range; elsewhere
    IANA's 49152), None when that leaves fewer than 1,000 ports."""
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        start = 49_152
    return (floor, start - 1) if start - 1 - floor >= 1_000 else None


LISTEN_PORTS = _listen_ports()
"""Where `free_port` picks from."""
_PORTS = random.SystemRandom()  # not the `random` module's generator, which tests seed


def port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (an empty set when it is gone)."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


class ProcessFailed(RuntimeError):
    """A process exited or never became ready; the message carries its log tail."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ManagedProcess:
    """One started process and what is needed to reach and stop it."""

    name: str
    argv: Sequence[str]
    log_path: Path
    port: int
    cwd: Path | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ready: bool = False
    """Set once the port answered (and the caller's own readiness checks passed)."""
    probe: Probe | None = None
    """How the supervisor checks, while it runs, that it still answers (None: exit only)."""
    own_ports: tuple[int, ...] = ()
    """Ports the process itself (not a child) must listen on before it is ready. A port
    picked with `free_port` can be taken by another process in between; some servers
    (pulsar-lite's metrics listener) then log the error and run on without it, and a
    probe of that port would be answered by the other process."""

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self, ready_timeout: float = 30.0) -> ManagedProcess:
        self.ready = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,  # our own process group: signals reach children too
            )
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with code {self.popen.returncode} before it was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if port_open(self.port) and self._holds_own_ports():
                self.ready = True
                return
            time.sleep(0.1)
        self.stop()
        raise ProcessFailed(
            f"{self.name} did not listen on {LOOPBACK}:{self.port} within {timeout:.0f}s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def _holds_own_ports(self) -> bool:
        """Whether the process listens on all of `own_ports`; raises ProcessFailed when
        another process answers on one of them."""
        if not self.own_ports or self.popen is None:
            return True
        missing = [p for p in self.own_ports if p not in listening_ports(self.popen.pid)]
        taken = [p for p in missing if port_open(p)]
        if taken and not set(taken) <= listening_ports(self.popen.pid):  # not ours just now
            self.stop()
            raise ProcessFailed(
                f"{self.name}: port {taken[0]} on {LOOPBACK} is held by another process; "
                f"log {self.log_path}:\n{log_tail(self.log_path)}"
            )
        return not missing

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM our process group, wait up to `grace` seconds, then SIGKILL it."""
        if self.popen is None or self.popen.poll() is not None:
            return
        pgid = self.popen.pid  # start_new_session made the child its group leader
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        except ProcessLookupError:
            pass

    def kill(self, wait: float = 5.0) -> None:
        """SIGKILL our whole process group at once: for a process that is hung (it would
        not act on SIGTERM) or whose leader is gone while its children live on."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=wait)
