"""The services a bench run owns: a private redis-server, a private PostgreSQL database
and a hung TCP server. Each is created for the run and removed at its end.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.procs import PYTHON, Child, ProcessGroup, base_env, free_port, wait_port
from renderwatch import localproc
from renderwatch.localproc import redis_server_argv

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class MissingTool(RuntimeError):
    """A binary the bench needs is not installed (the message says how to install it)."""


@dataclass
class PrivateRedis:
    """A redis-server of our own on a free port: the bench may pause it (never the shared one)."""

    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, *, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)


def start_redis(group: ProcessGroup, workdir: Path) -> PrivateRedis:
    """Start a throwaway redis-server: no persistence, loopback only."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingTool("redis-server is missing: apt-get install redis-server")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = redis_server_argv(binary, port, workdir, "--maxclients", "4096")
    child = group.start("redis-server", argv, env=base_env(), port=port)
    wait_port(child, port)
    return PrivateRedis(child=child, port=port)


def start_hung_server(group: ProcessGroup) -> Child:
    """A TCP server that accepts connections and never answers (a hung Redis)."""
    port = free_port()
    child = group.start("hung-server", [PYTHON, "-m", "bench.hung", str(port)], port=port)
    wait_port(child, port)
    return child


@contextlib.contextmanager
def private_database(admin_url: str = DEFAULT_PG_ADMIN_URL) -> Iterator[str]:
    """Create a fresh migrated PostgreSQL database for the run; drop it at the end."""
    with localproc.private_database(admin_url, "rw_bench") as url:
        yield url
