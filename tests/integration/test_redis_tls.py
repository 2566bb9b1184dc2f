"""rediss:// against a local TLS-only redis-server whose certificate the test makes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.cache.aio import connect_async
from shared.cache.backend import connect
from tests.topologies import TlsRedis, tls_redis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsRedis]:
    with tls_redis(tmp_path) as server:
        yield server


def test_a_round_trip_over_tls_with_the_certificate_verified(tls: TlsRedis) -> None:
    url = f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={tls.ca_file}&ssl_cert_reqs=required"
    client = connect(url, socket_timeout=5)
    try:
        client.set("tls-probe", b"v1")
        assert client.get("tls-probe") == b"v1"
        # The connection really is TLS (a plain client on the port gets nothing back).
        assert client.connection_pool.connection_class is redis.SSLConnection
    finally:
        client.close()


def test_the_asyncio_client_verifies_too(tls: TlsRedis) -> None:
    url = f"rediss://localhost:{tls.port}/0?ssl_ca_certs={tls.ca_file}"

    async def main() -> bytes | None:
        client = connect_async(url, socket_timeout=5)
        try:
            await client.set("tls-async", b"v2")
            return await client.get("tls-async")  # type: ignore[no-any-return]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == b"v2"


def test_a_certificate_from_another_ca_is_refused(tls: TlsRedis) -> None:
    url = f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_certs={tls.wrong_ca_file}"
    client = connect(url, socket_timeout=5)
    try:
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            client.ping()
    finally:
        client.close()


def test_ssl_cert_reqs_none_is_honoured(tls: TlsRedis) -> None:
    """The user's explicit choice to skip verification (e.g. a managed Redis with a
    private CA they cannot ship) connects with no CA at all."""
    url = f"rediss://127.0.0.1:{tls.port}/0?ssl_cert_reqs=none"
    client = connect(url, socket_timeout=5)
    try:
        assert client.ping()
    finally:
        client.close()
    strict = connect(f"rediss://127.0.0.1:{tls.port}/0", socket_timeout=5)
    try:
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            strict.ping()
    finally:
        strict.close()


def test_plain_redis_on_the_tls_port_does_not_work(tls: TlsRedis) -> None:
    client = connect(f"redis://127.0.0.1:{tls.port}/0", socket_timeout=2)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()
