"""Issue 3, scenario 11: values planted directly in Redis, at the keys the API reads.

Corrupted, truncated, wrong-schema, wrong-type (a hash at a string key), forged
(well-formed, right owner, fake progress) and foreign values (another client's, another
job's) are written straight into Redis by the test, as a bug, another deployment or an
intruder with access to Redis could. Then a real API process (`python -m api`) is
polled. Each planted value must be:

- treated as a miss: the answer is the database's row (200 for the owner, the same 404
  as a missing job for anybody else), never a 500;
- removed: afterwards the key holds the database's row (refilled), never the plant;
- counted as an error in the statistics (hits unchanged, one miss);
- never served, to anybody: not even to the client a foreign value names.

A well-formed plant cannot be told from a real entry by its shape: the cache seals
each value with a keyed MAC bound to its key (`shared.cache.seal`), so only values the
cache itself wrote are served.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis

from shared.schemas import JobView
from shared.settings import Settings
from tests import procs
from tests.cache_helpers import wait_until
from tests.faults.conftest import ApiClient, Client, Deployment

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(120)]

PAGE = "20:0"  # the list page of GET /api/v2/jobs with the default limit and offset


@dataclass
class World:
    """One real API process on the real Redis (private namespace) and PostgreSQL."""

    dep: Deployment
    api: procs.ServiceProcess
    redis: redis.Redis
    alice: Client
    mallory: Client
    owner: ApiClient
    stranger: ApiClient

    def job_key(self, job_id: int) -> str:
        return self.dep.keys.job(job_id)

    def list_key(self, client: Client) -> str:
        return self.dep.keys.jobs(client.client_id)

    def counts(self) -> dict[str, Any]:
        return self.owner.counts()

    def db_json(self, job_id: int) -> dict[str, Any]:
        body: dict[str, Any] = self.dep.db_view(job_id).model_dump(mode="json")
        return body


@pytest.fixture(scope="module")
def world(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    namespace = f"t-planted-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        _env_file=None,
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_broker_url="memory://",
        api_key_cache_seconds=600,
        log_level="INFO",
    )
    from shared.db import build_engine, build_session_factory

    engine = build_engine(pg_url, pool_size=2)
    dep = Deployment(settings, engine, build_session_factory(engine))
    client = redis.Redis.from_url(redis_url)
    alice, mallory = dep.new_client("alice"), dep.new_client("mallory")
    try:
        with (
            dep.api(tmp_path_factory.mktemp("planted")) as api,
            ApiClient(api.base_url, alice) as owner,
            ApiClient(api.base_url, mallory) as other,
        ):
            yield World(dep, api, client, alice, mallory, owner, other)
    finally:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        engine.dispose()


# -- the plants -----------------------------------------------------------------------------------

Plant = Callable[[World, str, JobView, JobView], object]


def _set(value: Callable[[World, JobView, JobView], bytes]) -> Plant:
    def plant(w: World, key: str, job: JobView, other: JobView) -> None:
        w.redis.set(key, value(w, job, other), ex=300)

    return plant


def _doc(job: JobView, **changes: Any) -> bytes:
    return orjson.dumps({**job.model_dump(mode="json"), **changes})


def _forged_done(w: World, job: JobView, other: JobView) -> bytes:
    progress = {**job.progress.model_dump(mode="json"), "current_stage": "done", "percent": 100.0}
    return _doc(
        job, status="succeeded", progress=progress, version=99, result_url="https://x.invalid"
    )


JOB_PLANTS: dict[str, Plant] = {
    "garbage": _set(lambda w, job, other: b"\x80\x81\xfe\xff not json at all"),
    "empty": _set(lambda w, job, other: b""),
    "truncated": _set(lambda w, job, other: job.to_json()[:-9]),
    "wrong-schema": _set(lambda w, job, other: orjson.dumps({"job_id": job.job_id, "version": 99})),
    "wrong-field-type": _set(lambda w, job, other: _doc(job, version="seven")),
    "unknown-status": _set(lambda w, job, other: _doc(job, status="exploded")),
    "extra-key": _set(lambda w, job, other: _doc(job, admin=True)),
    "json-list": _set(lambda w, job, other: b"[1, 2, 3]"),
    "pickle": _set(lambda w, job, other: pickle.dumps(job.model_dump(mode="json"))),
    "hash-at-string-key": lambda w, key, job, other: w.redis.hset(key, "version", 99),
    "list-at-string-key": lambda w, key, job, other: w.redis.rpush(key, b"x"),
    "another-job": _set(lambda w, job, other: other.to_json()),
    "foreign-owner": _set(lambda w, job, other: _doc(job, client_id=w.mallory.client_id)),
    "foreign-owner-newer": _set(
        lambda w, job, other: _doc(job, client_id=w.mallory.client_id, version=99)
    ),
    "forged-progress": _set(_forged_done),
}


@pytest.mark.parametrize("first_reader", ["owner", "stranger"])
@pytest.mark.parametrize("case", list(JOB_PLANTS))
def test_a_planted_job_value_is_a_miss_removed_counted_and_never_served(
    world: World, case: str, first_reader: str, record_figures: Any
) -> None:
    w = world
    job, other = w.dep.new_job(w.alice), w.dep.new_job(w.alice)
    key = w.job_key(job.job_id)
    missing = w.stranger.job(2**62)
    assert missing.status_code == 404
    JOB_PLANTS[case](w, key, job, other)
    planted = w.redis.type(key), w.redis.get(key) if w.redis.type(key) == b"string" else None
    before = w.counts()

    if first_reader == "stranger":
        foreign = w.stranger.job(job.job_id)
        assert (foreign.status_code, foreign.content) == (404, missing.content), (
            f"{case}: another client's job must answer exactly like a missing one"
        )
    answer = w.owner.job(job.job_id)
    assert answer.status_code == 200, f"{case}: {answer.status_code} {answer.text}"
    assert answer.json() == w.db_json(job.job_id), f"{case}: the plant was served"
    after = w.counts()
    stored = w.redis.get(key) if w.redis.type(key) == b"string" else None
    again = w.owner.job(job.job_id)
    final = w.counts()
    foreign_after = w.stranger.job(job.job_id)

    record_figures(
        case=case,
        first_reader=first_reader,
        errors=after["errors"] - before["errors"],
        hits=after["hits"] - before["hits"],
        misses=after["misses"] - before["misses"],
        refilled=stored == answer.content,
    )
    assert (after["errors"] - before["errors"]) == 1, f"{case}: not counted as one error"
    # Reads before the refill were misses; the owner's read after it is the refill's hit.
    expected_hits = 1 if first_reader == "stranger" else 0
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (
        expected_hits,
        1,
    ), f"{case}: a planted value must count as a miss"
    assert stored is not None and stored != planted[1], f"{case}: the plant was not removed"
    assert orjson.loads(stored) == w.db_json(job.job_id), f"{case}: not refilled from the DB"
    assert again.status_code == 200 and again.content == answer.content
    assert final["hits"] == after["hits"] + 1, f"{case}: the refilled entry is not served"
    assert (foreign_after.status_code, foreign_after.content) == (404, missing.content)


# -- plants in a client's cached job list ---------------------------------------------------------

LIST_PLANTS: dict[str, Callable[[World, str], Any]] = {
    "string-at-hash-key": lambda w, key: w.redis.set(key, b"not a hash", ex=300),
    "garbage-page": lambda w, key: w.redis.hset(key, mapping={"_epoch": "e1", PAGE: b"\xff{"}),
    "foreign-page": lambda w, key: w.redis.hset(
        key,
        mapping={
            "_epoch": "e1",
            PAGE: orjson.dumps(
                {
                    "items": [w.dep.new_job(w.mallory).model_dump(mode="json")],
                    "limit": 20,
                    "offset": 0,
                    "next_offset": None,
                }
            ),
        },
    ),
}


@pytest.mark.parametrize("case", list(LIST_PLANTS))
def test_a_planted_list_page_is_a_miss_and_never_lists_foreign_jobs(
    world: World, case: str, record_figures: Any
) -> None:
    w = world
    mine = [w.dep.new_job(w.alice).job_id for _ in range(2)]
    key = w.list_key(w.alice)
    w.redis.delete(key)  # the jobs above were made in the DB directly: drop the old pages
    first = w.owner.http.get("/api/v2/jobs")
    assert first.status_code == 200
    w.redis.delete(key)
    LIST_PLANTS[case](w, key)
    before = w.counts()
    answer = w.owner.http.get("/api/v2/jobs")
    after = w.counts()
    # A page read after a wrong-type drop is filled by the next read: two reads later,
    # the page must be served from the cache again.
    again = [w.owner.http.get("/api/v2/jobs") for _ in range(2)]
    final = w.counts()

    listed = (
        [item["job_id"] for item in answer.json()["items"]] if answer.status_code == 200 else []
    )
    owners = {item["client_id"] for item in answer.json()["items"]} if listed else set()
    record_figures(
        case=case,
        errors=after["errors"] - before["errors"],
        misses=after["misses"] - before["misses"],
        listed=len(listed),
    )
    assert answer.status_code == 200, f"{case}: {answer.status_code} {answer.text}"
    assert owners == {w.alice.client_id}, f"{case}: listed another client's job"
    assert set(mine) <= set(listed)
    assert answer.content == first.content, f"{case}: not the database's page"
    assert after["errors"] - before["errors"] == 1, f"{case}: not counted as one error"
    assert after["misses"] - before["misses"] == 1
    assert [a.content for a in again] == [answer.content] * 2
    assert final["hits"] > after["hits"], f"{case}: the refilled page is not served"


@pytest.mark.parametrize("where", ["stats", "seal"])
def test_a_foreign_value_beside_the_entry_does_not_stall_polls(
    world: World, where: str, record_figures: Any
) -> None:
    """A wrong type beside the entry is dropped: at the seal by the read that meets it, at
    the statistics hash (which reads no longer touch) by the next statistics flush."""
    w = world
    job = w.dep.new_job(w.alice)
    assert w.owner.job(job.job_id).status_code == 200  # cached, sealed
    key = w.dep.keys.stats() if where == "stats" else w.dep.keys.seal(job.job_id)
    kept = w.redis.dump(key)
    w.redis.delete(key)
    w.redis.rpush(key, b"not ours")
    try:
        started = time.monotonic()
        answers = [w.owner.job(job.job_id) for _ in range(3)]
        elapsed = time.monotonic() - started
        # Statistics are flushed at least every CACHE_STATS_FLUSH_SECONDS (1 s): bounded.
        removed = wait_until(lambda: w.redis.type(key) != b"list", 10 if where == "stats" else 0)
    finally:
        if where == "stats":  # later tests count on the statistics: put them back
            w.redis.delete(key)
            if kept is not None:
                w.redis.restore(key, 0, kept)
    record_figures(where=where, polls=len(answers), seconds=elapsed)
    assert [a.status_code for a in answers] == [200] * 3
    assert all(a.json() == w.db_json(job.job_id) for a in answers)
    assert removed, "the foreign value was not removed"
    # Each poll found its answer without waiting out a lease (0.5 s by default).
    assert elapsed < 3 * 0.5, f"polls stalled on the foreign value ({elapsed:.2f}s for 3)"


def test_no_request_of_this_module_was_answered_5xx(world: World) -> None:
    text = world.owner.http.get("/metrics").text
    server_errors = [
        line
        for line in text.splitlines()
        if line.startswith("renderwatch_http_requests_total{") and 'status="5' in line
    ]
    assert server_errors == []
    assert world.api.alive()
    assert "Traceback" not in world.api.log()
