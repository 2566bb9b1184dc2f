"""Helpers for the cache tests: a harness around `JobCache`, fake and private servers.

- `Harness` / `make_harness`: a `JobCache` on a given Redis client and SQL database, its
  DB loader wrapped in `Mock(wraps=...)` so tests count DB reads.
- `RecordingClient`: a Redis client proxy that records every command sent (to prove
  O(1) invalidation and that health checks make no round trip).
- `HungServer`: a TCP server that accepts connections and never answers.
- `RedisServer`, `private_redis`, `free_port`: from `renderwatch.localproc` (re-exported
  here): a private `redis-server` on a free port that a test may stop, restart and pause
  without disturbing the shared Redis.
- `stats_child`: the body of a spawned process in the multi-process statistics test.

The contract suite that runs on fakeredis and on the real Redis is `CacheContract` in
`tests/unit/test_cache_contract.py` (a test module, so pytest rewrites its asserts).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest.mock import Mock

import orjson
from sqlalchemy import Engine

from renderwatch.localproc import RedisServer as RedisServer
from renderwatch.localproc import free_port as free_port
from renderwatch.localproc import private_redis as private_redis
from shared import jobs
from shared.cache import CachePolicy, CircuitBreaker, JobCache, KeySpace
from shared.cache.breaker import State
from shared.db import SessionFactory, build_engine, build_session_factory
from shared.schemas import JobView, ProgressUpdate, UpdateOutcome

# A job of five scenes walked from queued to done: every step is a real change (+1 version).
SCENES = 5
STEPS: list[dict[str, Any]] = [
    {"current_stage": "scripting"},
    {"current_stage": "storyboard"},
    *({"current_stage": "rendering", "scenes_completed": n} for n in range(SCENES + 1)),
    {"current_stage": "encoding"},
    {"current_stage": "uploading"},
    {"current_stage": "done", "result_url": "https://videos.example.invalid/v.mp4"},
]

STATS_KEYS = {"cache_enabled", "statistics", "message"}
STATISTICS_KEYS = {
    "hits",
    "misses",
    "errors",
    "invalidations",
    "hit_rate",
    "total_requests",
    "redis_enabled",
    "redis_available",
    "ttl_seconds",
    "since",
}


class FakeClock:
    """A monotonic clock the test moves by hand (for the circuit breaker)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def open_db(url: str) -> tuple[Engine, SessionFactory]:
    engine = build_engine(url)
    return engine, build_session_factory(engine)


def new_job(
    sessions: SessionFactory, client_id: str = "alice@example.com", scenes_total: int = SCENES
) -> JobView:
    with sessions() as session:
        return jobs.create_job(
            session=session,
            client_id=client_id,
            prompt="a cat on a skateboard",
            scenes_total=scenes_total,
        )


def db_view(sessions: SessionFactory, job_id: int) -> JobView:
    with sessions() as session:
        view = jobs.get_job(job_id, session=session)
    assert view is not None
    return view


def write_db_only(sessions: SessionFactory, job_id: int, progress: dict[str, Any]) -> JobView:
    """Commit a progress update without touching Redis (a write whose pre-warm was lost)."""
    with sessions() as session:
        outcome = jobs.update_job_progress(job_id, ProgressUpdate.parse(progress), session=session)
    assert outcome is not None and outcome.changed
    return outcome.view


@dataclass
class Harness:
    """One `JobCache` (think: one process) on a Redis client and the shared database."""

    cache: JobCache
    client: Any
    sessions: SessionFactory
    keys: KeySpace
    load: Mock
    real_load: Callable[[int], JobView | None]
    clock: FakeClock
    spawn: Callable[..., Harness]

    def new_job(self, client_id: str = "alice@example.com") -> JobView:
        return new_job(self.sessions, client_id)

    def db_version(self, job_id: int) -> int:
        return db_view(self.sessions, job_id).version

    def raw(self, job_id: int) -> bytes | None:
        """The job's Redis entry as stored (read directly: no statistics, no lease)."""
        value = self.client.get(self.keys.job(job_id))
        return bytes(value) if value is not None else None

    def cached_version(self, job_id: int) -> int | None:
        raw = self.raw(job_id)
        return None if raw is None else int(orjson.loads(raw)["version"])

    def counts(self) -> dict[str, Any]:
        stats = self.cache.stats()["statistics"]
        assert isinstance(stats, dict)
        return stats

    def another(self, **overrides: Any) -> Harness:
        """A second cache on the same Redis and database, as another process would build."""
        return self.spawn(**overrides)


Make = Callable[..., Harness]


def state_of(cache: JobCache) -> State:
    """The breaker's state, read through a call (so mypy does not narrow it between reads)."""
    return cache.breaker.state


def make_harness(
    client_factory: Callable[[], Any],
    sessions: SessionFactory,
    namespace: str,
    *,
    ttl_seconds: int = 30,
    finished_ttl_seconds: int = 3_600,
    lease_ms: int = 500,
    threshold: int = 1,
    reset_seconds: float = 1.0,
    recording: bool = False,
    backend: bool = True,
    real_clock: bool = False,
    incarnation: str = "",
) -> Harness:
    """A `JobCache` wired as `shared.runtime.build_cache` does, with a countable DB loader."""
    from shared.cache.backend import RedisBackend

    keys = KeySpace(namespace=f"{namespace}:", job_prefix="job")
    client = client_factory() if backend else None
    if recording and client is not None:
        client = RecordingClient(client)

    def load_job(job_id: int) -> JobView | None:
        with sessions() as session:
            return jobs.get_job(job_id, session=session)

    def write_progress(job_id: int, update: ProgressUpdate) -> UpdateOutcome | None:
        with sessions() as session:
            return jobs.update_job_progress(job_id, update, session=session)

    def recent_jobs(since: Any) -> list[tuple[int, str]]:
        with sessions() as session:
            return jobs.jobs_updated_since(since, session=session)

    load = Mock(wraps=load_job)
    clock = FakeClock()
    settings = {
        "ttl_seconds": ttl_seconds,
        "finished_ttl_seconds": finished_ttl_seconds,
        "lease_ms": lease_ms,
        "threshold": threshold,
        "reset_seconds": reset_seconds,
        "recording": recording,
        "backend": backend,
        "real_clock": real_clock,
        "incarnation": incarnation,
    }
    cache = JobCache(
        backend=RedisBackend(client, keys) if client is not None else None,
        keys=keys,
        load_job=load,
        write_progress=write_progress,
        recent_jobs=recent_jobs,
        policy=CachePolicy(
            ttl_seconds=ttl_seconds,
            finished_ttl_seconds=finished_ttl_seconds,
            lease_ms=lease_ms,
            incarnation=incarnation,
        ),
        breaker=CircuitBreaker(
            threshold=threshold,
            reset_seconds=reset_seconds,
            clock=time.monotonic if real_clock else clock,
        ),
    )

    def spawn(**overrides: Any) -> Harness:
        return make_harness(client_factory, sessions, namespace, **{**settings, **overrides})

    return Harness(
        cache=cache,
        client=client,
        sessions=sessions,
        keys=keys,
        load=load,
        real_load=load_job,
        clock=clock,
        spawn=spawn,
    )


def run_threads(count: int, target: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """Run `target(i)` in `count` threads started together; re-raise the first error."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = target(i)
        except BaseException as exc:  # collected and re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads did not finish in time"
    if errors:
        raise errors[0]
    return results


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- a client that records commands ------------------------------------------------------------


class _RecordingPipeline:
    def __init__(self, inner: Any, log: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._inner = inner
        self._log = log

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._log.append((str(args[0]).upper(), args[1:]))
        return self._inner.execute_command(*args, **kwargs)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._log.append((name.upper(), args))
            return attr(*args, **kwargs)

        return recorded


class RecordingClient:
    """Wraps a redis client; `commands` lists every command sent, `round_trips` counts calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.commands: list[tuple[str, tuple[Any, ...]]] = []
        self.round_trips = 0

    def pipeline(self, transaction: bool = True) -> Any:
        self.round_trips += 1
        return _RecordingPipeline(self.inner.pipeline(transaction=transaction), self.commands)

    def names(self) -> list[str]:
        return [name for name, _ in self.commands]

    def reset(self) -> None:
        self.commands.clear()
        self.round_trips = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr) or name in {"close"}:
            return attr

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            self.commands.append((name.upper(), args))
            return attr(*args, **kwargs)

        return recorded


# -- network fakes and a private redis-server --------------------------------------------------


class HungServer:
    """Accepts TCP connections and reads whatever arrives, but never answers (a hung Redis)."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self.bytes_received = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self._listener.accept()
                        conn.setblocking(False)
                        self.connections += 1
                        self._selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65_536)
                except (BlockingIOError, ConnectionError):
                    data = b""
                if data:
                    self.bytes_received += len(data)
                else:
                    self._selector.unregister(sock)
                    sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self._selector.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stats_child(redis_url: str, db_url: str, namespace: str, job_ids: list[int], reads: int) -> int:
    """Body of a spawned process: `reads` cached reads over `job_ids`; returns reads served."""
    from shared.cache.backend import connect

    engine, sessions = open_db(db_url)
    try:
        harness = make_harness(
            lambda: connect(redis_url, socket_timeout=5.0), sessions, namespace, lease_ms=5_000
        )
        served = 0
        for i in range(reads):
            job = harness.cache.get(job_ids[i % len(job_ids)])
            assert job is not None
            served += 1
        harness.cache.close()
        return served
    finally:
        engine.dispose()
