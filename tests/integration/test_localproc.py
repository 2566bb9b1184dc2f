"""The process helper shared by the demo, the bench and the tests (renderwatch.localproc)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import redis

from renderwatch import localproc
from tests.conftest import require


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_free_port_is_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(20):
        port = localproc.free_port()
        assert not low <= port <= high, port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_service_process_kills_a_grandchild_that_left_the_group(tmp_path: Path) -> None:
    """A daemonised grandchild (new session) is found by mirakuru's marker and killed."""
    pidfile = tmp_path / "grandchild.pid"
    script = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = localproc.ServiceProcess(
        "parent", [sys.executable, "-c", script], dict(os.environ), tmp_path / "parent.log"
    )
    with proc:
        proc.wait_for_log("ready", timeout=30)
        grandchild = int(pidfile.read_text())
        assert _alive(grandchild)
    assert not proc.alive()
    localproc.wait_until(lambda: not _alive(grandchild), timeout=10, what="the grandchild")


def test_wait_for_log_names_the_log_when_the_process_exits(tmp_path: Path) -> None:
    proc = localproc.ServiceProcess(
        "quitter", [sys.executable, "-c", "print('bye')"], dict(os.environ), tmp_path / "q.log"
    )
    with proc, pytest.raises(localproc.StartupError, match=r"quitter exited .*q\.log"):
        proc.wait_for_log("never printed", timeout=30)


def test_redis_server_restarts_on_its_port_and_dies_on_kill(tmp_path: Path) -> None:
    require("redis-server (binary)", localproc.redis_server_binary() is not None)
    with localproc.private_redis(tmp_path) as server:
        client = redis.Redis(port=server.port, socket_timeout=2)
        try:
            assert client.set("k", "v")
            port = server.port
            server.stop()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            server.start()
            assert server.port == port and client.ping()
            assert client.get("k") is None  # no persistence: a restart starts empty
            process = server.process
            assert process is not None
            server.kill()
            assert process.returncode == -9
            with pytest.raises(redis.ConnectionError):
                client.ping()
        finally:
            client.close()
