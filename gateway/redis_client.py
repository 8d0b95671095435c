"""A redis-py client from a storage URL: the one place that reads `[limits] storage`, for the limits and the
risk engine alike (their state lives in the same Redis, so that replicas agree on both)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff


def connect(url: str, timeout: float):
    """A redis-py client for `url`: redis://, rediss://, unix://, redis+cluster://host:port[,host:port],
    or redis+sentinel://host:port[,host:port]/service. Requests never retry inside the client: the
    caller's timeout is the whole wait."""
    # No socket timeout: the caller's deadline (asyncio) bounds every call, and one timer per call is enough.
    options = {"socket_connect_timeout": timeout}
    parts = urlsplit(url)
    if parts.scheme == "redis+cluster":
        nodes = [ClusterNode(*_host_port(hp)) for hp in parts.netloc.rpartition("@")[2].split(",")]
        return RedisCluster(startup_nodes=nodes, **_credentials(parts), retry=Retry(NoBackoff(), 0), **options)
    if parts.scheme == "redis+sentinel":
        service = parts.path.strip("/").split("/")[0]
        hosts = [_host_port(hp) for hp in parts.netloc.rpartition("@")[2].split(",")]
        sentinel = Sentinel(hosts, sentinel_kwargs=options, **options)
        return sentinel.master_for(service, **_credentials(parts), retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 6379)


def _credentials(parts) -> dict[str, str | None]:
    """The URL's user (a Redis ACL user; none: "default") and password."""
    return {
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }
