"""The cache contract (`tests/unit/test_cache_contract.py`) on the real Redis.

fakeredis runs Lua through lupa; here every script meets the real server's Lua, its
error messages (WRONGTYPE inside a script) and its TTL handling. Keys live under the
test's private namespace, so the shared Redis is never disturbed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.cache.backend import connect
from tests.unit.test_cache_contract import CacheContract


@pytest.mark.redis
class TestContractOnRealRedis(CacheContract):
    """The contract on the real Redis server."""

    @pytest.fixture
    def client_factory(self, redis_url: str) -> Iterator[Callable[[], Any]]:
        clients: list[Any] = []

        def factory() -> Any:
            # A generous timeout: this suite is about correctness, not about a slow machine
            # tripping the breaker under fifty threads (timeouts: test_cache_outage.py).
            client = connect(redis_url, socket_timeout=5.0)
            clients.append(client)
            return client

        yield factory
        for client in clients:
            client.close()

    @pytest.fixture
    def key_ns(self, namespace: str) -> str:
        return namespace
