"""Where the online feature store is: one Redis primary, or a Redis Cluster.

Every process that opens the store (the feature job, the serving handler, local mode)
reads the endpoint through here, so one URL and one mode mean the same everywhere:

- `single`: a `redis://`, `rediss://` or `unix://` URL, as `redis.Redis.from_url` reads it.
- `cluster`: a `redis://` or `rediss://` URL of any one node of the cluster. The client
  (`redis.cluster.RedisCluster.from_url`) asks it for the slot map (CLUSTER SLOTS) and
  follows MOVED/ASK redirects from then on. As `from_url` documents, a cluster has
  database 0 only and no unix sockets: other URLs are refused here with a clear error,
  rather than half-connecting.

The operator imports this module too (it validates specs), so redis is imported only
when connecting: the operator's base install has no Redis client.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis", "rediss")
URL_PATTERN = r"^(redis|rediss|unix)://.+"
"""What any store URL looks like (mode-specific checks are in `StoreEndpoint`)."""


class StoreMode(StrEnum):
    SINGLE = "single"
    """One Redis primary (replicas and Sentinel failover are transparent to the client)."""
    CLUSTER = "cluster"
    """A Redis Cluster: keys are spread over hash slots on several primaries."""


class InvalidStoreEndpoint(ValueError):
    """The URL cannot name a store of that mode."""


@dataclass(frozen=True)
class StoreEndpoint:
    url: str
    mode: StoreMode = StoreMode.SINGLE

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", StoreMode(self.mode))
        problem = endpoint_problem(self.url, self.mode)
        if problem:
            raise InvalidStoreEndpoint(problem)

    @property
    def cluster(self) -> bool:
        return self.mode is StoreMode.CLUSTER

    def connect(
        self,
        *,
        password: str | None = None,
        socket_timeout: float,
        socket_connect_timeout: float,
        **options: Any,
    ) -> Any:
        """A `redis.Redis`, or a `redis.cluster.RedisCluster` for a cluster endpoint.

        Both answer the commands the store's users send (GET, pipelines, EVALSHA with
        declared keys); the cluster client routes each by its keys' slot."""
        import redis
        from redis.cluster import RedisCluster

        common = {
            "password": password or None,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **options,
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **common)
        return redis.Redis.from_url(self.url, **common)


def endpoint_problem(url: str, mode: StoreMode | str) -> str | None:
    """Why `url` cannot be a store of `mode`, or None when it can (for validators)."""
    try:
        mode = StoreMode(mode)
    except ValueError:
        return f"store mode must be one of {', '.join(m.value for m in StoreMode)}, not {mode!r}"
    parts = urlsplit(url)
    schemes = CLUSTER_SCHEMES if mode is StoreMode.CLUSTER else SINGLE_SCHEMES
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        return f"a {mode} store URL starts with {' or '.join(s + '://' for s in schemes)}: {url!r}"
    if mode is StoreMode.CLUSTER:
        if not parts.hostname:
            return f"a cluster store URL names a node (host:port): {url!r}"
        database = parts.path.strip("/")
        if database not in ("", "0"):
            return f"a Redis Cluster has database 0 only, not {database!r}: {url!r}"
    return None
