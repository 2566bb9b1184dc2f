"""Fixtures shared by every suite.

Services: `--redis-url` and `--pg-url` name the real servers. A test that needs one
skips with a loud reason when it is unreachable, and fails instead when `CI` is set.
Isolation: each test gets its own Redis key namespace (keys removed afterwards);
each session gets its own PostgreSQL database, migrated, dropped at the end.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from shared.settings import Settings

IN_CI = bool(os.environ.get("CI"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="a real Redis for integration tests (keys go under a per-test namespace)",
    )
    parser.addoption(
        "--pg-url",
        default=os.environ.get(
            "TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL admin URL; the tests create and drop their own database",
    )
    parser.addoption(
        "--amqp-url",
        default=os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
        help="a RabbitMQ broker for worker tests whose Redis is being broken on purpose",
    )


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require(service: str, ok: bool) -> None:
    """Skip loudly without the service on a developer machine; fail in CI."""
    if ok:
        return
    message = f"{service} is not reachable: this test needs the real {service}"
    if IN_CI:
        pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
    pytest.skip("SKIPPED LOUDLY: " + message)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    url = str(request.config.getoption("--redis-url"))
    require("Redis", reachable(url, 6379))
    return url


@pytest.fixture(scope="session")
def amqp_url(request: pytest.FixtureRequest) -> str:
    url = str(request.config.getoption("--amqp-url"))
    require("RabbitMQ", reachable(url, 5672))
    return url


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key namespace private to this test; its keys are deleted afterwards."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    yield ns
    url = str(request.config.getoption("--redis-url"))
    if reachable(url, 6379):
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="session")
def pg_admin_url(request: pytest.FixtureRequest) -> str:
    url = str(request.config.getoption("--pg-url"))
    require("PostgreSQL", reachable(url, 5432))
    return url


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    from renderwatch.localproc import private_database

    with private_database(pg_admin_url, "rw_test") as url:
        yield url


@pytest.fixture
def private_pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test alone."""
    from renderwatch.localproc import private_database

    with private_database(pg_admin_url, "rw_t") as url:
        yield url


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    """A private redis-server as the Celery broker (its URL).

    Tests with short visibility timeouts never touch the messages (or kombu's global
    unacked index) of anyone sharing the main Redis.
    """
    from renderwatch.localproc import private_redis, redis_server_binary

    require("redis-server (binary)", redis_server_binary() is not None)
    with private_redis(tmp_path) as server:
        yield server.url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database in the test's temporary folder."""
    from renderwatch.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'renderwatch.db'}"
    upgrade(url)
    return url


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """Settings from explicit values only (the developer's .env is ignored)."""

    def build(**overrides: Any) -> Settings:
        return Settings(_env_file=None, **overrides)

    return build


@pytest.fixture
def fake_redis() -> Any:
    """A fresh fakeredis server (with Lua) per test."""
    import fakeredis

    return fakeredis.FakeRedis(server=fakeredis.FakeServer())
