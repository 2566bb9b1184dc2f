"""Scenario 12: another client's job is indistinguishable from a missing one; revocation.

One real API process with two uvicorn workers (each with its own key memory) on a
private PostgreSQL database, so that job ids 1..N are known, and the real Redis under a
private namespace. Clients A and B create jobs through the API, interleaved. B then
asks for A's jobs on a cache miss and on a cache hit, probes ids 1..50, lists, and
cancels: every answer about a job that is not B's must be byte-identical (status, body,
headers except Date) to the answer about a job that does not exist. A revoked key
must stop working within API_KEY_CACHE_SECONDS (1 s here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import Engine, select

from renderwatch import localproc
from shared.apikeys import create_api_key, revoke_api_key
from shared.cache import KeySpace
from shared.db import build_engine, build_session_factory
from shared.models import Job
from shared.settings import Settings
from tests import procs
from tests.faults.conftest import Client

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis]

KEY_CACHE_SECONDS = 1.0
# Request latency and scheduling between the revocation and the first refused request.
REVOCATION_SLACK_SECONDS = 0.5
MISSING_ID = 10**12
PROBE_IDS = range(1, 51)


@dataclass
class World:
    """The running API, its database and cache, and who owns which job."""

    base_url: str
    settings: Settings
    engine: Engine
    redis: redis.Redis
    keys: KeySpace
    log_dir: Path
    a: Client
    b: Client
    jobs_of: dict[str, list[int]] = field(default_factory=dict)

    def new_client(self, name: str) -> Client:
        return new_client(self.engine, name)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10, trust_env=False)

    def forget(self, job_id: int) -> None:
        """Drop the job's cache entry: the next read is a miss."""
        self.redis.delete(self.keys.job(job_id), self.keys.lease(job_id))

    def hits(self) -> int:
        """Global hits once every API process has flushed its counts (each flushes at least
        every CACHE_STATS_FLUSH_SECONDS, 1 s): two answers 1.5 s apart agree. Bounded."""

        def read() -> int:
            with self.http() as http:
                stats = http.get("/api/v2/cache/stats", headers=self.a.headers).json()
            return int(stats["statistics"]["hits"])

        deadline = time.monotonic() + 15
        last = read()
        while True:
            time.sleep(1.5)
            now = read()
            if now == last:
                return now
            assert time.monotonic() < deadline, "the statistics kept moving for 15 s"
            last = now

    def cancel_flags(self) -> dict[int, tuple[str, bool]]:
        with build_session_factory(self.engine)() as session:
            rows = session.execute(select(Job.id, Job.status, Job.cancel_requested))
            return {job_id: (status, flag) for job_id, status, flag in rows}


def new_client(engine: Engine, name: str) -> Client:
    """A new client id with a valid key."""
    client_id = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
    with build_session_factory(engine)() as session:
        return Client(client_id, create_api_key(client_id, session=session))


def shape(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Everything a client can observe, except the Date header."""
    headers = sorted((k.lower(), v) for k, v in response.headers.items() if k.lower() != "date")
    return response.status_code, response.content, headers


@pytest.fixture(scope="module")
def world(
    pg_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with localproc.private_database(pg_admin_url, "rw_foreign") as url:
        namespace = f"t-{uuid.uuid4().hex[:12]}"
        client = redis.Redis.from_url(redis_url)
        engine = None
        try:
            settings = Settings(
                _env_file=None,
                database_url=url,
                redis_url=redis_url,
                cache_namespace=namespace,
                celery_broker_url="memory://",  # jobs are enqueued nowhere: nothing renders
                api_key_cache_seconds=KEY_CACHE_SECONDS,
                log_level="INFO",
            )
            engine = build_engine(url, pool_size=2)
            log_dir = tmp_path_factory.mktemp("foreign")
            keys = KeySpace(
                namespace=settings.key_namespace, job_prefix=settings.job_cache_key_prefix
            )
            with procs.api_server(procs.settings_env(settings), log_dir, workers=2) as api:
                w = World(
                    api.base_url,
                    settings,
                    engine,
                    client,
                    keys,
                    log_dir,
                    a=new_client(engine, "alice"),
                    b=new_client(engine, "bob"),
                )
                w.jobs_of = {w.a.client_id: [], w.b.client_id: []}
                # Interleaved owners: A A B A A B ... so that ids of both sit side by side.
                with w.http() as http:
                    for n in range(24):
                        owner = w.b if n % 3 == 2 else w.a
                        created = http.post(
                            "/api/v2/jobs",
                            json={"prompt": f"job {n}", "scenes_total": 3},
                            headers=owner.headers,
                        )
                        assert created.status_code == 202, created.text
                        w.jobs_of[owner.client_id].append(created.json()["job_id"])
                yield w
        finally:
            if engine is not None:
                engine.dispose()
            stale = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if stale:
                client.delete(*stale)
            client.close()


def missing(world: World, http: httpx.Client, method: str = "GET", suffix: str = "") -> Any:
    """What B is told about a job that does not exist."""
    return shape(
        http.request(method, f"/api/v2/jobs/{MISSING_ID}{suffix}", headers=world.b.headers)
    )


@pytest.mark.timeout(60)
def test_a_foreign_job_answers_exactly_like_a_missing_one_on_a_miss_and_on_a_hit(
    world, record_figures
):
    job = world.jobs_of[world.a.client_id][0]
    with world.http() as http:
        expected = missing(world, http)
        assert expected[0] == 404

        world.forget(job)
        on_miss = shape(http.get(f"/api/v2/jobs/{job}", headers=world.b.headers))
        # B's miss filled the entry (the owner check comes after the read): now it is a hit.
        assert world.redis.exists(world.keys.job(job)), "the read was not a miss-and-fill"

        owner_view = http.get(f"/api/v2/jobs/{job}", headers=world.a.headers)
        assert owner_view.status_code == 200
        hits = world.hits()
        on_hit = shape(http.get(f"/api/v2/jobs/{job}", headers=world.b.headers))
        assert world.hits() == hits + 1, "B's read was not served from the cache"

        etag = owner_view.headers["etag"]
        with_etag = shape(
            http.get(f"/api/v2/jobs/{job}", headers={**world.b.headers, "If-None-Match": etag})
        )
        expected_etag = shape(
            http.get(
                f"/api/v2/jobs/{MISSING_ID}", headers={**world.b.headers, "If-None-Match": etag}
            )
        )

    assert on_miss == expected
    assert on_hit == expected
    assert with_etag == expected_etag == expected, "a matching ETag must not reveal the job"
    record_figures(
        scenario=12,
        fault="client B reads client A's job (cache miss, cache hit, matching ETag)",
        answers_compared=3,
        identical_to_missing=3,
    )


@pytest.mark.timeout(120)
def test_probing_ids_tells_a_foreign_job_from_a_missing_one_by_nothing(world, record_figures):
    own = set(world.jobs_of[world.b.client_id])
    foreign = set(world.jobs_of[world.a.client_id])
    absent = set(PROBE_IDS) - own - foreign
    assert foreign and absent and own, "the probe must cover all three kinds of id"
    before = world.cancel_flags()
    probes = 0
    with world.http() as http:
        expected_get = missing(world, http)
        expected_cancel = missing(world, http, "POST", "/cancel")
        assert expected_cancel[0] == 404
        # Pass 1: nothing cached. Pass 2: the owner has just read every job (all hits).
        for job in foreign:
            world.forget(job)
        for cached in (False, True):
            if cached:
                for job in foreign:
                    assert (
                        http.get(f"/api/v2/jobs/{job}", headers=world.a.headers).status_code == 200
                    )
            for job_id in PROBE_IDS:
                answer = http.get(f"/api/v2/jobs/{job_id}", headers=world.b.headers)
                cancel = http.post(f"/api/v2/jobs/{job_id}/cancel", headers=world.b.headers)
                probes += 2
                if job_id in own:
                    assert answer.status_code == 200
                    assert answer.json()["client_id"] == world.b.client_id
                    assert cancel.status_code in (202, 409)
                    continue
                kind = "foreign" if job_id in foreign else "absent"
                assert shape(answer) == expected_get, f"GET of a {kind} id {job_id} differs"
                assert shape(cancel) == expected_cancel, f"cancel of a {kind} id {job_id} differs"

    after = world.cancel_flags()
    for job in foreign:
        assert after[job] == before[job], f"B's cancel touched A's job {job}"
    record_figures(
        scenario=12,
        fault="client B probes ids 1..50 (GET and cancel, cache cold then warm)",
        probes=probes,
        foreign_ids=len(foreign),
        absent_ids=len(absent),
        distinguishable=0,
        foreign_jobs_changed=0,
    )


@pytest.mark.timeout(60)
def test_the_list_holds_only_the_callers_jobs_on_every_page_cached_or_not(world):
    def pages(client: Client, http: httpx.Client) -> list[int]:
        ids: list[int] = []
        offset: int | None = 0
        while offset is not None:
            page = http.get(f"/api/v2/jobs?limit=2&offset={offset}", headers=client.headers)
            assert page.status_code == 200, page.text
            body = page.json()
            assert {item["client_id"] for item in body["items"]} <= {client.client_id}
            ids += [item["job_id"] for item in body["items"]]
            offset = body["next_offset"]
        return ids

    with world.http() as http:
        for _ in range(2):  # a miss (filled), then a hit
            for client in (world.a, world.b):
                assert pages(client, http) == sorted(world.jobs_of[client.client_id], reverse=True)
        # A new job of A's: B's list (cached) must not change, A's must show it.
        created = http.post(
            "/api/v2/jobs", json={"prompt": "late", "scenes_total": 1}, headers=world.a.headers
        )
        assert created.status_code == 202
        world.jobs_of[world.a.client_id].append(created.json()["job_id"])
        assert pages(world.b, http) == sorted(world.jobs_of[world.b.client_id], reverse=True)
        assert pages(world.a, http) == sorted(world.jobs_of[world.a.client_id], reverse=True)


@pytest.mark.timeout(60)
def test_a_revoked_key_stops_working_within_api_key_cache_seconds(world, record_figures):
    carol = world.new_client("carol")
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            started = time.monotonic()
            # A fresh connection each time, so that both API worker processes answer.
            with world.http() as http:
                status = http.get("/api/v2/jobs?limit=1", headers=carol.headers).status_code
            answers.append((started, status))

    pollers = [threading.Thread(target=poll) for _ in range(2)]
    for thread in pollers:
        thread.start()
    try:
        procs.wait_until(lambda: len(answers) >= 20, timeout=20, what="a warm key")
        with build_session_factory(world.engine)() as session:
            assert revoke_api_key(carol.key, session=session)
        revoked_at = time.monotonic()
        time.sleep(KEY_CACHE_SECONDS + REVOCATION_SLACK_SECONDS + 1.0)
    finally:
        stop.set()
        for thread in pollers:
            thread.join(15)

    before = [s for t, s in answers if t < revoked_at]
    after = [(t - revoked_at, s) for t, s in answers if t >= revoked_at]
    accepted = [t for t, s in after if s == 200]
    late = [s for t, s in after if t > KEY_CACHE_SECONDS + REVOCATION_SLACK_SECONDS]
    record_figures(
        scenario=12,
        fault="key revoked while in use (API_KEY_CACHE_SECONDS=1, 2 API workers)",
        requests_after_revoke=len(after),
        accepted_after_revoke=len(accepted),
        last_accepted_s=max(accepted, default=0.0),
        bound_s=KEY_CACHE_SECONDS,
    )
    assert set(before) == {200}
    assert {s for _, s in after} <= {200, 401}
    # Requests that started more than the bound (+ slack) after the revocation are refused.
    assert max(accepted, default=0.0) <= KEY_CACHE_SECONDS + REVOCATION_SLACK_SECONDS
    assert len(late) >= 10 and set(late) == {401}


@pytest.mark.timeout(60)
def test_renderwatch_revoke_key_refuses_the_key_and_never_echoes_it(world):
    dave = world.new_client("dave")
    with world.http() as http:
        assert http.get("/api/v2/jobs", headers=dave.headers).status_code == 200
    env = {**os.environ, **procs.settings_env(world.settings)}
    revoke = subprocess.run(
        [sys.executable, "-m", "renderwatch.cli", "revoke-key", dave.key],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert revoke.returncode == 0, revoke.stderr
    assert "API_KEY_CACHE_SECONDS (1 s)" in revoke.stdout
    assert dave.key not in revoke.stdout + revoke.stderr, "the CLI must not echo the key"
    time.sleep(KEY_CACHE_SECONDS + REVOCATION_SLACK_SECONDS)
    with world.http() as http:
        answers = [http.get("/api/v2/jobs", headers=dave.headers) for _ in range(6)]
    assert [a.status_code for a in answers] == [401] * 6
    assert answers[0].json() == {"detail": "missing or invalid API key"}
