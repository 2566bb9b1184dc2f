"""Tools of the fault-and-race suite: real processes, real servers, faults on demand.

Everything here attacks the running system the way production meets trouble:

- `FaultyRedis`: a private `redis-server` on a free loopback port that a test may stop
  (refused), SIGKILL, restart on the same port, `CLIENT PAUSE`, or freeze with SIGSTOP.
  Never the shared Redis: pausing that one would stall everybody else's tests.
- `HungServer` (from `tests.cache_helpers`): accepts TCP connections, never answers.
- `Deployment`: settings on the session's PostgreSQL database with a private key
  namespace, plus helpers to create clients (API keys) and jobs and to start real API
  processes (`python -m api`, the compose command) on that configuration.
- `PollingLoad`: N threads polling an API URL, recording status, latency and version.
- `record_figures`: one summary line per test (printed, collected in a JSON file and
  shown at the end of the run) for the README's "Reliability" table.

Part B of the suite (PostgreSQL, workers, beat, bad input) imports from here too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from shared import jobs
from shared.apikeys import create_api_key
from shared.cache import KeySpace
from shared.db import SessionFactory, build_engine, build_session_factory
from shared.schemas import JobView
from shared.settings import Settings
from tests import procs
from tests.cache_helpers import HungServer, RedisServer, free_port
from tests.conftest import require

__all__ = [
    "SPAWN",
    "ApiClient",
    "Client",
    "Deployment",
    "FaultyRedis",
    "HungServer",
    "Poll",
    "PollingLoad",
    "api_cluster",
    "between",
    "burst",
    "free_port",
    "join_all",
    "polling_load",
    "summarize",
]

SPAWN: SpawnContext = multiprocessing.get_context("spawn")
AUTH_SCHEME = "Bearer"

# -- figures for the README's "Reliability" table ---------------------------------------------

_FIGURES: list[dict[str, Any]] = []
_FIGURES_FILE: list[Path] = []


@pytest.fixture
def record_figures(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., dict[str, Any]]:
    """`record_figures(**figures)`: print one summary line and keep it for the run's table."""
    path = tmp_path_factory.getbasetemp() / "faults-figures.json"

    def record(**figures: Any) -> dict[str, Any]:
        entry = {"test": request.node.nodeid, **figures}
        _FIGURES.append(entry)
        if not _FIGURES_FILE:
            _FIGURES_FILE.append(path)
        path.write_text(json.dumps(_FIGURES, indent=2, default=str))
        line = ", ".join(f"{key}={_fmt(value)}" for key, value in figures.items())
        print(f"\nFAULTS {request.node.name}: {line}", flush=True)
        return entry

    return record


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Show every recorded figure at the end of the run, even without `-s`."""
    if not _FIGURES:
        return
    terminalreporter.section("fault-and-race suite: measured figures")
    for entry in _FIGURES:
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k != "test")
        terminalreporter.write_line(f"{entry['test'].rsplit('::', 1)[-1]}: {figures}")
    if _FIGURES_FILE:
        terminalreporter.write_line(f"(also in {_FIGURES_FILE[0]})")


# -- a private redis-server to break ------------------------------------------------------------


@dataclass
class FaultyRedis(RedisServer):
    """A private `redis-server` (same port across restarts) with the faults production sees.

    `stop()` is a clean shutdown (the port then refuses), `kill()` a SIGKILL, `start()` a
    restart on the same port (empty: no persistence, scripts forgotten). `pause(ms)` is
    `CLIENT PAUSE ms ALL`: connections are accepted, commands wait. Redis 7.0 blocks even
    `CLIENT UNPAUSE` from other clients during an ALL pause, so the pause ends when `ms`
    runs out (`wait_answering()`); `freeze()`/`thaw()` (SIGSTOP/SIGCONT) give a hang that
    the test ends at a moment of its choosing.
    """

    frozen: bool = field(default=False, init=False)

    def kill(self) -> None:
        self.thaw()
        super().kill()

    def stop(self) -> None:
        self.thaw()  # a stopped process cannot act on SIGTERM
        super().stop()

    def pause(self, milliseconds: int, mode: str = "ALL") -> None:
        admin = self.admin()
        try:
            admin.execute_command("CLIENT", "PAUSE", milliseconds, mode)
        finally:
            admin.close()

    def unpause(self) -> None:
        """`CLIENT UNPAUSE` (only reachable during a WRITE pause, or after an ALL one)."""
        admin = self.admin()
        try:
            admin.execute_command("CLIENT", "UNPAUSE")
        finally:
            admin.close()

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False

    def answering(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def wait_answering(self, timeout: float = 15.0) -> None:
        procs.wait_until(self.answering, timeout=timeout, what=f"redis on port {self.port}")

    def info(self, section: str = "stats") -> dict[str, Any]:
        admin = self.admin()
        try:
            return dict(admin.info(section))
        finally:
            admin.close()

    def command_calls(self, command: str) -> int:
        """How many times the server ran `command` (from INFO commandstats)."""
        stats = self.info("commandstats").get(f"cmdstat_{command.lower()}", {})
        return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


@pytest.fixture
def faulty_redis(tmp_path: Path) -> Iterator[FaultyRedis]:
    """A started `FaultyRedis`, shut down after the test (whatever state it was left in)."""
    require("redis-server", procs.redis_server_binary() is not None)
    server = FaultyRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hung_redis() -> Iterator[HungServer]:
    """A TCP server that accepts and never answers: point REDIS_URL at `hung_redis.url`."""
    with HungServer() as server:
        yield server


# -- a deployment: settings, database, clients, jobs, API processes -----------------------------


@dataclass(frozen=True)
class Client:
    """An API client: its id and a valid key."""

    client_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"{AUTH_SCHEME} {self.key}"}


@dataclass
class Deployment:
    """One renderwatch configuration: the session's PostgreSQL DB, a Redis, a key namespace."""

    settings: Settings
    engine: Engine
    sessions: SessionFactory

    @property
    def keys(self) -> KeySpace:
        return KeySpace(
            namespace=self.settings.key_namespace, job_prefix=self.settings.job_cache_key_prefix
        )

    def env(self, **extra: object) -> dict[str, str]:
        """The environment of a child process running this configuration."""
        return procs.settings_env(self.settings, **extra)

    def new_client(self, name: str = "alice") -> Client:
        client_id = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
        with self.sessions() as session:
            key = create_api_key(client_id, session=session)
        return Client(client_id, key)

    def new_job(self, client: Client | str, *, scenes_total: int = 5) -> JobView:
        owner = client.client_id if isinstance(client, Client) else client
        with self.sessions() as session:
            return jobs.create_job(
                session=session,
                client_id=owner,
                prompt="a fox in the snow",
                scenes_total=scenes_total,
            )

    def db_view(self, job_id: int) -> JobView:
        with self.sessions() as session:
            view = jobs.get_job(job_id, session=session)
        assert view is not None, f"job {job_id} is not in the database"
        return view

    def api(self, log_dir: Path, *, workers: int = 1, **extra: object) -> Any:
        """A context manager running one real API process (`python -m api`) on this config."""
        return procs.api_server(self.env(**extra), log_dir, workers=workers)


@pytest.fixture
def deployment(
    make_settings: Callable[..., Settings], pg_url: str, namespace: str
) -> Iterator[Callable[..., Deployment]]:
    """`deployment(redis_url=..., **settings)`: a `Deployment` on the session's PostgreSQL.

    Defaults: a private key namespace, the Celery broker in memory (these tests create
    jobs in the database directly and never enqueue), INFO logs.
    """
    built: list[Deployment] = []

    def build(**overrides: Any) -> Deployment:
        values: dict[str, Any] = {
            "database_url": pg_url,
            "cache_namespace": namespace,
            "celery_broker_url": "memory://",
            "log_level": "INFO",
            **overrides,
        }
        settings = make_settings(**values)
        engine = build_engine(settings.database_url, pool_size=4)
        built.append(Deployment(settings, engine, build_session_factory(engine)))
        return built[-1]

    yield build
    for dep in built:
        dep.engine.dispose()


@contextlib.contextmanager
def api_cluster(
    env: Mapping[str, str], log_dir: Path, count: int, *, ready_timeout: float = 60.0
) -> Iterator[list[procs.ServiceProcess]]:
    """`count` single-worker API processes, started together; each has a `base_url`."""
    started: list[procs.ServiceProcess] = []
    try:
        for _ in range(count):
            port = free_port()
            child_env = {**env, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_WORKERS": "1"}
            proc = procs.ServiceProcess(
                f"api :{port}",
                [sys.executable, "-m", "api"],
                child_env,
                log_dir / f"api-{port}.log",
            )
            proc.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
            started.append(proc.start())
        for proc in started:
            url = f"{proc.base_url}/healthz"  # type: ignore[attr-defined]
            procs.wait_until(
                functools.partial(_healthy, proc, url),
                timeout=ready_timeout,
                interval=0.1,
                what=f"{proc.name} /healthz",
            )
        yield started
    except BaseException:
        for proc in started:
            proc.stop()
            proc.dump()
        raise
    finally:
        for proc in started:
            proc.stop()


def _healthy(proc: procs.ServiceProcess, url: str) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited before answering /healthz")
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class ApiClient:
    """A user's HTTP client for one API base URL and one key."""

    def __init__(self, base_url: str, client: Client | None = None, timeout: float = 10.0):
        headers = client.headers if client is not None else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def job(self, job_id: int) -> httpx.Response:
        return self.http.get(f"/api/v2/jobs/{job_id}")

    def stats(self) -> dict[str, Any]:
        answer = self.http.get("/api/v2/cache/stats")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = self.stats()["statistics"]
        return counts

    def metric(self, name: str) -> float:
        """A sample of the Prometheus exposition (sums the series when it has labels)."""
        text = self.http.get("/metrics").text
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
        values = [float(v) for v in pattern.findall(text)]
        assert values, f"no {name} in /metrics"
        return sum(values)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def etag_version(response: httpx.Response) -> int | None:
    tag = response.headers.get("etag")
    return int(tag.strip('W/"')) if tag else None


# -- a polling load -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Poll:
    """One request of a `PollingLoad` (times from `time.monotonic()`)."""

    started: float
    latency: float
    status: int  # 0: no HTTP answer (see `error`)
    version: int | None
    error: str | None = None


class PollingLoad:
    """`clients` threads polling `path` on `base_url` until stopped; every poll is recorded."""

    def __init__(
        self,
        base_url: str,
        path: str,
        headers: Mapping[str, str],
        *,
        clients: int = 4,
        timeout: float = 10.0,
        interval: float = 0.0,
    ) -> None:
        self.base_url = base_url
        self.path = path
        self.headers = dict(headers)
        self.clients = clients
        self.timeout = timeout
        self.interval = interval
        self._polls: list[Poll] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> PollingLoad:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, name=f"poller-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self) -> None:
        with httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout
        ) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = http.get(self.path)
                except httpx.HTTPError as exc:
                    poll = Poll(started, time.monotonic() - started, 0, None, type(exc).__name__)
                else:
                    poll = Poll(
                        started,
                        time.monotonic() - started,
                        answer.status_code,
                        etag_version(answer),
                    )
                with self._lock:
                    self._polls.append(poll)
                if self.interval:
                    self._stop.wait(self.interval)

    @property
    def polls(self) -> list[Poll]:
        with self._lock:
            return list(self._polls)

    def count(self) -> int:
        with self._lock:
            return len(self._polls)

    def wait_for(self, polls: int, timeout: float = 30.0) -> None:
        """Wait until `polls` more polls than now have been answered."""
        target = self.count() + polls
        procs.wait_until(lambda: self.count() >= target, timeout=timeout, what=f"{polls} polls")

    def stop(self) -> list[Poll]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a poller did not stop"
        return self.polls

    def __enter__(self) -> PollingLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def burst(base_url: str, path: str, headers: Mapping[str, str], count: int = 16) -> list[int]:
    """`count` requests at once, each on its own connection; returns their status codes.

    A burst makes the API's Redis connection pool grow to about `count` connections.
    """
    barrier = threading.Barrier(count)
    statuses: list[int] = []

    def one() -> None:
        with httpx.Client(base_url=base_url, headers=dict(headers), timeout=10.0) as http:
            barrier.wait(10)
            try:
                statuses.append(http.get(path).status_code)
            except httpx.HTTPError:
                statuses.append(0)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return statuses


def polling_load(
    base_url: str, path: str, headers: Mapping[str, str], *, clients: int = 4, **options: Any
) -> PollingLoad:
    """`with polling_load(url, "/api/v2/jobs/7", client.headers) as load: ...` (threads)."""
    return PollingLoad(base_url, path, headers, clients=clients, **options)


def between(polls: Sequence[Poll], start: float, end: float = float("inf")) -> list[Poll]:
    """The polls that started in [start, end)."""
    return [p for p in polls if start <= p.started < end]


def summarize(polls: Sequence[Poll]) -> dict[str, Any]:
    """Count, statuses, and latency percentiles (seconds) of some polls."""
    latencies = sorted(p.latency for p in polls)
    if not latencies:
        return {"polls": 0}

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "polls": len(polls),
        "statuses": dict(Counter(p.status for p in polls)),
        "p50_s": statistics.median(latencies),
        "p99_s": pct(0.99),
        "max_s": latencies[-1],
    }


# -- spawned processes --------------------------------------------------------------------------


def join_all(processes: Sequence[SpawnProcess], timeout: float) -> None:
    """Join spawned processes; kill stragglers and fail if any did not exit cleanly."""
    deadline = time.monotonic() + timeout
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in processes if p.is_alive()]
    for proc in stuck:
        proc.kill()
        proc.join(5)
    assert not stuck, f"{len(stuck)} process(es) did not finish within {timeout}s"
    failed = [(p.name, p.exitcode) for p in processes if p.exitcode != 0]
    assert not failed, f"processes failed: {failed}"
