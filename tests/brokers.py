"""Celery brokers for tests that run real workers: a private RabbitMQ virtual host.

The machine's RabbitMQ is shared: each run gets its own virtual host (`rabbitmqctl
add_vhost`), so its queues, exchanges and redeliveries never meet anyone else's, and the
vhost is deleted afterwards with everything in it. The server itself is never touched.

    with private_vhost(amqp_url) as url:   # amqp://guest:guest@127.0.0.1:5672/rw-1a2b3c
        ...
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from tests.conftest import require

RABBITMQCTL_TIMEOUT = 60.0


def rabbitmqctl_binary() -> str | None:
    return shutil.which("rabbitmqctl")


def rabbitmqctl(*args: str) -> None:
    binary = rabbitmqctl_binary()
    assert binary is not None
    done = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}"


def vhost_url(amqp_url: str, vhost: str) -> str:
    """`amqp_url` pointed at another virtual host (the URL's path is the vhost)."""
    return urlunsplit(urlsplit(amqp_url)._replace(path="/" + quote(vhost, safe="")))


@contextmanager
def private_vhost(amqp_url: str, *, private_user: bool = False) -> Iterator[str]:
    """A new virtual host for the URL's user, deleted (with its queues) on exit.

    `private_user`: a new user with a random password instead (deleted too): a test can
    then look for that password in logs, which it cannot do for "guest"."""
    require("rabbitmqctl (to create a private vhost)", rabbitmqctl_binary() is not None)
    parts = urlsplit(amqp_url)
    user = parts.username or "guest"
    tag = uuid.uuid4().hex[:10]
    vhost = f"rw-test-{tag}"
    url = vhost_url(amqp_url, vhost)
    if private_user:
        user, password = f"rw-test-{tag}", f"pw-{uuid.uuid4().hex}"
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
        url = urlunsplit(urlsplit(url)._replace(netloc=netloc))
        rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("add_vhost", vhost)
        try:
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
            yield url
        finally:
            rabbitmqctl("delete_vhost", vhost)
    finally:
        if private_user:
            rabbitmqctl("delete_user", user)


def list_queues(vhost_amqp_url: str, *columns: str) -> dict[str, list[str]]:
    """`rabbitmqctl list_queues name COLUMNS...` in the URL's vhost: {name: [values]}."""
    binary = rabbitmqctl_binary()
    assert binary is not None
    vhost = unquote(urlsplit(vhost_amqp_url).path[1:]) or "/"
    args = [binary, "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", *columns]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl list_queues failed: {done.stderr.strip()}"
    rows = (line.split("\t") for line in done.stdout.splitlines() if line)
    return {row[0]: row[1:] for row in rows}


def queues(vhost_amqp_url: str) -> dict[str, tuple[str, int]]:
    """The vhost's queues as {name: (type, consumers)}."""
    return {
        name: (kind, int(consumers))
        for name, (kind, consumers) in list_queues(vhost_amqp_url, "type", "consumers").items()
    }
