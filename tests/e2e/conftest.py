"""The stack of docker-compose.yml as real local processes, once per test module.

`stack` starts api, worker, beat and flower (and the one-shot migrate before them) with
the commands and environment of docker-compose.yml, pointed at the machine's Redis
(private key namespace, private queue and Celery node names), a private PostgreSQL
database and free ports; it waits on the healthchecks the file declares and stops
everything at the end, failures included. When a test fails, the tail of every
service's log is attached to its report.

External mode (a stack you already run, e.g. `docker compose up`): set E2E_API_URL
(and E2E_FLOWER_URL, default http://127.0.0.1:5555); the CLI runs as E2E_CLI
(default `docker compose exec -T api renderwatch`); E2E_WORKER_NODE names the Celery
worker node if you want Flower's answers filtered by it. Tests that need this
machine's processes (the API's process layout, healthchecks run from here) skip.

Brokers: the local stack runs once per Celery broker in `BROKERS` (the module's tests
run on Redis, then again on RabbitMQ in a private vhost); the time each run took is
shown at the end of the session. An external stack runs once, on its own broker.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from renderwatch.compose import Stack, venv_bin
from shared.settings import REPO_ROOT
from tests.brokers import private_vhost, queues

SERVICES = ["api", "worker", "beat", "flower"]
HEALTHY_TIMEOUT = 120.0
LOG_TAIL_LINES = 60
# Celery brokers the local stack runs on: Redis (the machine's, private queue names) and
# RabbitMQ (the machine's, private vhost).
BROKERS = ["redis", "amqp"]
_RUNS: list[str] = []  # one line per stack run, for the terminal summary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningStack:
    """The running stack and how to reach it."""

    stack: Stack | None  # None: an external stack (E2E_API_URL)
    env: dict[str, str]
    api_url: str
    flower_url: str
    worker_node: str | None
    beat_node: str | None
    cli_prefix: tuple[str, ...] = ("renderwatch",)
    broker: str = "external"

    def local(self) -> Stack:
        """The local process stack; skips the test against an external stack."""
        if self.stack is None:
            pytest.skip("external stack (E2E_API_URL): its processes are not on this machine")
        return self.stack

    def http(self) -> httpx.Client:
        """A client that behaves like a user's: no proxies from the environment on loopback."""
        return httpx.Client(base_url=self.api_url, timeout=10.0, trust_env=False)

    def cli(self, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        """Run `renderwatch ARGS` as an operator would, with the stack's environment + overrides."""
        env = {**os.environ, **self.env, **overrides}
        env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            [*self.cli_prefix, *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def create_key(self, client_id: str) -> str:
        """A new API key from `renderwatch create-key` (the last line of its output)."""
        result = self.cli("create-key", client_id)
        assert result.returncode == 0, result.stderr
        key = result.stdout.strip().splitlines()[-1]
        assert key and " " not in key
        return key


@pytest.fixture(scope="module", params=BROKERS)
def e2e_broker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[tuple[str, str]]:
    """(broker, URL) of one stack run: the machine's Redis, or a private RabbitMQ vhost."""
    broker: str = request.param
    if broker == "amqp" and not os.environ.get("E2E_API_URL"):
        with private_vhost(request.getfixturevalue("amqp_url")) as url:
            yield broker, url  # the vhost is deleted afterwards, with every queue in it
    else:
        yield broker, redis_url


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    e2e_broker: tuple[str, str],
    redis_url: str,
    pg_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningStack]:
    """api, worker, beat and flower from docker-compose.yml, healthy, on one broker."""
    broker, broker_url = e2e_broker
    external = os.environ.get("E2E_API_URL")
    if external:
        if broker != BROKERS[0]:
            pytest.skip("external stack (E2E_API_URL): tested once, on the broker it runs")
        yield RunningStack(
            stack=None,
            env={},
            api_url=external.rstrip("/"),
            flower_url=os.environ.get("E2E_FLOWER_URL", "http://127.0.0.1:5555").rstrip("/"),
            worker_node=os.environ.get("E2E_WORKER_NODE") or None,
            beat_node=None,
            cli_prefix=tuple(
                shlex.split(os.environ.get("E2E_CLI", "docker compose exec -T api renderwatch"))
            ),
        )
        return
    run_id = uuid.uuid4().hex[:10]
    work = tmp_path_factory.mktemp(f"stack-{broker}")
    api_port, flower_port = free_port(), free_port()
    env = {
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": broker_url,
        "CACHE_NAMESPACE": f"e2e-{run_id}",
        "CELERY_QUEUE": f"e2e-{run_id}",
        "WORKER_NAME": f"e2e-worker-{run_id}",
        "BEAT_NAME": f"e2e-beat-{run_id}",
        "BEAT_SCHEDULE": str(work / "celerybeat-schedule"),
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "API_WORKERS": "2",
        "FLOWER_ADDRESS": "127.0.0.1",
        "FLOWER_PORT": str(flower_port),
        "FLOWER_UNAUTHENTICATED_API": "true",
        "WORKER_CONCURRENCY": "2",
        "SCENE_SECONDS": "0.05",
        "STATS_SNAPSHOT_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }
    stack = Stack(SERVICES, env, log_dir=work / "logs", grace_seconds=15.0)
    started = time.monotonic()
    healthy = started
    try:
        try:
            stack.start()
            stack.wait_healthy(timeout=HEALTHY_TIMEOUT)
            healthy = time.monotonic()
        except RuntimeError:
            _dump_logs(stack)
            raise
        if broker == "amqp":
            _wait_quorum_queue_consumed(broker_url, env["CELERY_QUEUE"])
        yield RunningStack(
            stack=stack,
            env=env,
            api_url=f"http://127.0.0.1:{api_port}",
            flower_url=f"http://127.0.0.1:{flower_port}",
            worker_node=f"{env['WORKER_NAME']}@{socket.gethostname()}",
            beat_node=f"{env['BEAT_NAME']}@{socket.gethostname()}",
            broker=broker,
        )
        _RUNS.append(
            f"{request.node.nodeid.split('::')[0]} on {broker}: healthy after "
            f"{healthy - started:.1f}s, tests took {time.monotonic() - healthy:.1f}s"
        )
    finally:
        stack.stop()
        _drop_namespace(redis_url, env["CACHE_NAMESPACE"], env["CELERY_QUEUE"])


def _wait_quorum_queue_consumed(broker_url: str, queue: str) -> None:
    """The stack really runs on RabbitMQ: its task queue is a quorum queue with a consumer."""
    deadline = time.monotonic() + 30
    while True:
        found = queues(broker_url).get(queue)
        if found is not None and found[0] == "quorum" and found[1] >= 1:
            return
        assert time.monotonic() < deadline, f"queue {queue} in the vhost (type, consumers): {found}"
        time.sleep(1)


def _dump_logs(stack: Stack) -> None:
    # Printed, so pytest shows it with the setup error: every service, not only the laggard.
    for name in stack.plan:
        tail = "\n".join(stack.logs(name).splitlines()[-LOG_TAIL_LINES:])
        print(f"----- {name} (last lines of its log) -----\n{tail}", file=sys.stderr)


def _drop_namespace(redis_url: str, namespace: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        keys += [queue.encode(), *client.scan_iter(match=f"*{queue}*", count=1000)]
        if keys:
            client.delete(*set(keys))
    finally:
        client.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and "stack" in getattr(item, "fixturenames", ()):
        running = item.funcargs.get("stack") if hasattr(item, "funcargs") else None
        if isinstance(running, RunningStack) and running.stack is not None:
            for name in running.stack.plan:
                lines = running.stack.logs(name).splitlines()[-LOG_TAIL_LINES:]
                report.sections.append((f"stack log: {name} (last lines)", "\n".join(lines)))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long each stack run took, per broker (the README's broker figures)."""
    if _RUNS:
        terminalreporter.section("e2e stack runs per broker")
        for line in _RUNS:
            terminalreporter.write_line(line)
