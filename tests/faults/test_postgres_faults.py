"""Scenario 7: PostgreSQL connections terminated (`pg_terminate_backend`) mid-load.

Each test runs on a private, migrated database, so terminating "every other backend of
the database" hits only the processes under test: a real API process (`python -m api`)
with caching off, so that every poll reads PostgreSQL, and a real prefork Celery worker
rendering a job. Promises checked:

* the API keeps answering polls: a request in flight when its connection dies is
  retried on a fresh one (reads are idempotent), the pool's pre-ping replaces idle
  dead connections, so there is no 5xx storm; the figures are printed;
* the worker's progress writes are retried, never lost: the job still finishes, every
  step written exactly once (the final version counts them), every scene rendered.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from renderwatch import localproc
from shared import jobs
from shared.apikeys import create_api_key
from shared.db import build_engine, build_session_factory
from shared.queue import create_celery, enqueue_render
from shared.runtime import Runtime
from shared.schemas import JobView
from tests import procs
from tests.conftest import require
from tests.renderers import RENDER_LOG_ENV, renderer_log

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

RECORDING = "tests.renderers:RecordingRenderer"
POLLERS = 4
TERMINATIONS = 6
# Polls answered 5xx over the whole run. Zero is the promise (pre-ping + one retry of a
# read whose connection died mid-query); the bound only says what "no storm" means.
MAX_5XX = 0


def _admin(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextmanager
def private_database(admin_url: str, prefix: str) -> Iterator[tuple[str, str]]:
    """A fresh migrated database; yields (SQLAlchemy URL, database name); dropped after."""
    with localproc.private_database(admin_url, prefix) as url:
        yield url, url.rsplit("/", 1)[1]


class Terminator:
    """Terminates every backend of one database except its own connection."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.conn = psycopg.connect(_admin(admin_url), autocommit=True)
        self.database = database
        self.killed = 0
        self.rounds = 0

    def terminate(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.database,),
        ).fetchone()
        killed = int(row[0]) if row else 0
        self.killed += killed
        self.rounds += 1
        return killed

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    with private_database(pg_admin_url, "rw_pgfault") as db:
        yield db


@pytest.fixture
def terminator(pg_admin_url: str, database: tuple[str, str]) -> Iterator[Terminator]:
    term = Terminator(pg_admin_url, database[1])
    yield term
    term.close()


def api_key(database_url: str, client_id: str) -> str:
    engine = build_engine(database_url, pool_size=1)
    try:
        with build_session_factory(engine)() as session:
            return create_api_key(client_id, session=session)
    finally:
        engine.dispose()


def db_job(runtime: Runtime, job_id: int) -> JobView:
    with runtime.sessions() as session:
        view = jobs.get_job(job_id, session=session)
    assert view is not None
    return view


@pytest.mark.timeout(120)
def test_api_polls_survive_terminated_connections_without_a_5xx_storm(
    database, terminator, make_settings, tmp_path, redis_url, record_figures
):
    url, _name = database
    settings = make_settings(
        database_url=url,
        redis_url="",  # caching off: every poll reads PostgreSQL
        # Never used (no POST in this test); set so that no broker is derived from the DB.
        celery_broker_url=redis_url,
        celery_queue=f"test-{uuid.uuid4().hex[:8]}",
        api_key_cache_seconds=0.2,  # auth lookups hit the database too
        log_level="INFO",
    )
    runtime = Runtime.start(settings)
    try:
        with runtime.sessions() as session:
            job_ids = [
                jobs.create_job(
                    session=session, client_id="pg@test", prompt=f"p{i}", scenes_total=3
                ).job_id
                for i in range(3)
            ]
    finally:
        runtime.close()
    key = api_key(url, "pg@test")
    headers = {"Authorization": f"Bearer {key}"}

    codes: Counter[int] = Counter()
    failures: list[tuple[float, int, str]] = []
    ok_times: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poll(worker: int) -> None:
        with httpx.Client(base_url=api.base_url, timeout=10, trust_env=False) as http:
            i = worker
            while not stop.is_set():
                # Mostly the job poll; every fourth request is the list (another read path).
                path = (
                    "/api/v2/jobs?limit=5"
                    if i % 4 == 3
                    else f"/api/v2/jobs/{job_ids[i % len(job_ids)]}"
                )
                i += 1
                try:
                    response = http.get(path, headers=headers)
                except httpx.HTTPError as exc:
                    with lock:
                        codes[0] += 1
                        failures.append((time.monotonic(), 0, repr(exc)))
                    continue
                with lock:
                    codes[response.status_code] += 1
                    if response.status_code == 200:
                        ok_times.append(time.monotonic())
                    else:
                        failures.append((time.monotonic(), response.status_code, response.text))

    env = procs.settings_env(settings)
    with procs.api_server(env, tmp_path) as api:
        threads = [threading.Thread(target=poll, args=(n,)) for n in range(POLLERS)]
        for thread in threads:
            thread.start()
        try:
            procs.wait_until(lambda: len(ok_times) >= 50, timeout=20, what="a warm polling load")
            kill_times = []
            for _ in range(TERMINATIONS):
                time.sleep(0.4)
                killed = terminator.terminate()
                kill_times.append(time.monotonic())
                assert killed >= 1, "the API held no connection to terminate"
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
        metrics = httpx.get(f"{api.base_url}/metrics", trust_env=False).text
        log = api.log()

    # Recovery: the first successful poll after each termination, and the longest gap
    # between successful polls during the run.
    ok_times.sort()
    recovery = []
    for killed_at in kill_times:
        after = [t for t in ok_times if t > killed_at]
        assert after, "no poll succeeded after a termination"
        recovery.append(after[0] - killed_at)
    window = [t for t in ok_times if kill_times[0] - 1 <= t <= kill_times[-1] + 0.5]
    max_gap = max(b - a for a, b in itertools.pairwise(window))
    server_errors = sum(n for code, n in codes.items() if code >= 500 or code == 0)
    db_queries = _metric(metrics, "renderwatch_db_queries_total")
    retried = log.count("database connection lost during a read")
    record_figures(
        scenario=7,
        fault="PostgreSQL backends terminated under a polling load (cache off)",
        polls=sum(codes.values()),
        clients=POLLERS,
        terminations=terminator.rounds,
        backends_killed=terminator.killed,
        server_errors=server_errors,
        reads_retried=retried,
        worst_recovery_s=max(recovery),
        longest_gap_s=max_gap,
        db_statements=int(db_queries),
    )
    assert set(codes) == {200}, f"answers other than 200: {codes}, first: {failures[:3]}"
    assert server_errors <= MAX_5XX
    assert max(recovery) < 2.0, f"slow recovery after a termination: {recovery}"
    assert "Traceback" not in log


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.mark.redis
@pytest.mark.celery
@pytest.mark.timeout(150)
def test_worker_progress_writes_are_retried_when_connections_are_terminated(
    database, terminator, make_settings, tmp_path, redis_url, namespace, record_figures
):
    require("redis-server (binary)", procs.redis_server_binary() is not None)
    url, _name = database
    scenes = 16
    render_log = tmp_path / "renders.log"
    with procs.private_redis(tmp_path) as broker:
        settings = make_settings(
            database_url=url,
            redis_url=redis_url,
            cache_namespace=namespace,
            celery_broker_url=broker,
            celery_queue=f"test-{namespace}",
            scene_seconds=0.1,
            log_level="INFO",
        )
        runtime = Runtime.start(settings)
        celery = create_celery(settings)
        watcher = redis.Redis.from_url(redis_url)
        pubsub = watcher.pubsub()
        try:
            with runtime.sessions() as session:
                job_id = jobs.create_job(
                    session=session, client_id="pg@test", prompt="storm", scenes_total=scenes
                ).job_id
            pubsub.subscribe(runtime.cache.keys.channel(job_id))
            procs.wait_until(
                lambda: (m := pubsub.get_message(timeout=0.1)) and m["type"] == "subscribe",
                timeout=5,
                what="the pub/sub subscription",
            )
            env = procs.settings_env(settings, renderer=RECORDING)
            env[RENDER_LOG_ENV] = str(render_log)
            with procs.celery_worker(env, tmp_path, queue=settings.celery_queue) as worker:
                enqueue_render(celery, job_id)
                procs.wait_until(
                    lambda: db_job(runtime, job_id).progress.scenes_completed >= 2,
                    timeout=60,
                    what="two rendered scenes",
                )
                started = time.monotonic()
                # A storm of terminations while the render writes a step every ~0.1 s:
                # some of them land inside a progress write. It lasts 2 s, longer (up to
                # 8 s, while the render lasts) until one did, so the fault is never missed.
                while (elapsed := time.monotonic() - started) < 8.0:
                    terminator.terminate()
                    time.sleep(0.01)
                    if elapsed >= 2.0 and terminator.rounds % 20 == 0:
                        text = worker.log()
                        if "transient database error" in text or "] succeeded in" in text:
                            break

                def finished() -> JobView | None:
                    # A task that gave up will never finish the job: say so at once.
                    assert "raised unexpected" not in worker.log(), worker.log()[-3000:]
                    view = db_job(runtime, job_id)
                    return view if view.finished else None

                final = procs.wait_until(finished, timeout=90, what="the job to finish")
                log = worker.log()
            published = _drain(pubsub)
        finally:
            pubsub.close()
            watcher.close()
            celery.close()
            runtime.close()

    steps = 2 + scenes + 3  # scripting, storyboard, scenes, encoding, uploading, done
    retries = len(re.findall(r"transient database error", log))
    rendered = sorted(int(what) for _, _, kind, what in renderer_log(render_log) if kind == "scene")
    record_figures(
        scenario=7,
        fault="PostgreSQL backends terminated during a render",
        terminations=terminator.rounds,
        backends_killed=terminator.killed,
        task_retries=retries,
        final=f"{final.status.value} v{final.version}",
        scenes=scenes,
        scene_renders=len(rendered),
        versions_published=len(published),
    )
    assert retries >= 1, "no write met a terminated connection: the fault was not injected"
    assert final.status == "succeeded", final
    assert final.progress.scenes_completed == scenes
    assert final.progress.percent == 100.0
    # Every step was written exactly once: one version per step, none lost, none doubled.
    assert final.version == 1 + steps
    assert set(rendered) == set(range(1, scenes + 1))
    # A scene rendered whose report died with its connection is rendered again on resume;
    # at most one scene per retry.
    assert len(rendered) - scenes <= retries
    versions = [view["version"] for view in published]
    notable = [line for line in log.splitlines() if "WARN" in line or "resuming" in line]
    assert versions == sorted(set(versions)), (
        f"a version was published twice or out of order: {versions}\n" + "\n".join(notable)
    )


def _drain(pubsub: Any) -> list[dict[str, Any]]:
    views = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        if message["type"] == "message":
            views.append(orjson.loads(message["data"]))
    return views
