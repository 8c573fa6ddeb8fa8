"""Pulsar's admin REST API (`/admin/v2`) on kmock: the part an operator needs to manage topics.

No server here implements Pulsar's admin API (pulsar-lite has none), so the operator's
admin client is tested against this emulator. Paths, status codes and reasons follow
apache/pulsar's broker code, pulsar-broker/src/main/java/org/apache/pulsar/broker/admin/:
v2/Tenants.java + impl/TenantsBase.java, v2/Namespaces.java + impl/NamespacesBase.java,
v2/PersistentTopics.java + impl/PersistentTopicsBase.java (createPartitionedTopic,
internalUpdatePartitionedTopicAsync, internalDeletePartitionedTopic, retention and
backlog quota endpoints) and AdminResource.java (validateRetentionPolicies,
checkBacklogQuota):

    GET    /admin/v2/clusters                       200 ["standalone"]
    GET    /admin/v2/tenants                        200 ["public", ...]
    GET    /admin/v2/tenants/{t}                    200 TenantInfo; 404
    PUT    /admin/v2/tenants/{t}      TenantInfo    204; 409 exists; 412 no/unknown clusters
    GET    /admin/v2/namespaces/{t}                 200 ["t/ns", ...]; 404 no tenant
    PUT    /admin/v2/namespaces/{t}/{ns}            204; 409 exists; 404 no tenant
    GET    /admin/v2/persistent/{t}/{ns}            200 topics (one per partition); 404
    GET    /admin/v2/persistent/{t}/{ns}/partitioned   200 partitioned topics; 404
    PUT    /admin/v2/persistent/{t}/{ns}/{topic}/partitions   N   204; 409 exists;
           404 no namespace; 406 N <= 0
    GET    .../{topic}/partitions                   200 {"partitions": N}; 404
    POST   .../{topic}/partitions     N             204; 409 not a partitioned topic;
           422 fewer partitions than now
    DELETE .../{topic}/partitions?force=true        204; 404
    GET    .../{topic}/retention                    200 policy; 204 when unset; 404
    POST   .../{topic}/retention      policy        204; 404; 412 invalid or under the quota
    GET    .../{topic}/backlogQuotaMap              200 {"destination_storage": quota} or {}
    POST   .../{topic}/backlogQuota?backlogQuotaType=destination_storage   quota
                                                    204; 404; 412 over the retention

Errors are JSON `{"reason": "..."}`, as Pulsar's ErrorData. With `token` set, a request
without `Authorization: Bearer <token>` gets 401; `forbidden_token` gets 403.

A fresh emulator holds what a fresh standalone broker holds: cluster `standalone`,
tenant `public`, namespace `public/default`.

Not emulated (never test these against it): subscriptions, stats, producers and
consumers, non-partitioned topics, namespace-level policies (a backlog quota is checked
against the topic's own retention only, and a missing quota means no limit), the
broker's asynchronous propagation of topic policies (a real broker may answer a GET
with the old value for a moment after a POST), and Pulsar's exact 401/403 bodies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import aiohttp.web
import attrs
import kmock

from .accounting import RequestLog, request_header

BACKLOG_POLICIES = frozenset(
    {"producer_request_hold", "producer_exception", "consumer_backlog_eviction"}
)
BACKLOG_QUOTA_TYPES = frozenset({"destination_storage", "message_age"})
# NamedEntity.checkName: tenant and namespace names.
VALID_NAME = re.compile(r"[-=:.\w]*")

Answer = tuple[int, Any]  # status, JSON body (None: no body)


class PulsarError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


@attrs.define
class Topic:
    partitions: int
    retention: dict[str, int] | None = None
    backlog_quotas: dict[str, dict[str, Any]] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class PulsarAdminEmulator(RequestLog, kmock.RawHandler):
    """The broker's state is plain data a test may read, or seed before its requests:
    `tenants` (TenantInfo by name), `namespaces` ("tenant/ns"), `topics` (by full name)."""

    clusters: list[str] = attrs.field(factory=lambda: ["standalone"])
    token: str | None = None
    forbidden_token: str | None = None
    tenants: dict[str, dict[str, Any]] = attrs.field(
        factory=lambda: {"public": {"adminRoles": [], "allowedClusters": ["standalone"]}}
    )
    namespaces: set[str] = attrs.field(factory=lambda: {"public/default"})
    topics: dict[str, Topic] = attrs.field(factory=dict)  # by "persistent://t/ns/topic"
    injected_faults: list[Any] = attrs.field(factory=list, init=False)  # by fail_next()

    def __attrs_post_init__(self) -> None:
        # The API answers as a fallback, so that faults a test injects come first.
        self.fallback << self._answer

    def _answer(self, request: kmock.Request) -> kmock.Response:
        self._authorize(request)
        path_is_known = False
        for method, pattern, endpoint in ROUTES:
            match = pattern.fullmatch(request.url.raw_path)
            path_is_known = path_is_known or match is not None
            if match is not None and request.method.value == method:
                arguments = {key: unquote(value) for key, value in match.groupdict().items()}
                status, body = endpoint(self, request, **arguments)
                # Always an explicit status: kmock keeps the last one on a shared reaction.
                return kmock.Response(status=status, payload=body)
        if path_is_known:
            raise PulsarError(405, "Method Not Allowed")
        raise PulsarError(404, "Not Found")

    def _authorize(self, request: kmock.Request) -> None:
        if self.token is None:
            return
        scheme, _, presented = request_header(request, "Authorization").partition(" ")
        if scheme == "Bearer" and presented and presented == self.forbidden_token:
            raise PulsarError(403, "Don't have admin permission")
        if scheme != "Bearer" or presented != self.token:
            raise PulsarError(401, "Authentication required")

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, PulsarError):
            return aiohttp.web.json_response({"reason": exc.reason}, status=exc.status)
        return await super()._render_error(exc)

    # --- clusters and tenants -------------------------------------------------------

    def list_clusters(self, request: kmock.Request) -> Answer:
        return 200, list(self.clusters)

    def list_tenants(self, request: kmock.Request) -> Answer:
        return 200, sorted(self.tenants)

    def get_tenant(self, request: kmock.Request, tenant: str) -> Answer:
        if tenant not in self.tenants:
            raise PulsarError(404, "Tenant does not exist")
        return 200, self.tenants[tenant]

    def create_tenant(self, request: kmock.Request, tenant: str) -> Answer:
        info = request.data if isinstance(request.data, dict) else {}
        clusters = [cluster for cluster in info.get("allowedClusters") or [] if cluster.strip()]
        if not clusters:
            raise PulsarError(412, "Clusters can not be empty")
        if not set(clusters) <= set(self.clusters):
            raise PulsarError(412, "Clusters do not exist")
        if not VALID_NAME.fullmatch(tenant):
            raise PulsarError(412, "Tenant name is not valid")
        if tenant in self.tenants:
            raise PulsarError(409, "Tenant already exist")
        self.tenants[tenant] = {
            "adminRoles": info.get("adminRoles") or [],
            "allowedClusters": clusters,
        }
        return 204, None

    # --- namespaces -----------------------------------------------------------------

    def list_namespaces(self, request: kmock.Request, tenant: str) -> Answer:
        if tenant not in self.tenants:
            raise PulsarError(404, "Tenant not found")
        return 200, sorted(ns for ns in self.namespaces if ns.startswith(f"{tenant}/"))

    def create_namespace(self, request: kmock.Request, tenant: str, namespace: str) -> Answer:
        if not VALID_NAME.fullmatch(namespace):
            raise PulsarError(412, "Namespace name is not valid")
        if tenant not in self.tenants:
            raise PulsarError(404, "Tenant does not exist")
        if f"{tenant}/{namespace}" in self.namespaces:
            raise PulsarError(409, "Namespace already exists")
        self.namespaces.add(f"{tenant}/{namespace}")
        return 204, None

    # --- partitioned topics ---------------------------------------------------------

    def list_topics(self, request: kmock.Request, tenant: str, namespace: str) -> Answer:
        prefix = self._namespace_prefix(tenant, namespace)
        return 200, [
            f"{name}-partition-{index}"
            for name, topic in sorted(self.topics.items())
            if name.startswith(prefix)
            for index in range(topic.partitions)
        ]

    def list_partitioned_topics(
        self, request: kmock.Request, tenant: str, namespace: str
    ) -> Answer:
        prefix = self._namespace_prefix(tenant, namespace)
        return 200, sorted(name for name in self.topics if name.startswith(prefix))

    def create_partitioned_topic(self, request: kmock.Request, **where: str) -> Answer:
        partitions = _partitions(request)
        if partitions <= 0:
            raise PulsarError(406, "Number of partitions should be more than 0")
        name = _topic_name(**where)
        self._namespace_prefix(where["tenant"], where["namespace"])
        if name in self.topics:
            raise PulsarError(409, "This topic already exists")
        self.topics[name] = Topic(partitions=partitions)
        return 204, None

    def get_partitions(self, request: kmock.Request, **where: str) -> Answer:
        return 200, {"partitions": self._topic(**where).partitions}

    def update_partitions(self, request: kmock.Request, **where: str) -> Answer:
        partitions = _partitions(request)
        name = _topic_name(**where)
        topic = self.topics.get(name)
        if topic is None:
            raise PulsarError(409, f"Topic {name} is not the partitioned topic.")
        if partitions < topic.partitions:
            current = topic.partitions
            reason = f"Expect partitions {partitions} can't less than current partitions {current}."
            raise PulsarError(422, reason)
        topic.partitions = partitions
        return 204, None

    def delete_partitioned_topic(self, request: kmock.Request, **where: str) -> Answer:
        name = _topic_name(**where)
        if self.topics.pop(name, None) is None:
            raise PulsarError(404, f"Topic {name} not found.")
        return 204, None

    # --- topic policies -------------------------------------------------------------

    def get_retention(self, request: kmock.Request, **where: str) -> Answer:
        retention = self._topic(**where).retention
        return (200, retention) if retention is not None else (204, None)  # JAX-RS: null → 204

    def set_retention(self, request: kmock.Request, **where: str) -> Answer:
        topic = self._topic(**where)
        retention = _retention_policy(request.data)
        quota = topic.backlog_quotas.get("destination_storage")
        if quota is not None and not _quota_within_retention(quota, retention):
            raise PulsarError(
                412,
                "Retention Quota must exceed configured backlog quota for topic. "
                "Please increase retention quota and retry",
            )
        topic.retention = retention
        return 204, None

    def get_backlog_quotas(self, request: kmock.Request, **where: str) -> Answer:
        return 200, self._topic(**where).backlog_quotas

    def set_backlog_quota(self, request: kmock.Request, **where: str) -> Answer:
        topic = self._topic(**where)
        quota_type = request.params.get("backlogQuotaType", "destination_storage")
        quota = request.data if isinstance(request.data, dict) else {}
        if quota_type not in BACKLOG_QUOTA_TYPES or quota.get("policy") not in BACKLOG_POLICIES:
            raise PulsarError(400, "Invalid backlog quota type or policy")
        quota = {
            "limitSize": quota.get("limitSize", -1),
            "limitTime": quota.get("limitTime", -1),
            "policy": quota["policy"],
        }
        if (
            quota_type == "destination_storage"
            and topic.retention is not None
            and not _quota_within_retention(quota, topic.retention)
        ):
            raise PulsarError(
                412,
                "Backlog Quota exceeds configured retention quota for topic. "
                "Please increase retention quota and retry",
            )
        topic.backlog_quotas[quota_type] = quota
        return 204, None

    # --- lookups --------------------------------------------------------------------

    def _namespace_prefix(self, tenant: str, namespace: str) -> str:
        if f"{tenant}/{namespace}" not in self.namespaces:
            raise PulsarError(404, "Namespace does not exist")
        return f"persistent://{tenant}/{namespace}/"

    def _topic(self, **where: str) -> Topic:
        topic = self.topics.get(_topic_name(**where))
        if topic is None:
            raise PulsarError(404, "Topic not found")
        return topic


def _topic_name(tenant: str, namespace: str, topic: str) -> str:
    return f"persistent://{tenant}/{namespace}/{topic}"


def _partitions(request: kmock.Request) -> int:
    if not isinstance(request.data, int) or isinstance(request.data, bool):
        raise PulsarError(400, "The number of partitions must be a JSON integer")
    return request.data


def _retention_policy(body: Any) -> dict[str, int]:
    body = body if isinstance(body, dict) else {}
    minutes = body.get("retentionTimeInMinutes", 0)
    megabytes = body.get("retentionSizeInMB", 0)
    if not isinstance(minutes, int) or not isinstance(megabytes, int):
        raise PulsarError(400, "Invalid retention policy")
    if megabytes < -1:
        raise PulsarError(412, "Invalid retention policy: size limit must be >= -1")
    if minutes < -1:
        raise PulsarError(412, "Invalid retention policy: time limit must be >= -1")
    if (minutes == 0) != (megabytes == 0):
        raise PulsarError(
            412,
            "Invalid retention policy: Setting a single time or size limit to 0 is invalid when "
            "one of the limits has a non-zero value. Use the value of -1 instead of 0 to ignore a "
            "specific limit. To disable retention both limits must be set to 0.",
        )
    return {"retentionTimeInMinutes": minutes, "retentionSizeInMB": megabytes}


def _quota_within_retention(quota: dict[str, Any], retention: dict[str, int]) -> bool:
    """AdminResource.checkBacklogQuota: the quota must stay strictly below the retention."""
    megabytes, minutes = retention["retentionSizeInMB"], retention["retentionTimeInMinutes"]
    if megabytes > 0 and quota["limitSize"] >= megabytes * 1024 * 1024:
        return False
    return not (minutes > 0 and quota["limitTime"] >= minutes * 60)


Endpoint = Callable[..., Answer]
_TOPIC = "/admin/v2/persistent/{tenant}/{namespace}/{topic}"
# (method, @Path as in Pulsar's resources, endpoint)
_API: list[tuple[str, str, Endpoint]] = [
    ("GET", "/admin/v2/clusters", PulsarAdminEmulator.list_clusters),
    ("GET", "/admin/v2/tenants", PulsarAdminEmulator.list_tenants),
    ("GET", "/admin/v2/tenants/{tenant}", PulsarAdminEmulator.get_tenant),
    ("PUT", "/admin/v2/tenants/{tenant}", PulsarAdminEmulator.create_tenant),
    ("GET", "/admin/v2/namespaces/{tenant}", PulsarAdminEmulator.list_namespaces),
    ("PUT", "/admin/v2/namespaces/{tenant}/{namespace}", PulsarAdminEmulator.create_namespace),
    ("GET", "/admin/v2/persistent/{tenant}/{namespace}", PulsarAdminEmulator.list_topics),
    (
        "GET",
        "/admin/v2/persistent/{tenant}/{namespace}/partitioned",
        PulsarAdminEmulator.list_partitioned_topics,
    ),
    ("PUT", f"{_TOPIC}/partitions", PulsarAdminEmulator.create_partitioned_topic),
    ("GET", f"{_TOPIC}/partitions", PulsarAdminEmulator.get_partitions),
    ("POST", f"{_TOPIC}/partitions", PulsarAdminEmulator.update_partitions),
    ("DELETE", f"{_TOPIC}/partitions", PulsarAdminEmulator.delete_partitioned_topic),
    ("GET", f"{_TOPIC}/retention", PulsarAdminEmulator.get_retention),
    ("POST", f"{_TOPIC}/retention", PulsarAdminEmulator.set_retention),
    ("GET", f"{_TOPIC}/backlogQuotaMap", PulsarAdminEmulator.get_backlog_quotas),
    ("POST", f"{_TOPIC}/backlogQuota", PulsarAdminEmulator.set_backlog_quota),
]
# {name} matches one (still percent-encoded) path segment.
ROUTES = [
    (method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)), endpoint)
    for method, path, endpoint in _API
]
