"""Pinning a request to a variant, for QA: `X-Recsys-Variant: canary` (or `stable`), or
the cookie `recsys_variant=canary`.

A pinned request is served by the variant it names whatever the user's assignment,
and it is kept out of everything the rollout analysis reads: its latency, answers,
impressions and (through its request id, `<hex>.pinned-canary.<version>`) its clicks
go to `recsys_gateway_pinned_requests_total` and `recsys_gateway_pinned_clicks_total`
instead of the per-variant metrics. The header wins over the cookie.
"""

from __future__ import annotations

from collections.abc import Mapping

from recsys_contracts.variant_assignment import Variant

PIN_HEADER = "X-Recsys-Variant"
PIN_COOKIE = "recsys_variant"


class BadPin(ValueError):
    """The header or cookie names no variant."""


def pinned_variant(headers: Mapping[str, str], cookies: Mapping[str, str]) -> Variant | None:
    """The variant a request is pinned to, if it is; `BadPin` for a value that is not one."""
    where, value = PIN_HEADER, headers.get(PIN_HEADER)
    if value is None:
        where, value = f"cookie {PIN_COOKIE}", cookies.get(PIN_COOKIE)
    if value is None:
        return None
    try:
        return Variant(value.strip().lower())
    except ValueError:
        raise BadPin(f"{where}: must be stable or canary, got {value[:40]!r}") from None
