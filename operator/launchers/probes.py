"""How the supervisor asks a started process whether it still works, not only whether it
still exists: a process frozen by SIGSTOP, a deadlocked JVM or a wedged event loop keeps
its PID and its listening socket, so only a request with a timeout tells.

A probe returns None when the process answered, else why not (the words of the event).
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from recsys_operator.launchers.process import LOOPBACK

PROBE_TIMEOUT_S = 2.0
"""Generous on two shared cores: a part busy serving must not look hung."""


class Probe(Protocol):
    def __call__(self, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None: ...


@dataclass(frozen=True)
class HttpProbe:
    """GET `path`; a 2xx answer within the timeout is alive (any answer with
    `any_status`: the process is alive when it answers at all, and whatever it reports
    about its own health is its business). `port` overrides the process's own port (the
    broker answers HTTP on its metrics port only)."""

    path: str
    port: int | None = None
    any_status: bool = False

    def __call__(self, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
        url = f"http://{LOOPBACK}:{self.port or port}{self.path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                response.read(1)
                return None  # urlopen raises HTTPError for non-2xx answers
        except urllib.error.HTTPError as exc:
            return None if self.any_status else f"GET {self.path} answered {exc.code}"
        except (OSError, ValueError) as exc:  # URLError, timeouts, resets
            return f"GET {self.path}: {getattr(exc, 'reason', exc)}"


@dataclass(frozen=True)
class RedisPing:
    """PING in the Redis protocol; `+PONG` (or `-LOADING` while it replays its log) is alive."""

    def __call__(self, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(b"PING\r\n")
                answer = s.recv(64)
        except OSError as exc:
            return f"PING: {exc or type(exc).__name__}"
        if answer.startswith(b"+PONG") or answer.startswith(b"-LOADING"):
            return None
        return f"PING answered {answer[:40]!r}"


@dataclass(frozen=True)
class TcpProbe:
    """A TCP connect. Weakest of the three: the kernel accepts into the listen backlog of a
    frozen process, so this only sees a closed port; used where nothing better is served."""

    def __call__(self, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=timeout):
                return None
        except OSError as exc:
            return f"connect to port {port}: {exc or type(exc).__name__}"
