"""Counting and failing requests of a kmock handler, for assertions in tests.

Both emulators record every request they receive (kmock does it); a test takes a
`mark()` before the action it checks and asks what came after it:

    mark = kube.emulator.mark()
    ...  # reconcile again
    writes = kube.emulator.writes_since(mark, exclude=("events",))
    assert not writes, describe(writes)

`fail_next()` makes the next N matching requests answer with an error (a kmock
reaction limited to a slice of future requests), to test retries.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable
from typing import Any

import kmock

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

PathFilter = str | re.Pattern[str] | None


class RequestLog:
    """A mixin for kmock handlers (`kmock.RawHandler` and its subclasses)."""

    __slots__ = ()

    def mark(self) -> int:
        """A position in the request log: the number of requests received so far."""
        return len(self._all_requests())

    def requests_since(
        self,
        mark: int,
        *,
        method: str | None = None,
        path: PathFilter = None,
        resource: str | None = None,
    ) -> list[kmock.Request]:
        """Requests received after `mark`, optionally only those of a method, path, resource.

        `path` is a glob (`/admin/v2/persistent/*`) or a compiled regex (full match);
        `resource` is a Kubernetes plural (`deployments`), for the Kubernetes emulator.
        """
        return [
            request
            for request in self._all_requests()[mark:]
            if (method is None or request.method.value == method.upper())
            and _path_matches(path, request.url.path)
            and (resource is None or _plural(request) == resource)
        ]

    def writes_since(
        self, mark: int, *, resource: str | None = None, exclude: Collection[str] = ()
    ) -> list[kmock.Request]:
        """POST/PUT/PATCH/DELETE requests after `mark`; `exclude` drops resources by plural."""
        return [
            request
            for request in self.requests_since(mark, resource=resource)
            if request.method.value in WRITE_METHODS and _plural(request) not in exclude
        ]

    def fail_next(
        self,
        count: int,
        *,
        method: str | None = None,
        path: PathFilter = None,
        status: int = 500,
        body: Any = None,
    ) -> None:
        """Answer the next `count` requests matching method/path with `status` (then as usual).

        A kmock reaction on a slice of the matching requests that are still to come: it
        takes precedence over the emulator's own answers, which are fallbacks.
        """
        view: Any = self
        if method is not None:
            view = view[kmock.method(method.upper())]
        if path is not None:
            view = view[path]
        already_seen = len(view)
        payload = self._failure_body(status) if body is None else body
        view[already_seen : already_seen + count] << kmock.Response(status=status, payload=payload)

    def _failure_body(self, status: int) -> Any:
        """The body of an injected failure: Pulsar's `{"reason": ...}`, unless overridden."""
        return {"reason": f"injected failure ({status})"}

    def _all_requests(self) -> list[kmock.Request]:
        # Iterating a kmock handler yields every request it received, in order.
        return list(self)  # type: ignore[call-overload]


def request_header(request: kmock.Request, name: str) -> str:
    """A request header by case-insensitive name ("" when absent)."""
    return next(
        (value for key, value in request.headers.items() if key.lower() == name.lower()), ""
    )


def describe(requests: Iterable[kmock.Request]) -> str:
    """One line per request, for assertion messages."""
    return "\n".join(f"{request.method.value} {request.url.path_qs}" for request in requests)


def _path_matches(path: PathFilter, value: str) -> bool:
    if path is None:
        return True
    if isinstance(path, re.Pattern):
        return path.fullmatch(value) is not None
    return fnmatch.fnmatchcase(value, path)


def _plural(request: kmock.Request) -> str | None:
    return request.resource.plural if request.resource is not None else None
