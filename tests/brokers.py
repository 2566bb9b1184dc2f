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


def _rabbitmqctl(*args: str) -> None:
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
def private_vhost(amqp_url: str) -> Iterator[str]:
    """A new virtual host for the URL's user, deleted (with its queues) on exit."""
    require("rabbitmqctl (to create a private vhost)", rabbitmqctl_binary() is not None)
    user = urlsplit(amqp_url).username or "guest"
    vhost = f"rw-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield vhost_url(amqp_url, vhost)
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def queues(vhost_amqp_url: str) -> dict[str, tuple[str, int]]:
    """The vhost's queues as {name: (type, consumers)}, from `rabbitmqctl list_queues`."""
    binary = rabbitmqctl_binary()
    assert binary is not None
    vhost = unquote(urlsplit(vhost_amqp_url).path[1:]) or "/"
    done = subprocess.run(
        [
            binary,
            "-q",
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "type",
            "consumers",
        ],
        capture_output=True,
        text=True,
        timeout=RABBITMQCTL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"rabbitmqctl list_queues failed: {done.stderr.strip()}"
    found: dict[str, tuple[str, int]] = {}
    for line in done.stdout.splitlines():
        name, kind, consumers = line.split("\t")
        found[name] = (kind, int(consumers))
    return found
