"""Counting and failing requests of a kmock handler, for assertions in tests.

Both emulators record every request they receive (kmock does it); a test takes a
`mark()` before the action it checks and asks what came after it:

    mark = kube.emulator.mark()
    ...  # reconcile again
    writes = kube.emulator.writes_since(mark, exclude=("events",))
    assert not writes, describe(writes)

`fail_next()` makes the next N matching requests answer with an error, to test retries.

Both also answer each request in time independent of how many came before
(`RequestLog._dispatch`): kmock's own dispatch re-filters the whole log per request.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Collection, Iterable
from typing import Any, cast

import aiohttp.web
import kmock
from kmock._internal import dsl as kmock_dsl
from kmock._internal import rendering as kmock_rendering

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

        Checked before the emulator's own answers; kept outside kmock's reactions so that
        a spent fault costs nothing on later requests.
        """
        payload = self._failure_body(status) if body is None else body
        self._faults().append(_Fault(method and method.upper(), path, status, payload, count))

    def _failure_body(self, status: int) -> Any:
        """The body of an injected failure: Pulsar's `{"reason": ...}`, unless overridden."""
        return {"reason": f"injected failure ({status})"}

    def _all_requests(self) -> list[kmock.Request]:
        return cast(list[kmock.Request], self._requests)  # type: ignore[attr-defined]

    def _faults(self) -> list[_Fault]:
        # Each emulator declares `injected_faults: list = attrs.field(factory=list)`: kmock's
        # handlers are slotted attrs classes, so a mixin cannot add attributes of its own.
        return cast(list[_Fault], self.injected_faults)  # type: ignore[attr-defined]

    # --- dispatch -----------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        return await self._dispatch(request)

    async def _dispatch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """kmock's RawHandler._handle, in time independent of the number of past requests.

        kmock asks `request in reaction_source` for each reaction, and a filter answers that
        by filtering the whole request log: after thousands of requests each one took
        seconds. Here a chain of filters is checked against this one request instead; only
        what cannot be judged alone (slices, groups) falls back to kmock's own check.
        """
        faults = self._faults()
        for fault in faults:
            if fault.remaining and fault.matches(request):
                fault.remaining -= 1
                if not fault.remaining:
                    faults.remove(fault)
                return aiohttp.web.json_response(fault.body, status=fault.status)
        payloads: list[Any] = self._payloads  # type: ignore[attr-defined]
        longest = max((len(payload.priorities) for payload in payloads), default=0)

        def order(payload: Any) -> tuple[float, ...]:
            return tuple(-p for p in payload.priorities) + (0,) * (
                longest - len(payload.priorities)
            )

        for payload in sorted(payloads, key=order):
            if payload._disabled.is_set() or not _sees(payload._source, request):
                continue
            try:
                return cast(aiohttp.web.StreamResponse, await payload(request))
            except kmock_rendering.ReactionMismatchError:  # either mismatch or depletion
                payload._disabled.set()
            except NotImplementedError:  # matched, but nothing to respond with
                pass
        raise NotImplementedError("no reaction matches the request (add a fallback)")


@dataclasses.dataclass
class _Fault:
    method: str | None
    path: PathFilter
    status: int
    body: Any
    remaining: int

    def matches(self, request: kmock.Request) -> bool:
        return (self.method is None or request.method.value == self.method) and _path_matches(
            self.path, request.url.path
        )


def _sees(view: Any, request: kmock.Request) -> bool:
    """Whether `request` passes through a kmock view, judged from the request alone."""
    if isinstance(view, kmock_dsl.Root):
        return True
    if isinstance(view, kmock_dsl.Filter):
        return _sees(view._source, request) and bool(view.criteria(request))
    if isinstance(view, kmock_dsl.Priority):
        return _sees(view._source, request)
    return request in view  # slices, groups, exclusions: kmock's check over the log


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
