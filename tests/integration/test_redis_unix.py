"""unix:// against a local redis-server listening on a Unix socket only."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.cache.backend import connect
from tests.topologies import Node, free_port_pair, need_redis_binaries

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def test_a_round_trip_over_a_unix_socket_with_a_password(tmp_path: Path) -> None:
    need_redis_binaries()
    socket_path = tmp_path / "redis.sock"
    port = free_port_pair()  # only for the readiness check's name; TCP is off
    node = Node(
        "redis-unix",
        port,
        tmp_path / "unix",
        [
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--requirepass",
            "unix-pw",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
    )
    node.client = lambda **kw: redis.Redis(  # type: ignore[method-assign]
        unix_socket_path=str(socket_path), password="unix-pw", socket_timeout=1
    )
    node.start()
    try:
        client = connect(f"unix://:unix-pw@{socket_path}?db=3", socket_timeout=2)
        try:
            client.set("unix-probe", b"ok")
            assert client.get("unix-probe") == b"ok"
            assert client.connection_pool.connection_kwargs["path"] == str(socket_path)
            assert client.connection_pool.connection_kwargs["db"] == 3
        finally:
            client.close()
    finally:
        node.stop()
