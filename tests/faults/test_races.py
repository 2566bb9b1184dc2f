"""Issue 3, scenarios 1-3: races across OS processes, checked against a model.

1. Stale fill: spawned reader processes refill one job's entry (invalidating at random,
   their DB loads jittered to widen the window) while a writer process bumps its
   version. Model: the cached version never goes backwards, no fill stores a version
   older than one already acknowledged, no read returns a version older than the one
   acknowledged before it began. Seeded: a failure names its seed.
2. Stampede: 200 concurrent cold polls of one job through three real API processes
   while the job's table is locked (the filler is stuck in its DB read) cost exactly one
   DB read, counted by the APIs' own `renderwatch_db_queries_total`. Then a filler is
   SIGKILLed mid-fill: the others are delayed by no more than the lease.
3. Fresh after write: a writer process reports progress 1,000 times while four reader
   processes poll the job through a real API process (two uvicorn workers); no poll
   returns a version older than the last one acknowledged before it began.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from shared.cache import update_job_progress_with_cache
from shared.cache.machine import Stored
from shared.runtime import Runtime
from shared.schemas import JobView
from tests import procs
from tests.cache_helpers import make_harness, open_db
from tests.faults.conftest import (
    SPAWN,
    ApiClient,
    Client,
    Deployment,
    FaultyRedis,
    api_cluster,
    join_all,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]


def progress_steps(scenes: int) -> list[dict[str, Any]]:
    """Every step a real change: version 1 (queued) + len(steps) after the last."""
    return [
        {"current_stage": "scripting"},
        {"current_stage": "storyboard"},
        *({"current_stage": "rendering", "scenes_completed": n} for n in range(scenes + 1)),
    ]


# -- 1. stale fill: a seeded stress loop across processes ---------------------------------------

STALE_READERS = 4
STALE_SCENES = 150
STALE_LEASE_MS = 100  # short: a slow filler loses its lease, another one refills meanwhile


def stale_fill_child(
    role: str,
    seed: int,
    db_url: str,
    redis_url: str,
    namespace: str,
    job_id: int,
    acked: Synchronized[int],
    done: Event,
    barrier: Barrier,
    results: Queue[dict[str, Any]],
) -> None:
    """One process of the stale-fill race: the writer, or a reader that refills."""
    from shared.cache.backend import connect

    rng = random.Random(seed)
    engine, sessions = open_db(db_url)
    h = make_harness(
        lambda: connect(redis_url, socket_timeout=5.0),
        sessions,
        namespace,
        lease_ms=STALE_LEASE_MS,
        real_clock=True,
    )
    violations: list[str] = []
    reads = fills_stored = fills_refused = 0
    try:
        if role == "writer":
            barrier.wait(60)
            try:
                for version, step in enumerate(progress_steps(STALE_SCENES), start=2):
                    assert h.cache.update_progress(job_id, step) is True
                    acked.value = version
                    time.sleep(rng.random() * 0.002)
            finally:
                done.set()
        else:

            def jittery(jid: int) -> JobView | None:
                view = h.real_load(jid)
                time.sleep(rng.random() * 0.004)  # widen the window between read and fill
                return view

            h.load.side_effect = jittery
            backend = h.cache.backend
            assert backend is not None
            real_fill = backend.fill_job

            def checked_fill(jid: int, token: str, rev: str, version: int, *rest: Any) -> Any:
                nonlocal fills_stored, fills_refused
                floor = acked.value
                reply = real_fill(jid, token, rev, version, *rest)
                if isinstance(reply, Stored) and reply.stored:
                    fills_stored += 1
                    if version < floor:
                        violations.append(f"a fill stored v{version} after v{floor} was acked")
                else:
                    fills_refused += 1
                return reply

            backend.fill_job = checked_fill  # type: ignore[method-assign,assignment]
            barrier.wait(60)
            last = 0
            while not done.is_set():
                floor = acked.value
                got = h.cache.get(job_id)
                reads += 1
                assert got is not None
                version = got.view.version
                if version < floor:
                    violations.append(f"a read returned v{version} after v{floor} was acked")
                if version < last:
                    violations.append(f"reads went back from v{last} to v{version}")
                last = max(last, version)
                if rng.random() < 0.25:
                    h.cache.invalidate_job(job_id)
        results.put(
            {
                "role": role,
                "violations": violations,
                "reads": reads,
                "fills_stored": fills_stored,
                "fills_refused": fills_refused,
                "db_reads": h.load.call_count,
            }
        )
    finally:
        h.cache.close()
        engine.dispose()


def sample_cached_versions(
    client: redis.Redis, key: str, stop: threading.Event, out: dict[str, Any]
) -> None:
    """Watch the raw entry: its version may only grow (absent is fine: invalidated)."""
    last = 0
    while not stop.is_set():
        raw = client.get(key)
        if raw is not None:
            version = int(orjson.loads(raw)["version"])
            out["samples"] += 1
            if version < last:
                out["violations"].append(f"cached version went back from v{last} to v{version}")
            last = max(last, version)
        time.sleep(0.0005)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stale_fills_never_overwrite_a_newer_version_across_processes(
    seed: int,
    deployment: Callable[..., Deployment],
    redis_url: str,
    namespace: str,
    record_figures: Any,
) -> None:
    dep = deployment(redis_url=redis_url)
    job = dep.new_job(dep.new_client(), scenes_total=STALE_SCENES)
    acked = SPAWN.Value("i", 1)
    done = SPAWN.Event()
    barrier = SPAWN.Barrier(1 + STALE_READERS)
    results: Queue[dict[str, Any]] = SPAWN.Queue()
    roles = ["writer"] + ["reader"] * STALE_READERS
    children = [
        SPAWN.Process(
            target=stale_fill_child,
            args=(
                role,
                seed * 100 + i,
                dep.settings.database_url,
                redis_url,
                namespace,
                job.job_id,
                acked,
                done,
                barrier,
                results,
            ),
            name=f"{role}-{i}",
        )
        for i, role in enumerate(roles)
    ]
    client = redis.Redis.from_url(redis_url)
    sampled: dict[str, Any] = {"samples": 0, "violations": []}
    stop = threading.Event()
    sampler = threading.Thread(
        target=sample_cached_versions,
        args=(client, dep.keys.job(job.job_id), stop, sampled),
        daemon=True,
    )
    try:
        for child in children:
            child.start()
        sampler.start()
        reports = [results.get(timeout=100) for _ in children]
        join_all(children, timeout=30)
    finally:
        stop.set()
        sampler.join(5)
        for child in children:
            if child.is_alive():
                child.kill()
        client.close()

    violations = [v for r in reports for v in r["violations"]] + sampled["violations"]
    readers = [r for r in reports if r["role"] == "reader"]
    writes = len(progress_steps(STALE_SCENES))
    record_figures(
        seed=seed,
        processes=len(children),
        writes=writes,
        reads=sum(r["reads"] for r in readers),
        db_reads=sum(r["db_reads"] for r in readers),
        fills_stored=sum(r["fills_stored"] for r in readers),
        fills_refused=sum(r["fills_refused"] for r in readers),
        raw_samples=sampled["samples"],
        violations=len(violations),
    )
    assert violations == [], f"seed {seed}: {violations[:10]}"
    # Preconditions: the race was really run (many fills, many reads, the entry watched).
    assert sum(r["fills_stored"] + r["fills_refused"] for r in readers) >= 20
    assert sum(r["reads"] for r in readers) >= 100
    assert sampled["samples"] >= 50
    assert dep.db_view(job.job_id).version == writes + 1


# -- 2. stampede, through real API processes ------------------------------------------------------

STAMPEDE_READERS = 200
STAMPEDE_APIS = 3
# Longer than the test's own wait for the readers (6 s) while it holds the filler in the
# database: a waiter whose lease ran out would rightly read the DB itself, which here
# would look like a broken lease on a slow machine. Lease expiry has its own test.
STAMPEDE_LEASE_MS = 10_000
KILL_LEASE_MS = 1_500
SLACK_SECONDS = 3.0  # generous: process scheduling on a busy CI machine, never a tight bound


@contextmanager
def jobs_table_locked(url: str) -> Iterator[psycopg.Connection[Any]]:
    """Hold an ACCESS EXCLUSIVE lock on `jobs`: every DB read of a job waits until release.

    This is how the test catches a filler "mid-fill": its SELECT is stuck in PostgreSQL.
    """
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        conn.rollback()
        conn.close()


def db_queries(apis: list[procs.ServiceProcess], client: Client) -> list[float]:
    counts = []
    for api in apis:
        with ApiClient(api.base_url, client) as http:  # type: ignore[attr-defined]
            counts.append(http.metric("renderwatch_db_queries_total"))
    return counts


def batched_reads(apis: list[procs.ServiceProcess], client: Client) -> list[float]:
    counts = []
    for api in apis:
        with ApiClient(api.base_url, client) as http:  # type: ignore[attr-defined]
            counts.append(http.metric("renderwatch_cache_batched_reads_total"))
    return counts


def fire(urls: list[str], headers: dict[str, str]) -> list[tuple[int, int | None, float, float]]:
    """One GET per URL, all at once; (status, version, started, finished) for each."""

    async def one(http: httpx.AsyncClient, url: str) -> tuple[int, int | None, float, float]:
        started = time.monotonic()
        try:
            answer = await http.get(url)
        except httpx.HTTPError:
            return 0, None, started, time.monotonic()
        version = answer.json()["version"] if answer.status_code == 200 else None
        return answer.status_code, version, started, time.monotonic()

    async def run() -> list[tuple[int, int | None, float, float]]:
        limits = httpx.Limits(max_connections=len(urls) + 10)
        async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as http:
            return list(await asyncio.gather(*(one(http, url) for url in urls)))

    return asyncio.run(run())


class Firing:
    """`fire()` in a background thread."""

    def __init__(self, urls: list[str], headers: dict[str, str]) -> None:
        self.results: list[tuple[int, int | None, float, float]] = []
        self._thread = threading.Thread(target=self._run, args=(urls, headers), daemon=True)
        self._thread.start()

    def _run(self, urls: list[str], headers: dict[str, str]) -> None:
        self.results = fire(urls, headers)

    def join(self, timeout: float = 60) -> list[tuple[int, int | None, float, float]]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the requests did not finish"
        return self.results


def waiting_on_lock(url: str) -> int:
    """Backends of this database waiting for a lock (our stuck fillers)."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def start_stampede_world(
    deployment: Callable[..., Deployment], faulty_redis: FaultyRedis, lease_ms: int
) -> tuple[Deployment, Client, JobView]:
    dep = deployment(redis_url=faulty_redis.url, cache_lease_ms=lease_ms, api_key_cache_seconds=600)
    alice = dep.new_client()
    return dep, alice, dep.new_job(alice)


def authenticate_everywhere(apis: list[procs.ServiceProcess], client: Client) -> None:
    """Each API resolves the key once now, so no auth query lands in the measured window."""
    for api in apis:
        with ApiClient(api.base_url, client) as http:  # type: ignore[attr-defined]
            http.stats()


@pytest.mark.timeout(180)
def test_two_hundred_cold_polls_across_api_processes_cost_one_db_read(
    deployment: Callable[..., Deployment],
    faulty_redis: FaultyRedis,
    tmp_path: Path,
    record_figures: Any,
) -> None:
    dep, alice, job = start_stampede_world(deployment, faulty_redis, STAMPEDE_LEASE_MS)
    url = dep.settings.database_url
    with api_cluster(dep.env(), tmp_path, STAMPEDE_APIS) as apis:
        authenticate_everywhere(apis, alice)
        before = db_queries(apis, alice)
        with ApiClient(apis[0].base_url, alice) as http:  # type: ignore[attr-defined]
            counts_before = http.counts()
        evalsha_before = faulty_redis.command_calls("evalsha")
        urls = [
            f"{apis[i % STAMPEDE_APIS].base_url}/api/v2/jobs/{job.job_id}"  # type: ignore[attr-defined]
            for i in range(STAMPEDE_READERS)
        ]
        with jobs_table_locked(url) as lock:
            firing = Firing(urls, alice.headers)
            # The filler is stuck in PostgreSQL; everybody else keeps asking Redis.
            procs.wait_until(lambda: waiting_on_lock(url) >= 1, timeout=20, what="the filler")
            # ...until every reader has asked at least once (or, were the lease broken,
            # several readers are stuck in the database beside the filler).
            # Batched reads (CACHE_READ_BATCHING) carry several reads per EVALSHA: count
            # the reads the API processes sent in batches too.
            batched_before = sum(batched_reads(apis, alice))
            procs.wait_until(
                lambda: (
                    faulty_redis.command_calls("evalsha") - evalsha_before >= 3 * STAMPEDE_READERS
                    or sum(batched_reads(apis, alice)) - batched_before >= 3 * STAMPEDE_READERS
                    or waiting_on_lock(url) > 1
                ),
                timeout=6,
                what="the readers to wait on the lease",
            )
            stuck_fillers = waiting_on_lock(url)
            lock.commit()
        results = firing.join()
        after = db_queries(apis, alice)
        with ApiClient(apis[0].base_url, alice) as http:  # type: ignore[attr-defined]
            counts_after = http.counts()

    reads = sum(after) - sum(before)
    hits = counts_after["hits"] - counts_before["hits"]
    misses = counts_after["misses"] - counts_before["misses"]
    latencies = sorted(finished - started for _, _, started, finished in results)
    record_figures(
        readers=len(results),
        api_processes=STAMPEDE_APIS,
        db_reads=reads,
        db_reads_per_api=[a - b for a, b in zip(after, before, strict=True)],
        fillers_stuck_in_db=stuck_fillers,
        hits=hits,
        misses=misses,
        max_latency_s=latencies[-1],
    )
    assert [status for status, *_ in results] == [200] * STAMPEDE_READERS
    assert {version for _, version, *_ in results} == {1}
    assert stuck_fillers == 1, "more than one reader went to the database"
    assert reads == 1, f"{reads} DB reads for {STAMPEDE_READERS} concurrent cold polls"
    assert (hits, misses) == (STAMPEDE_READERS - 1, 1)


@pytest.mark.timeout(180)
def test_a_filler_killed_mid_fill_delays_the_others_no_longer_than_the_lease(
    deployment: Callable[..., Deployment],
    faulty_redis: FaultyRedis,
    tmp_path: Path,
    record_figures: Any,
) -> None:
    dep, alice, job = start_stampede_world(deployment, faulty_redis, KILL_LEASE_MS)
    url = dep.settings.database_url
    lease = KILL_LEASE_MS / 1000
    with api_cluster(dep.env(), tmp_path, STAMPEDE_APIS) as apis:
        authenticate_everywhere(apis, alice)
        before = db_queries(apis, alice)
        bases = [api.base_url for api in apis]  # type: ignore[attr-defined]
        urls = [f"{bases[i % len(bases)]}/api/v2/jobs/{job.job_id}" for i in range(60)]
        with jobs_table_locked(url) as lock:
            firing = Firing(urls, alice.headers)
            procs.wait_until(lambda: waiting_on_lock(url) >= 1, timeout=20, what="the filler")

            def the_filler() -> int | None:
                counts = db_queries(apis, alice)
                busy = [i for i, (a, b) in enumerate(zip(counts, before, strict=True)) if a > b]
                return busy[0] + 1 if len(busy) == 1 else None

            filler = procs.wait_until(the_filler, timeout=10, what="the filler's API") - 1
            apis[filler].popen.send_signal(signal.SIGKILL)
            apis[filler].popen.wait(10)
            killed_at = time.monotonic()
            lock.commit()  # the database answers again; the dead filler's lease remains
        results = firing.join()
        survivors = [
            r for r, u in zip(results, urls, strict=True) if not u.startswith(bases[filler])
        ]
        others = [i for i in range(len(apis)) if i != filler]
        after = db_queries([apis[i] for i in others], alice)
        # The key is not blocked: later polls are cache hits again.
        with ApiClient(bases[others[0]], alice) as http:
            hits = http.counts()["hits"]
            assert http.job(job.job_id).status_code == 200
            hit_again = http.counts()["hits"] == hits + 1

    waits = sorted(finished - started for _, _, started, finished in survivors)
    after_kill = sorted(finished - killed_at for _, _, _, finished in survivors)
    reads_after_kill = sum(after) - sum(before[i] for i in others)
    record_figures(
        lease_s=lease,
        survivors=len(survivors),
        max_wait_s=waits[-1],
        max_wait_after_kill_s=after_kill[-1],
        db_reads_by_survivors=reads_after_kill,
        hit_after_recovery=hit_again,
    )
    assert [status for status, *_ in survivors] == [200] * len(survivors)
    assert {version for _, version, *_ in survivors} == {1}
    assert waits[-1] <= lease + SLACK_SECONDS, "the dead filler held the others past its lease"
    assert hit_again, "the key stayed blocked after the filler died"
    # One survivor takes the lapsed lease and fills; the rest wait for it. Sending every
    # waiter to the database when a filler dies is the stampede that the lease prevents.
    assert reads_after_kill <= len(survivors) // 4, f"{reads_after_kill} DB reads after the kill"


# -- 3. fresh after write: 1,000 writes, 4 polling processes --------------------------------------

FRESH_WRITES = 1_000
FRESH_READERS = 4
POLL_INTERVAL = 0.005


def fresh_writer_child(
    env_settings: dict[str, Any],
    job_id: int,
    acked: Synchronized[int],
    done: Event,
    barrier: Barrier,
    results: Queue[dict[str, Any]],
) -> None:
    """The worker's side: report progress FRESH_WRITES times, publishing each ack."""
    from shared.settings import Settings

    runtime = Runtime.start(Settings(_env_file=None, **env_settings))
    try:
        steps = progress_steps(FRESH_WRITES - 3)
        assert len(steps) == FRESH_WRITES
        barrier.wait(60)
        started = time.monotonic()
        try:
            for version, step in enumerate(steps, start=2):
                assert update_job_progress_with_cache(job_id, step) is True
                acked.value = version
        finally:
            done.set()
        results.put({"role": "writer", "writes": len(steps), "seconds": time.monotonic() - started})
    finally:
        runtime.close()


def fresh_reader_child(
    base_url: str,
    headers: dict[str, str],
    job_id: int,
    acked: Synchronized[int],
    done: Event,
    barrier: Barrier,
    results: Queue[dict[str, Any]],
) -> None:
    """A polling client: every answer must be at least the version acked before asking."""
    violations: list[str] = []
    reads = errors = 0
    with httpx.Client(base_url=base_url, headers=headers, timeout=10) as http:
        barrier.wait(60)
        while not done.is_set():
            floor = acked.value
            answer = http.get(f"/api/v2/jobs/{job_id}")
            reads += 1
            if answer.status_code != 200:
                errors += 1
                continue
            version = int(answer.json()["version"])
            if version < floor and len(violations) < 20:
                violations.append(f"read v{version} after v{floor} was acked")
            # Paced like a real poller: unpaced, four loops starve the writer of CPU.
            time.sleep(POLL_INTERVAL)
    results.put({"role": "reader", "reads": reads, "errors": errors, "violations": violations})


@pytest.mark.timeout(180)
def test_no_poll_sees_a_version_older_than_the_last_acknowledged_write(
    deployment: Callable[..., Deployment],
    redis_url: str,
    tmp_path: Path,
    record_figures: Any,
) -> None:
    dep = deployment(redis_url=redis_url, api_key_cache_seconds=600)
    alice = dep.new_client()
    job = dep.new_job(alice, scenes_total=FRESH_WRITES - 3)
    acked = SPAWN.Value("i", 1)
    done = SPAWN.Event()
    barrier = SPAWN.Barrier(1 + FRESH_READERS)
    results: Queue[dict[str, Any]] = SPAWN.Queue()
    with dep.api(tmp_path, workers=2) as api, ApiClient(api.base_url, alice) as http:
        counts_before = http.counts()
        children = [
            SPAWN.Process(
                target=fresh_writer_child,
                args=(dep.settings.model_dump(), job.job_id, acked, done, barrier, results),
                name="writer",
            ),
            *(
                SPAWN.Process(
                    target=fresh_reader_child,
                    args=(api.base_url, alice.headers, job.job_id, acked, done, barrier, results),
                    name=f"reader-{i}",
                )
                for i in range(FRESH_READERS)
            ),
        ]
        try:
            for child in children:
                child.start()
            reports = [results.get(timeout=150) for _ in children]
            join_all(children, timeout=30)
        finally:
            for child in children:
                if child.is_alive():
                    child.kill()
        counts_after = http.counts()

    writer = next(r for r in reports if r["role"] == "writer")
    readers = [r for r in reports if r["role"] == "reader"]
    violations = [v for r in readers for v in r["violations"]]
    reads = sum(r["reads"] for r in readers)
    hits = counts_after["hits"] - counts_before["hits"]
    misses = counts_after["misses"] - counts_before["misses"]
    record_figures(
        writes=writer["writes"],
        write_seconds=writer["seconds"],
        reader_processes=FRESH_READERS,
        api_workers=2,
        polls=reads,
        poll_errors=sum(r["errors"] for r in readers),
        hits=hits,
        misses=misses,
        violations=len(violations),
    )
    assert violations == [], violations
    assert sum(r["errors"] for r in readers) == 0
    assert reads >= FRESH_WRITES, "precondition: the readers polled throughout the writes"
    assert hits > misses, "precondition: the polls were served from the cache"
    assert dep.db_view(job.job_id).version == FRESH_WRITES + 1
