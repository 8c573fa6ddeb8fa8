"""The routing from its ConfigMap, watched through the Kubernetes API.

Why not the mounted file: the kubelet refreshes a mounted ConfigMap only every 60-90 s,
and a rollout promises that a weight change or a rollback reaches every gateway replica
within 5 s. A watch on the API server delivers the change milliseconds after the
operator writes it.

How: the gateway lists its one ConfigMap (`fieldSelector=metadata.name=NAME`, which is
also what a Role limited by `resourceNames` allows), then watches it from the list's
`resourceVersion`, resuming from the last version seen whenever the server ends the
stream (every `WATCH_TIMEOUT_S`, or when it restarts). A `410 Gone` (that version is
too old to resume from) means a fresh list; so does any error, after a backoff. The
watcher never stops on its own: whatever fails, it retries, and the gateway serves with
the last good routing meanwhile (`RoutingState` applies the same rules as to the file:
an invalid routing, a deleted ConfigMap or an unreachable API server is logged and
counted in `recsys_gateway_routing_reloads_total`, and the routing stays).

No mounted file as a fallback: it would be a second source whose copy lags the watch by
a minute, so it could put an older routing back over a newer one; the watch alone
already keeps the last good routing through any outage. Only the first routing needs
the API server: a gateway that cannot list its ConfigMap at start fails (as with a
missing file) and the kubelet restarts it.

The API server is found as the operator finds it: in a pod, the service account's
token and CA (`/var/run/secrets/kubernetes.io/serviceaccount`) and
`KUBERNETES_SERVICE_HOST`/`_PORT`; elsewhere a kubeconfig (`$KUBECONFIG`, else
`~/.kube/config`, or an explicit path). The token is read again for each request:
service-account tokens rotate. Proxies and `tls-server-name` in a kubeconfig are not
supported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from gateway.log_rate_limit import rate_limited_logger
from gateway.routing import ReloadResult, RoutingError, RoutingState
from recsys_contracts.routing import ROUTING_KEY, Routing

log = rate_limited_logger(__name__)


# The server ends each watch after this; the watcher then resumes where it was.
WATCH_TIMEOUT_S = 300
LIST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# After an error: wait RETRY_FIRST_S, doubling up to RETRY_MAX_S (each wait shortened by
# a random part, so that many replicas do not all come back at the same instant).
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
# A watch the server ends sooner than this is retried after a backoff, not at once: a
# proxy that cuts every stream must not turn the watcher into a busy loop.
MIN_HEALTHY_WATCH_S = 1.0
# A ConfigMap holds at most 1 MiB; each watch event is one line of JSON.
MAX_EVENT_BYTES = 2 * 1024 * 1024

# A namespace or ConfigMap name (DNS subdomain; namespaces are stricter labels).
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class ConfigMapRef:
    """`NAMESPACE/NAME` of the ConfigMap that holds the routing."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> ConfigMapRef:
        namespace, sep, name = text.partition("/")
        if not sep or not _DNS_NAME.match(namespace) or not _DNS_NAME.match(name):
            raise ValueError(f"a ConfigMap is given as NAMESPACE/NAME, got {text!r}")
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class KubeApi:
    """Where the API server is and how to talk to it: URL, TLS and auth headers."""

    def __init__(self, configuration: kube_client.Configuration) -> None:
        self._configuration = configuration
        self.url: str = configuration.host.rstrip("/")
        self.ssl = _ssl_context(configuration)

    @classmethod
    def from_environment(cls, kubeconfig: Path | None = None) -> KubeApi:
        """`kubeconfig` if given; else in a pod its service account; else `$KUBECONFIG`
        (read now, not when the kubernetes client was imported) or `~/.kube/config`."""
        configuration = kube_client.Configuration()
        try:
            if kubeconfig is not None:
                kube_config.load_kube_config(
                    config_file=str(kubeconfig), client_configuration=configuration
                )
            else:
                try:
                    kube_config.load_incluster_config(client_configuration=configuration)
                except kube_config.ConfigException:
                    kube_config.load_kube_config(
                        config_file=os.environ.get("KUBECONFIG"),
                        client_configuration=configuration,
                    )
            return cls(configuration)
        except (kube_config.ConfigException, OSError) as exc:  # OSError: CA, client cert
            raise RoutingError(
                f"cannot find the Kubernetes API (neither in a pod nor a kubeconfig): {exc}",
                ReloadResult.UNREADABLE,
            ) from None

    def headers(self) -> dict[str, str]:
        """JSON, and the credentials as of now (the loaders refresh rotated tokens)."""
        headers = {"Accept": "application/json"}
        bearer = self._configuration.auth_settings().get("BearerToken")
        if bearer and bearer["value"]:
            headers[bearer["key"]] = bearer["value"]
        return headers


def _ssl_context(configuration: kube_client.Configuration) -> ssl.SSLContext:
    """TLS as the configuration asks (unused when the server is plain HTTP, as in tests)."""
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if not configuration.verify_ssl:  # `insecure-skip-tls-verify` in the kubeconfig
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class KubeApiError(Exception):
    """The API server answered with an error (a Kubernetes `Status`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status


class WatchExpired(Exception):
    """410 Gone: the version to resume from is too old; list again."""


class ConfigMapRoutingWatcher:
    """Holds the current routing and replaces it when its ConfigMap changes.

    The same interface as `gateway.routing.RoutingWatcher`: `.current`, and `watch()`
    to run (until cancelled) on the gateway's event loop.
    """

    def __init__(
        self,
        configmap: ConfigMapRef,
        api: KubeApi,
        *,
        on_reload: Callable[[ReloadResult], None] = lambda result: None,
        key: str = ROUTING_KEY,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.configmap = configmap
        self.api = api
        self.key = key
        self.watch_timeout_s = watch_timeout_s
        self.retry_max_s = retry_max_s
        # The version to resume the watch from; None: list first.
        self._resource_version: str | None = None
        # The first routing, read before the gateway's event loop runs (`Gateway(...)` is
        # synchronous, and may be called where another loop runs): on a loop of its own.
        first = _run_on_own_loop(self._first_routing)
        self._state = RoutingState(first, origin=f"ConfigMap {configmap}", on_reload=on_reload)

    @property
    def current(self) -> Routing:
        return self._state.current

    async def _first_routing(self) -> str:
        try:
            async with self._session() as session:
                configmap = await self._list(session)
        except (KubeApiError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            raise RoutingError(
                f"cannot read ConfigMap {self.configmap}: {exc}", ReloadResult.UNREADABLE
            ) from None
        return self._routing_text(configmap)

    async def watch(self) -> None:
        """List, then watch, until cancelled; never raises otherwise."""
        retry = Backoff(RETRY_FIRST_S, self.retry_max_s)
        async with self._session() as session:
            while True:
                started = time.monotonic()
                failed = False
                try:
                    if self._resource_version is None:
                        self._apply(await self._list(session))
                    await self._follow(session)
                    # The server ended the stream (its timeout, a restart): resume from
                    # the last version seen.
                except WatchExpired:
                    log.info("watch of ConfigMap %s expired; listing again", self.configmap)
                    self._resource_version = None
                except Exception as exc:  # whatever it is, the gateway keeps serving
                    failed = True
                    reason = f"cannot watch ConfigMap {self.configmap}: {exc!r}"
                    if self._state.unavailable(reason) is None:  # reported once per outage
                        log.warning("%s; retrying", reason)
                    self._resource_version = None  # after an error, start from a fresh list
                # Go on at once after a watch that ran a while. After a failure, or a watch
                # that ended at once (a proxy that cuts every stream), wait first: longer
                # each time, so that a broken API server is not flooded.
                if time.monotonic() - started >= MIN_HEALTHY_WATCH_S:
                    retry.reset()
                    if not failed:
                        continue
                await asyncio.sleep(retry.next())

    # --- one list, one watch ---------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                sock_connect=CONNECT_TIMEOUT_S,
                # A stream silent for longer than the server's own end of it is dead.
                sock_read=self.watch_timeout_s + 30,
            ),
            read_bufsize=MAX_EVENT_BYTES // 2,  # lines up to twice this are read whole
        )

    def _collection_url(self) -> str:
        return f"{self.api.url}/api/v1/namespaces/{self.configmap.namespace}/configmaps"

    def _selector(self) -> dict[str, str]:
        return {"fieldSelector": f"metadata.name={self.configmap.name}"}

    async def _list(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """The ConfigMap (None when it does not exist); remembers the version to watch from."""
        async with session.get(
            self._collection_url(),
            params=self._selector(),
            headers=self.api.headers(),
            ssl=self.api.ssl,
            timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S),
        ) as response:
            body = await response.read()
            if response.status >= 400:
                raise KubeApiError(response.status, _status_message(body))
        listing = json.loads(body)
        self._resource_version = str(listing["metadata"]["resourceVersion"])
        items = listing.get("items") or []
        return items[0] if items else None

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        """One watch request: apply its events until the server ends it."""
        params = {
            **self._selector(),
            "watch": "true",
            "resourceVersion": str(self._resource_version),
            "timeoutSeconds": str(self.watch_timeout_s),
            "allowWatchBookmarks": "true",
        }
        async with session.get(
            self._collection_url(), params=params, headers=self.api.headers(), ssl=self.api.ssl
        ) as response:
            if response.status == 410:
                raise WatchExpired()
            if response.status >= 400:
                raise KubeApiError(response.status, _status_message(await response.read()))
            async for line in response.content:
                if line.strip():
                    self._on_event(json.loads(line))

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # the object is a Status
            if obj.get("code") == 410:
                raise WatchExpired()
            raise KubeApiError(int(obj.get("code") or 500), obj.get("message") or str(obj))
        self._resource_version = str(obj["metadata"]["resourceVersion"])
        if kind in ("ADDED", "MODIFIED"):
            self._apply(obj)
        elif kind == "DELETED":
            self._state.unavailable(f"ConfigMap {self.configmap} was deleted")
        # BOOKMARK: only the version moves on.

    # --- from a ConfigMap to a routing ----------------------------------------------

    def _apply(self, configmap: dict[str, Any] | None) -> None:
        try:
            text = self._routing_text(configmap)
        except RoutingError as exc:
            self._state.unavailable(str(exc))
            return
        self._state.offer(text)

    def _routing_text(self, configmap: dict[str, Any] | None) -> str:
        if configmap is None:
            raise RoutingError(f"ConfigMap {self.configmap} not found", ReloadResult.UNREADABLE)
        text = (configmap.get("data") or {}).get(self.key)
        if text is None:
            raise RoutingError(
                f"ConfigMap {self.configmap} has no key {self.key}", ReloadResult.UNREADABLE
            )
        return str(text)


class Backoff:
    """Waits that double from `first_s` up to `max_s`, each shortened by a random part."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next_s = first_s

    def next(self) -> float:
        wait = self._next_s * random.uniform(0.5, 1.0)
        self._next_s = min(self._next_s * 2, self.max_s)
        return wait

    def reset(self) -> None:
        self._next_s = self.first_s


def _status_message(body: bytes) -> str:
    """The message of a Kubernetes `Status` body, or the start of whatever came."""
    try:
        status = json.loads(body)
        return f"{status.get('reason', '')}: {status['message']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode(errors="replace")


Result = TypeVar("Result")


def _run_on_own_loop(make: Callable[[], Coroutine[Any, Any, Result]]) -> Result:
    """Run a coroutine to its end on a new event loop in a short-lived thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
