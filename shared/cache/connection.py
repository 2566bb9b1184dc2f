"""Redis clients for every topology of REDIS_URL: the one place that builds them.

`sync_client` / `async_client` turn a `RedisSpec` (shared.cache.redis_url) into a
`redis.Redis` (one server, or the master a Sentinel names) or a `RedisCluster`, sync
or asyncio, all with the same policy: short socket timeouts, no hidden retries (the
circuit breaker of shared.cache decides), no health-check round trips.

Sentinel (README "Running in production"): each new connection asks the sentinels
for the master, so after a failover the next connection lands on the new one; a
READONLY reply from a demoted master disconnects that connection and raises a
ConnectionError (redis-py's SentinelManagedConnection), and the first reconnection
that sees a new master address drops the pool's idle connections, so no idle
connection keeps talking to the old master. The cache treats that ConnectionError
as an outage: repair, then serve.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeAlias

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from shared.cache.redis_url import RedisSpec

SyncClient: TypeAlias = "redis.Redis | RedisCluster | LazyRedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | AsyncRedisCluster"

SYNC_MAX_CONNECTIONS = 64
ASYNC_MAX_CONNECTIONS = 256


class LazyRedisCluster:
    """A `RedisCluster` made on first use: redis-py's synchronous cluster client asks a
    node for the slot map in its constructor, and the cache must start (and serve from
    the database) while Redis is down. Until the map is read, every use raises
    redis.ConnectionError, which the cache treats like any outage."""

    def __init__(self, factory: Callable[[], RedisCluster]) -> None:
        self._factory = factory
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> RedisCluster:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except RedisClusterException as exc:
                        raise redis.ConnectionError(str(exc)) from exc
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class SentinelMaster(redis.Redis):
    """The master `Sentinel.master_for` names; closing it closes its sentinel clients too."""

    def close(self) -> None:
        super().close()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


class AsyncSentinelMaster(redis.asyncio.Redis):
    """`SentinelMaster` on asyncio."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


def _common(spec: RedisSpec, socket_timeout: float) -> dict[str, Any]:
    """Connection options shared by every topology (the URL's options win)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": spec.socket_timeout or socket_timeout,
        "socket_connect_timeout": spec.socket_connect_timeout
        or spec.socket_timeout
        or socket_timeout,
        "health_check_interval": 0,
    }
    if spec.username is not None:
        kwargs["username"] = spec.username
    if spec.password is not None:
        kwargs["password"] = spec.password
    if spec.client_name is not None:
        kwargs["client_name"] = spec.client_name
    if spec.tls:
        kwargs.update(_tls(spec))
    return kwargs


def _tls(spec: RedisSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": spec.ssl_cert_reqs}
    if spec.ssl_ca_certs is not None:
        kwargs["ssl_ca_certs"] = spec.ssl_ca_certs
    if spec.ssl_certfile is not None:
        kwargs["ssl_certfile"] = spec.ssl_certfile
    if spec.ssl_keyfile is not None:
        kwargs["ssl_keyfile"] = spec.ssl_keyfile
    if spec.ssl_check_hostname is not None:
        kwargs["ssl_check_hostname"] = spec.ssl_check_hostname
    elif spec.ssl_cert_reqs != "required":
        # Checking the name of a certificate that is not verified means nothing, and
        # Python refuses the combination.
        kwargs["ssl_check_hostname"] = False
    return kwargs


def _sentinel_kwargs(spec: RedisSpec, socket_timeout: float) -> dict[str, Any]:
    """How to talk to the sentinels: their own credentials (query string), the data
    nodes' TLS settings, the same short timeouts."""
    kwargs: dict[str, Any] = {
        "socket_timeout": spec.socket_timeout or socket_timeout,
        "socket_connect_timeout": spec.socket_connect_timeout
        or spec.socket_timeout
        or socket_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if spec.sentinel_username is not None:
        kwargs["username"] = spec.sentinel_username
    if spec.sentinel_password is not None:
        kwargs["password"] = spec.sentinel_password
    if spec.tls:
        kwargs.update(_tls(spec))
    return kwargs


def sync_client(
    spec: RedisSpec, *, socket_timeout: float, max_connections: int = SYNC_MAX_CONNECTIONS
) -> SyncClient:
    """A synchronous client for `spec` (nothing is sent until the first command)."""
    kwargs = _common(spec, socket_timeout)
    pool_size = spec.max_connections or max_connections
    if spec.mode == "cluster":
        nodes = [ClusterNode(host, port) for host, port in spec.hosts]  # type: ignore[no-untyped-call]
        return LazyRedisCluster(
            lambda: RedisCluster(
                startup_nodes=nodes,
                retry=Retry(NoBackoff(), 0),
                max_connections=pool_size,
                **kwargs,
            )
        )
    if spec.mode == "sentinel":
        assert spec.service_name is not None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(spec.hosts),
            sentinel_kwargs=_sentinel_kwargs(spec, socket_timeout),
            **kwargs,
        )
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            spec.service_name,
            redis_class=SentinelMaster,
            db=spec.db,
            retry=Retry(NoBackoff(), 0),
            max_connections=pool_size,
        )
        return master
    if spec.unix_socket_path is not None:
        location: dict[str, Any] = {"unix_socket_path": spec.unix_socket_path}
    else:
        host, port = spec.hosts[0]
        location = {"host": host, "port": port}
    return redis.Redis(
        **location,
        db=spec.db,
        retry=Retry(NoBackoff(), 0),
        max_connections=pool_size,
        **kwargs,
    )


def async_client(
    spec: RedisSpec, *, socket_timeout: float, max_connections: int = ASYNC_MAX_CONNECTIONS
) -> AsyncClient:
    """An asyncio client for `spec`, with the policy of `sync_client`."""
    kwargs = _common(spec, socket_timeout)
    pool_size = spec.max_connections or max_connections
    if spec.mode == "cluster":
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in spec.hosts],
            retry=Retry(NoBackoff(), 0),  # type: ignore[arg-type]
            max_connections=pool_size,
            **kwargs,
        )
    if spec.mode == "sentinel":
        assert spec.service_name is not None
        sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
            list(spec.hosts),
            sentinel_kwargs=_async_retry(_sentinel_kwargs(spec, socket_timeout)),
            **kwargs,
        )
        master: redis.asyncio.Redis = sentinel.master_for(
            spec.service_name,
            redis_class=AsyncSentinelMaster,
            db=spec.db,
            retry=_async_no_retry(),
            max_connections=pool_size,
        )
        return master
    if spec.unix_socket_path is not None:
        location: dict[str, Any] = {"unix_socket_path": spec.unix_socket_path}
    else:
        host, port = spec.hosts[0]
        location = {"host": host, "port": port}
    return redis.asyncio.Redis(
        **location,
        db=spec.db,
        retry=_async_no_retry(),
        max_connections=pool_size,
        **kwargs,
    )


def renew_async(client: AsyncClient) -> AsyncClient:
    """A client like `client` on a fresh pool (none of its connections reused).

    After an outage the asyncio reader swaps in new connections rather than trust idle
    ones whose server may be gone; a Sentinel pool must keep asking the sentinels and a
    cluster client must rediscover its nodes, so a plain copy of the pool will not do.
    """
    if isinstance(client, AsyncRedisCluster):
        nodes = [AsyncClusterNode(n.host, n.port) for n in client.get_nodes()] or [
            AsyncClusterNode(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()
        ]
        kwargs = dict(client.connection_kwargs)
        for name in ("host", "port", "retry", "connection_class"):
            kwargs.pop(name, None)
        return AsyncRedisCluster(
            startup_nodes=nodes,
            retry=Retry(NoBackoff(), 0),  # type: ignore[arg-type]
            max_connections=getattr(client, "max_connections", ASYNC_MAX_CONNECTIONS),
            **kwargs,
        )
    pool = client.connection_pool
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        # Its own sentinel clients too: closing the retired client closes its own.
        old_manager = pool.sentinel_manager
        manager = AsyncSentinel(  # type: ignore[no-untyped-call]
            [
                (
                    s.connection_pool.connection_kwargs["host"],
                    s.connection_pool.connection_kwargs["port"],
                )
                for s in old_manager.sentinels
            ],
            min_other_sentinels=old_manager.min_other_sentinels,
            sentinel_kwargs=old_manager.sentinel_kwargs,
            **old_manager.connection_kwargs,
        )
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
        fresh: redis.asyncio.ConnectionPool = redis.asyncio.sentinel.SentinelConnectionPool(  # type: ignore[no-untyped-call]
            pool.service_name,
            manager,
            is_master=pool.is_master,
            check_connection=pool.check_connection,
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **kwargs,
        )
        # from_pool: the client owns the pool, so closing the client closes it.
        return AsyncSentinelMaster.from_pool(fresh)
    else:
        fresh = pool.__class__(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **pool.connection_kwargs,
        )
    return redis.asyncio.Redis.from_pool(fresh)


def _async_no_retry() -> Any:
    from redis.asyncio.retry import Retry as AsyncRetry

    return AsyncRetry(NoBackoff(), 0)


def _async_retry(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["retry"] = _async_no_retry()
    return kwargs
