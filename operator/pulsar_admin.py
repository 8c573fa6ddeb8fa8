"""An async client for the parts of Pulsar's admin REST API (`/admin/v2`) the operator uses.

Every `ensure_*` reads first and writes only what differs, so reconciling an
unchanged system costs a few GETs and no writes; "already exists" (409) is
success. 5xx answers, timeouts and refused connections are retried with
exponential backoff; 401/403/404 raise at once with Pulsar's own reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from recsys_operator.render.topics import TopicPlan, TopicPolicy

log = logging.getLogger(__name__)

BACKLOG_POLICY = "producer_request_hold"


class PulsarAdminError(RuntimeError):
    """A request Pulsar refused (or that failed after every retry)."""

    def __init__(self, method: str, path: str, status: int | None, reason: str):
        self.method, self.path, self.status, self.reason = method, path, status, reason
        hint = {
            401: " (authentication failed: check spec.events.authSecretRef)",
            403: " (the token lacks admin permission on this tenant/namespace)",
        }.get(status or 0, "")
        where = f"HTTP {status}" if status else "no answer"
        super().__init__(f"Pulsar admin {method} {path}: {where}: {reason}{hint}")


class PartitionsDecreased(PulsarAdminError):
    """The spec asks for fewer partitions than a topic has: Pulsar cannot remove
    partitions, so no retry will succeed until the spec (or the topic) changes."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 5.0
    timeout: float = 10.0


class PulsarAdmin:
    """One admin endpoint, optionally with a bearer token. Use as an async context manager."""

    def __init__(self, admin_url: str, token: str | None = None, retry: RetryPolicy | None = None):
        self.base = admin_url.rstrip("/") + "/admin/v2"
        self.retry = retry or RetryPolicy()
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PulsarAdmin:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.retry.timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # --- transport ----------------------------------------------------------------

    async def _request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON or None). Retries 5xx and network errors; returns 2xx/404/409."""
        assert self._session is not None, "use `async with PulsarAdmin(...)`"
        delay = self.retry.first_delay
        last_reason = ""
        last_status: int | None = None
        for attempt in range(1, self.retry.attempts + 1):
            try:
                async with self._session.request(
                    method, self.base + path, json=body, params=params
                ) as response:
                    text = await response.text()
                    payload = _decode(text)
                    if response.status < 500:
                        # 404 and 409 are answers the ensure_* methods act on; other 4xx are final.
                        if response.status >= 400 and response.status not in (404, 409):
                            raise PulsarAdminError(
                                method, path, response.status, _reason(payload, text)
                            )
                        return response.status, payload
                    last_status, last_reason = response.status, _reason(payload, text)
            except aiohttp.InvalidURL as exc:  # no retry can fix the URL itself
                raise PulsarAdminError(method, path, None, f"invalid URL {exc}") from exc
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                last_status, last_reason = None, f"{type(exc).__name__}: {exc}"
            if attempt < self.retry.attempts:
                log.warning(
                    "Pulsar admin %s %s failed (%s); retry %d in %.1fs",
                    method,
                    path,
                    last_reason,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry.max_delay)
        raise PulsarAdminError(
            method, path, last_status, f"{last_reason} (after {self.retry.attempts} attempts)"
        )

    async def _must(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 204),
    ) -> Any:
        status, payload = await self._request(method, path, body, params)
        if status not in ok:
            raise PulsarAdminError(method, path, status, _reason(payload, ""))
        return payload

    # --- tenants and namespaces ---------------------------------------------------

    async def ensure_tenant(self, tenant: str) -> bool:
        """Create the tenant (allowed on every cluster) unless it exists; True if created."""
        status, _ = await self._request("GET", f"/tenants/{_seg(tenant)}")
        if status == 200:
            return False
        clusters = await self._must("GET", "/clusters")
        body = {"adminRoles": [], "allowedClusters": list(clusters or [])}
        status, payload = await self._request("PUT", f"/tenants/{_seg(tenant)}", body)
        if status == 409:
            return False
        if status not in (200, 204):
            raise PulsarAdminError("PUT", f"/tenants/{tenant}", status, _reason(payload, ""))
        return True

    async def ensure_namespace(self, tenant: str, namespace: str) -> bool:
        existing = await self._must("GET", f"/namespaces/{_seg(tenant)}")
        if f"{tenant}/{namespace}" in (existing or []):
            return False
        status, payload = await self._request(
            "PUT", f"/namespaces/{_seg(tenant)}/{_seg(namespace)}"
        )
        if status == 409:
            return False
        if status not in (200, 204):
            raise PulsarAdminError(
                "PUT", f"/namespaces/{tenant}/{namespace}", status, _reason(payload, "")
            )
        return True

    # --- topics -------------------------------------------------------------------

    def _topic_path(self, plan: TopicPlan, topic: TopicPolicy) -> str:
        return f"/persistent/{_seg(plan.tenant)}/{_seg(plan.namespace)}/{_seg(topic.name)}"

    async def partitions(self, plan: TopicPlan, topic: TopicPolicy) -> int | None:
        """Partitions of the topic, or None when it does not exist."""
        status, payload = await self._request("GET", self._topic_path(plan, topic) + "/partitions")
        if status == 404:
            return None
        count = int((payload or {}).get("partitions", 0))
        return count or None

    async def ensure_topic(self, plan: TopicPlan, topic: TopicPolicy) -> list[str]:
        """Make the topic match its policy; returns what was changed (empty when nothing)."""
        path = self._topic_path(plan, topic)
        changes = []
        current = await self.partitions(plan, topic)
        if current is None:
            status, payload = await self._request("PUT", path + "/partitions", topic.partitions)
            if status not in (200, 204, 409):
                raise PulsarAdminError("PUT", path + "/partitions", status, _reason(payload, ""))
            changes.append(f"created with {topic.partitions} partitions")
        elif current < topic.partitions:
            await self._must("POST", path + "/partitions", topic.partitions)
            changes.append(f"partitions {current} -> {topic.partitions}")
        elif current > topic.partitions:
            # Pulsar cannot remove partitions; say so rather than pretend.
            raise PartitionsDecreased(
                "POST",
                path + "/partitions",
                None,
                f"topic has {current} partitions and Pulsar cannot reduce them to {topic.partitions}",
            )

        retention = {
            "retentionTimeInMinutes": topic.retention_minutes,
            "retentionSizeInMB": topic.retention_size_mb,
        }
        status, have = await self._request("GET", path + "/retention")
        if status == 404 or not _same(have, retention):
            await self._must("POST", path + "/retention", retention)
            changes.append("retention")

        quota = {
            "limitSize": topic.backlog_quota_mb * 2**20,
            "limitTime": -1,
            "policy": BACKLOG_POLICY,
        }
        status, have_map = await self._request("GET", path + "/backlogQuotaMap")
        have_quota = (have_map or {}).get("destination_storage") if status == 200 else None
        if not _same(have_quota, quota):
            await self._must(
                "POST",
                path + "/backlogQuota",
                quota,
                params={"backlogQuotaType": "destination_storage"},
            )
            changes.append("backlog quota")
        return changes

    async def delete_topic(self, plan: TopicPlan, topic: TopicPolicy) -> bool:
        """Delete a partitioned topic (forcefully: consumers may still be attached); False if absent."""
        path = self._topic_path(plan, topic) + "/partitions"
        status, payload = await self._request("DELETE", path, params={"force": "true"})
        if status == 404:
            return False
        if status not in (200, 204):
            raise PulsarAdminError("DELETE", path, status, _reason(payload, ""))
        return True

    async def ensure_plan(self, plan: TopicPlan) -> list[str]:
        """Tenant, namespace and every topic of the plan; returns human-readable changes."""
        changes = []
        if await self.ensure_tenant(plan.tenant):
            changes.append(f"tenant {plan.tenant} created")
        if await self.ensure_namespace(plan.tenant, plan.namespace):
            changes.append(f"namespace {plan.tenant}/{plan.namespace} created")
        for topic in plan.topics:
            changes += [f"{topic.name}: {c}" for c in await self.ensure_topic(plan, topic)]
        return changes

    async def delete_plan(self, plan: TopicPlan) -> list[str]:
        return [topic.name for topic in plan.topics if await self.delete_topic(plan, topic)]


def _seg(part: str) -> str:
    return quote(part, safe="")


def _decode(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _reason(payload: Any, text: str) -> str:
    if isinstance(payload, dict) and payload.get("reason"):
        return str(payload["reason"])
    return text.strip()[:300] or "no reason given"


def _same(have: Any, want: dict[str, Any]) -> bool:
    return isinstance(have, dict) and all(have.get(k) == v for k, v in want.items())
