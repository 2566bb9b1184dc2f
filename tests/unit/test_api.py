"""The HTTP API on SQLite and fakeredis, through FastAPI's TestClient (lifespan included).

`enqueue` is a recorder: it checks, at the moment it is called, that the job row is
already committed (read through a separate engine), and returns a fake task id.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select
from starlette.exceptions import StarletteDeprecationWarning

from api.app import MAX_BODY_BYTES, create_app
from api.errors import QueueUnavailable
from api.routes import etag_matches
from shared import jobs
from shared.apikeys import create_api_key, revoke_api_key
from shared.cache import KeySpace, update_job_progress_with_cache
from shared.models import CacheStatsSnapshot, Job, utcnow

with warnings.catch_warnings():
    # Starlette asks for `httpx2` (not in the lock yet); the plain httpx client works the same.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

ALICE = "alice@example.com"
BOB = "bob@example.com"
STATS_KEYS = {
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


def count_rows(url: str, model: Any = Job) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        engine.dispose()


def committed_row(url: str, job_id: int) -> dict[str, Any] | None:
    """The job row as another connection sees it (only committed data)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Job).where(Job.id == job_id)).mappings().first()
            return dict(row) if row is not None else None
    finally:
        engine.dispose()


def job_row(url: str, job_id: int) -> dict[str, Any]:
    row = committed_row(url, job_id)
    assert row is not None, f"job {job_id} has no committed row"
    return row


@dataclass
class Recorder:
    """An enqueue function that records calls and what the DB held at that moment."""

    url: str
    calls: list[int] = field(default_factory=list)
    committed: list[bool] = field(default_factory=list)
    error: BaseException | None = None

    def __call__(self, job_id: int) -> str:
        self.calls.append(job_id)
        row = committed_row(self.url, job_id)
        self.committed.append(row is not None and row["status"] == "queued")
        if self.error is not None:
            raise self.error
        return f"task-{job_id}"


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    url: str
    recorder: Recorder
    fake_redis: Any

    @property
    def runtime(self) -> Any:
        return self.app.state.services.runtime

    def key(self, client_id: str) -> str:
        with self.runtime.sessions() as session:
            return create_api_key(client_id, session=session)

    def create(self, key: str, prompt: str = "a cat", scenes: int = 3) -> int:
        r = self.client.post(
            "/api/v2/jobs", json={"prompt": prompt, "scenes_total": scenes}, headers=auth(key)
        )
        assert r.status_code == 202, r.text
        return int(r.json()["job_id"])

    def job_key(self, job_id: int) -> str:
        # The runtime's keys: without CACHE_NAMESPACE the namespace comes from the database.
        keys: KeySpace = self.runtime.cache.keys
        return keys.job(job_id)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def recorder(sqlite_url):
    return Recorder(sqlite_url)


@pytest.fixture
def api(make_settings, sqlite_url, fake_redis, recorder):
    settings = make_settings(database_url=sqlite_url, redis_url="redis://fake.invalid:6379/0")
    app = create_app(settings, enqueue=recorder, redis_client=fake_redis)
    with TestClient(app) as client:
        yield Api(app, client, sqlite_url, recorder, fake_redis)


@pytest.fixture
def alice(api):
    return api.key(ALICE)


@pytest.fixture
def bob(api):
    return api.key(BOB)


# -- create ---------------------------------------------------------------------------------


def test_create_answers_202_with_location_after_committing_the_row(api, alice):
    r = api.client.post(
        "/api/v2/jobs",
        json={"prompt": "a cat on a skateboard", "scenes_total": 5},
        headers=auth(alice),
    )

    assert r.status_code == 202
    job_id = r.json()["job_id"]
    assert r.json() == {
        "job_id": job_id,
        "status": "queued",
        "status_url": f"/api/v2/jobs/{job_id}",
    }
    assert r.headers["location"] == f"/api/v2/jobs/{job_id}"
    assert api.recorder.calls == [job_id]
    assert api.recorder.committed == [True], "the row must be committed before enqueue"
    row = committed_row(api.url, job_id)
    assert row is not None
    assert row["celery_task_id"] == f"task-{job_id}"
    assert row["client_id"] == ALICE
    assert row["prompt"] == "a cat on a skateboard"
    assert row["scenes_total"] == 5


def test_create_logs_one_info_line_without_the_key(api, alice, caplog):
    with caplog.at_level(logging.DEBUG):
        job_id = api.create(alice)

    lines = [r for r in caplog.records if r.name.startswith("api") and r.levelno == logging.INFO]
    assert [r.getMessage() for r in lines] == [f"created job {job_id} for client {ALICE}"]
    assert all(alice not in r.getMessage() for r in caplog.records)


def test_enqueue_failure_answers_503_and_marks_the_job_failed(api, alice):
    api.recorder.error = QueueUnavailable("broker down")
    before = count_rows(api.url)

    r = api.client.post(
        "/api/v2/jobs", json={"prompt": "x", "scenes_total": 1}, headers=auth(alice)
    )

    assert r.status_code == 503
    assert "job queue unavailable" in r.json()["detail"]
    assert count_rows(api.url) == before + 1, "the job is kept, not lost"
    job_id = api.recorder.calls[0]
    assert str(job_id) in r.json()["detail"]
    row = committed_row(api.url, job_id)
    assert row is not None
    assert row["status"] == "failed"
    assert row["error"] == "could not enqueue: job queue unavailable"
    polled = api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice))
    assert polled.json()["status"] == "failed", "the cache serves the failed version"


def test_enqueue_oserror_is_a_503_too(api, alice):
    api.recorder.error = ConnectionRefusedError("refused")

    r = api.client.post(
        "/api/v2/jobs", json={"prompt": "x", "scenes_total": 1}, headers=auth(alice)
    )

    assert r.status_code == 503
    assert job_row(api.url, api.recorder.calls[0])["status"] == "failed"


def test_unexpected_enqueue_error_still_marks_the_job_failed(make_settings, sqlite_url, fake_redis):
    recorder = Recorder(sqlite_url, error=RuntimeError("bug"))
    settings = make_settings(database_url=sqlite_url, redis_url="redis://fake.invalid:6379/0")
    app = create_app(settings, enqueue=recorder, redis_client=fake_redis)
    with TestClient(app, raise_server_exceptions=False) as client:
        with app.state.services.runtime.sessions() as session:
            key = create_api_key(ALICE, session=session)
        r = client.post("/api/v2/jobs", json={"prompt": "x", "scenes_total": 1}, headers=auth(key))

    assert r.status_code == 500
    row = job_row(sqlite_url, recorder.calls[0])
    assert row["status"] == "failed"
    assert row["error"] == "could not enqueue: internal error"


@pytest.mark.timeout(60)
def test_real_celery_producer_with_the_broker_down_answers_503(
    make_settings, sqlite_url, fake_redis
):
    settings = make_settings(
        database_url=sqlite_url,
        redis_url="redis://fake.invalid:6379/0",
        celery_broker_url="redis://127.0.0.1:1/0",
    )
    app = create_app(settings, redis_client=fake_redis)
    with TestClient(app) as client:
        with app.state.services.runtime.sessions() as session:
            key = create_api_key(ALICE, session=session)
        r = client.post("/api/v2/jobs", json={"prompt": "x", "scenes_total": 1}, headers=auth(key))
        listed = client.get("/api/v2/jobs", headers=auth(key)).json()["items"]

    assert r.status_code == 503
    assert [job["status"] for job in listed] == ["failed"]
    assert listed[0]["error"] == "could not enqueue: job queue unavailable"


# -- get ------------------------------------------------------------------------------------


def test_get_serves_the_cached_bytes_with_etag(api, alice):
    job_id = api.create(alice, scenes=4)

    r = api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice))

    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["etag"] == '"1"'
    assert r.headers["cache-control"] == "no-cache"
    body = r.json()
    assert body["job_id"] == job_id
    assert body["client_id"] == ALICE
    assert body["status"] == "queued"
    assert body["version"] == 1
    assert body["progress"] == {
        "current_stage": "queued",
        "scenes_completed": 0,
        "scenes_total": 4,
        "percent": 0.0,
        "eta_seconds": None,
    }
    assert r.headers["x-poll-interval"] == "2"  # a job still moving: the pace to poll at
    assert set(body) == {
        "job_id",
        "client_id",
        "status",
        "progress",
        "version",
        "error",
        "result_url",
        "created_at",
        "updated_at",
    }
    assert r.content == api.fake_redis.get(api.job_key(job_id)), "bytes passed through as cached"


@pytest.mark.parametrize("header", ['"1"', 'W/"1"', '"7", "1"', "*", ' "0" ,W/"1" '])
def test_if_none_match_on_the_current_version_is_304(api, alice, header):
    job_id = api.create(alice)

    r = api.client.get(f"/api/v2/jobs/{job_id}", headers={**auth(alice), "If-None-Match": header})

    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == '"1"'


def test_a_new_version_changes_the_etag(api, alice):
    job_id = api.create(alice)
    assert update_job_progress_with_cache(job_id, {"current_stage": "scripting"})

    stale = api.client.get(
        f"/api/v2/jobs/{job_id}", headers={**auth(alice), "If-None-Match": '"1"'}
    )
    fresh = api.client.get(
        f"/api/v2/jobs/{job_id}", headers={**auth(alice), "If-None-Match": '"2"'}
    )

    assert stale.status_code == 200
    assert stale.headers["etag"] == '"2"'
    assert stale.json()["progress"]["current_stage"] == "scripting"
    assert fresh.status_code == 304


def test_unknown_job_is_404(api, alice):
    r = api.client.get("/api/v2/jobs/999999", headers=auth(alice))

    assert r.status_code == 404
    assert r.json() == {"detail": "job not found"}


def test_foreign_job_answers_like_a_missing_one_on_miss_and_on_hit(api, alice, bob):
    job_id = api.create(alice)
    missing = api.client.get("/api/v2/jobs/999999", headers=auth(bob))
    api.runtime.cache.invalidate_job(job_id)

    on_miss = api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(bob))
    assert api.fake_redis.exists(api.job_key(job_id)), "the miss filled the cache"
    hits_before = api.runtime.cache.stats()["statistics"]["hits"]
    on_hit = api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(bob))
    hits_after = api.runtime.cache.stats()["statistics"]["hits"]

    assert hits_after == hits_before + 1, "the second read was served from the cache"
    for r in (on_miss, on_hit):
        assert r.status_code == 404
        assert r.content == missing.content
        assert r.headers.get("etag") is None
    assert api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)).status_code == 200


@pytest.mark.parametrize("bad", ["abc", "0", "-1", str(2**63), "1" * 30, "1.5", "%20"])
def test_malformed_job_ids_are_422_naming_the_id(api, alice, bad):
    before = api.runtime.cache.stats()["statistics"]["total_requests"]

    r = api.client.get(f"/api/v2/jobs/{bad}", headers=auth(alice))

    assert r.status_code == 422
    assert ["path", "job_id"] in [error["loc"] for error in r.json()["detail"]]
    assert api.runtime.cache.stats()["statistics"]["total_requests"] == before


def test_largest_job_id_is_accepted_and_simply_not_found(api, alice):
    r = api.client.get(f"/api/v2/jobs/{2**63 - 1}", headers=auth(alice))

    assert r.status_code == 404


def test_corrupted_cache_entries_are_served_from_the_database(api, alice):
    job_id = api.create(alice)
    key = api.job_key(job_id)
    expected = orjson.loads(api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)).content)
    errors_before = api.runtime.cache.stats()["statistics"]["errors"]

    served = []
    for corrupt in (
        b"{not json",
        b'{"job_id": 1}',
        orjson.dumps({**expected, "job_id": job_id + 1}),
    ):
        api.fake_redis.set(key, corrupt)
        served.append(api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)))
    api.fake_redis.delete(key)
    api.fake_redis.hset(key, "wrong", "type")
    served.append(api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)))

    for r in served:
        assert r.status_code == 200
        assert r.json() == expected
    assert api.runtime.cache.stats()["statistics"]["errors"] == errors_before + len(served)


# -- list -----------------------------------------------------------------------------------


def test_list_is_newest_first_paginated_and_only_the_callers(api, alice, bob):
    first, second, third = (api.create(alice, prompt=p) for p in ("one", "two", "three"))
    theirs = api.create(bob)

    page1 = api.client.get("/api/v2/jobs?limit=2", headers=auth(alice)).json()
    page2 = api.client.get("/api/v2/jobs?limit=2&offset=2", headers=auth(alice)).json()
    everything = api.client.get("/api/v2/jobs", headers=auth(alice)).json()
    bobs = api.client.get("/api/v2/jobs", headers=auth(bob)).json()

    assert [job["job_id"] for job in page1["items"]] == [third, second]
    assert (page1["limit"], page1["offset"], page1["next_offset"]) == (2, 0, 2)
    assert [job["job_id"] for job in page2["items"]] == [first]
    assert page2["next_offset"] is None
    assert [job["job_id"] for job in everything["items"]] == [third, second, first]
    assert (everything["limit"], everything["offset"]) == (20, 0)
    assert {job["client_id"] for job in everything["items"]} == {ALICE}
    assert [job["job_id"] for job in bobs["items"]] == [theirs]


def test_list_shows_new_jobs_and_new_versions_at_once(api, alice):
    def listed():
        r = api.client.get("/api/v2/jobs", headers=auth(alice))
        return [(job["job_id"], job["version"]) for job in r.json()["items"]]

    first = api.create(alice)
    assert listed() == [(first, 1)]
    hits = api.runtime.cache.stats()["statistics"]["hits"]
    assert listed() == [(first, 1)]
    assert api.runtime.cache.stats()["statistics"]["hits"] == hits + 1, "the list is cached"

    second = api.create(alice)
    after_create = listed()
    assert update_job_progress_with_cache(first, {"current_stage": "scripting"})
    after_update = listed()

    assert after_create == [(second, 1), (first, 1)]
    assert after_update == [(second, 1), (first, 2)]


@pytest.mark.parametrize(
    ("query", "name"),
    [("limit=0", "limit"), ("limit=101", "limit"), ("offset=-1", "offset"), ("limit=x", "limit")],
)
def test_list_bounds_are_422(api, alice, query, name):
    r = api.client.get(f"/api/v2/jobs?{query}", headers=auth(alice))

    assert r.status_code == 422
    assert ["query", name] in [error["loc"] for error in r.json()["detail"]]


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_a_queued_job_cancels_it(api, alice):
    job_id = api.create(alice)

    r = api.client.post(f"/api/v2/jobs/{job_id}/cancel", headers=auth(alice))

    assert r.status_code == 202
    assert r.json() == {"job_id": job_id, "status": "cancelled", "cancel_requested": True}
    polled = api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)).json()
    assert polled["status"] == "cancelled"
    assert job_row(api.url, job_id)["cancel_requested"] is True


def test_cancel_a_running_job_asks_the_worker_to_stop(api, alice):
    job_id = api.create(alice)
    assert update_job_progress_with_cache(job_id, {"current_stage": "rendering"})

    r = api.client.post(f"/api/v2/jobs/{job_id}/cancel", headers=auth(alice))

    assert r.status_code == 202
    assert r.json() == {"job_id": job_id, "status": "running", "cancel_requested": True}
    with api.runtime.sessions() as session:
        assert jobs.is_cancel_requested(job_id, session=session)
    assert (
        api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)).json()["status"] == "running"
    )


@pytest.mark.parametrize(
    ("update", "status"),
    [
        ({"current_stage": "done"}, "succeeded"),
        ({"status": "failed", "error": "boom"}, "failed"),
        ({"status": "cancelled"}, "cancelled"),
    ],
)
def test_cancel_a_finished_job_is_409_naming_the_status(api, alice, update, status):
    job_id = api.create(alice)
    assert update_job_progress_with_cache(job_id, update)

    r = api.client.post(f"/api/v2/jobs/{job_id}/cancel", headers=auth(alice))

    assert r.status_code == 409
    assert status in r.json()["detail"]
    assert job_row(api.url, job_id)["cancel_requested"] is False


def test_cancel_someone_elses_or_a_missing_job_is_404(api, alice, bob):
    job_id = api.create(alice)

    foreign = api.client.post(f"/api/v2/jobs/{job_id}/cancel", headers=auth(bob))
    missing = api.client.post("/api/v2/jobs/999999/cancel", headers=auth(bob))

    assert foreign.status_code == missing.status_code == 404
    assert foreign.json() == missing.json() == {"detail": "job not found"}
    assert job_row(api.url, job_id)["status"] == "queued"


# -- statistics -------------------------------------------------------------------------------


def test_stats_is_exactly_the_cache_statistics_and_counts_every_poll(api, alice, bob):
    job_id = api.create(alice)
    api.runtime.cache.invalidate_job(job_id)
    polls = [
        (f"/api/v2/jobs/{job_id}", alice),  # miss, fills
        (f"/api/v2/jobs/{job_id}", alice),  # hit
        (f"/api/v2/jobs/{job_id}", bob),  # hit, foreign → 404
        ("/api/v2/jobs/424242", alice),  # miss, missing → 404
    ]
    for path, key in polls:
        api.client.get(path, headers=auth(key))
    api.client.get(f"/api/v2/jobs/{job_id}", headers={**auth(alice), "If-None-Match": '"1"'})

    r = api.client.get("/api/v2/cache/stats", headers=auth(bob))

    assert r.status_code == 200
    body = r.json()
    assert body == api.runtime.cache.stats()
    assert set(body) == {"cache_enabled", "statistics", "message"}
    assert set(body["statistics"]) == STATS_KEYS
    stats = body["statistics"]
    assert stats["hits"] + stats["misses"] == stats["total_requests"] == len(polls) + 1
    assert (stats["hits"], stats["misses"]) == (3, 2)
    assert stats["hit_rate"] == 60.0
    assert stats["redis_available"] is True
    assert body["cache_enabled"] is True
    assert body["message"] == "Cache is working normally"


def test_stats_history_is_newest_first(api, alice):
    with api.runtime.sessions() as session:
        for slot in (5, 7, 6):
            session.add(
                CacheStatsSnapshot(
                    slot=slot,
                    taken_at=utcnow(),
                    hits=slot,
                    misses=1,
                    errors=0,
                    invalidations=0,
                    total_requests=slot + 1,
                    hit_rate=50.0,
                    redis_available=True,
                )
            )
        session.commit()

    full = api.client.get("/api/v2/cache/stats/history", headers=auth(alice))
    short = api.client.get("/api/v2/cache/stats/history?limit=2", headers=auth(alice))

    assert full.status_code == 200
    assert [item["hits"] for item in full.json()["items"]] == [7, 6, 5]
    assert set(full.json()["items"][0]) == {
        "taken_at",
        "hits",
        "misses",
        "errors",
        "invalidations",
        "total_requests",
        "hit_rate",
        "redis_available",
    }
    assert [item["hits"] for item in short.json()["items"]] == [7, 6]
    assert (
        api.client.get("/api/v2/cache/stats/history?limit=0", headers=auth(alice)).status_code
        == 422
    )


# -- auth -----------------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/api/v2/jobs"),
    ("GET", "/api/v2/jobs"),
    ("GET", "/api/v2/jobs/1"),
    ("POST", "/api/v2/jobs/1/cancel"),
    ("GET", "/api/v2/cache/stats"),
    ("GET", "/api/v2/cache/stats/history"),
]


def assert_401(r):
    assert r.status_code == 401
    assert r.json() == {"detail": "missing or invalid API key"}
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer rw_not-a-key"},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + "x" * 5000},
        {"Authorization": ""},
    ],
    ids=["missing", "unknown", "basic", "empty-token", "oversized", "blank"],
)
def test_every_api_endpoint_needs_a_valid_key(api, alice, method, path, headers):
    job_id = api.create(alice)
    before = count_rows(api.url)

    r = api.client.request(
        method,
        path.replace("/1", f"/{job_id}"),
        headers=headers,
        json={"prompt": "x", "scenes_total": 1},
    )

    assert_401(r)
    assert count_rows(api.url) == before
    assert job_row(api.url, job_id)["status"] == "queued"


def test_auth_comes_before_body_checks(api):
    r = api.client.post("/api/v2/jobs", content=b"{nope", headers={"Content-Type": "text/plain"})

    assert_401(r)


def test_the_bearer_scheme_is_case_insensitive(api, alice):
    r = api.client.get("/api/v2/jobs", headers={"Authorization": f"bearer {alice}"})

    assert r.status_code == 200


def test_a_revoked_key_stops_working(make_settings, sqlite_url, fake_redis, recorder):
    settings = make_settings(
        database_url=sqlite_url, redis_url="redis://fake.invalid:6379/0", api_key_cache_seconds=0
    )
    app = create_app(settings, enqueue=recorder, redis_client=fake_redis)
    with TestClient(app) as client:
        with app.state.services.runtime.sessions() as session:
            key = create_api_key(ALICE, session=session)
        assert client.get("/api/v2/jobs", headers=auth(key)).status_code == 200
        with app.state.services.runtime.sessions() as session:
            assert revoke_api_key(key, session=session)

        assert_401(client.get("/api/v2/jobs", headers=auth(key)))


# -- bad input writes nothing ----------------------------------------------------------------

JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("content", "field_name"),
    [
        (b'{"prompt": "x", "scenes_total": 1, "priority": 9}', "priority"),
        (b'{"prompt": "x", "scenes_total": 0}', "scenes_total"),
        (b'{"prompt": "x", "scenes_total": 1001}', "scenes_total"),
        (b'{"prompt": "x", "scenes_total": "5"}', "scenes_total"),
        (b'{"prompt": "x", "scenes_total": true}', "scenes_total"),
        (b'{"prompt": "x", "scenes_total": 5.0}', "scenes_total"),
        (b'{"prompt": "x", "scenes_total": null}', "scenes_total"),
        (b'{"prompt": "x"}', "scenes_total"),
        (b'{"prompt": "", "scenes_total": 1}', "prompt"),
        (orjson.dumps({"prompt": "p" * 4001, "scenes_total": 1}), "prompt"),
        (b'{"prompt": "a\\u0000b", "scenes_total": 1}', "prompt"),
        (b'{"prompt": 5, "scenes_total": 1}', "prompt"),
        (b'{"scenes_total": 1}', "prompt"),
    ],
    ids=[
        "unknown-field",
        "zero-scenes",
        "too-many-scenes",
        "string-int",
        "bool-int",
        "float-int",
        "null-scenes",
        "no-scenes",
        "empty-prompt",
        "oversized-prompt",
        "nul-in-prompt",
        "number-prompt",
        "no-prompt",
    ],
)
def test_invalid_bodies_are_422_naming_the_field_and_write_nothing(api, alice, content, field_name):
    before = count_rows(api.url)

    r = api.client.post("/api/v2/jobs", content=content, headers={**auth(alice), **JSON_HEADERS})

    assert r.status_code == 422, r.text
    assert ["body", field_name] in [error["loc"] for error in r.json()["detail"]]
    assert all("input" not in error for error in r.json()["detail"])
    assert count_rows(api.url) == before
    assert api.recorder.calls == []


@pytest.mark.parametrize(
    "content",
    [b"{nope", b"", b"[1, 2]", b'"text"', b"null", b'{"prompt": "x", "scenes_total": 1'],
    ids=["broken", "empty", "array", "string", "null", "truncated"],
)
def test_bodies_that_are_not_a_json_object_are_422(api, alice, content):
    before = count_rows(api.url)

    r = api.client.post("/api/v2/jobs", content=content, headers={**auth(alice), **JSON_HEADERS})

    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][0] == "body"
    assert r.json()["detail"][0]["msg"]
    assert count_rows(api.url) == before
    assert api.recorder.calls == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(api, alice, content_type):
    headers = auth(alice) if content_type is None else {**auth(alice), "Content-Type": content_type}
    before = count_rows(api.url)

    r = api.client.post(
        "/api/v2/jobs", content=b'{"prompt": "x", "scenes_total": 1}', headers=headers
    )

    assert r.status_code == 415
    assert r.json() == {"detail": "Content-Type must be application/json"}
    assert count_rows(api.url) == before


def test_json_with_a_charset_is_accepted(api, alice):
    r = api.client.post(
        "/api/v2/jobs",
        content=b'{"prompt": "x", "scenes_total": 1}',
        headers={**auth(alice), "Content-Type": "application/json; charset=utf-8"},
    )

    assert r.status_code == 202


def test_oversized_bodies_are_413_with_or_without_content_length(api, alice):
    before = count_rows(api.url)
    big = orjson.dumps({"prompt": "p" * (MAX_BODY_BYTES + 10), "scenes_total": 1})

    declared = api.client.post("/api/v2/jobs", content=big, headers={**auth(alice), **JSON_HEADERS})
    chunked = api.client.post(
        "/api/v2/jobs",
        content=(big[i : i + 4096] for i in range(0, len(big), 4096)),
        headers={**auth(alice), **JSON_HEADERS},
    )

    for r in (declared, chunked):
        assert r.status_code == 413
        assert r.json() == {
            "detail": f"request body too large: the limit is {MAX_BODY_BYTES} bytes"
        }
    assert count_rows(api.url) == before
    assert api.recorder.calls == []


def test_a_prompt_of_4000_characters_is_accepted(api, alice):
    r = api.client.post(
        "/api/v2/jobs", json={"prompt": "é" * 4000, "scenes_total": 1000}, headers=auth(alice)
    )

    assert r.status_code == 202


# -- ops ------------------------------------------------------------------------------------


def test_healthz_and_readyz_need_no_key(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "database": "ok", "redis": "available"}


def test_readyz_reports_disabled_caching(make_settings, sqlite_url, recorder):
    app = create_app(make_settings(database_url=sqlite_url, redis_url=""), enqueue=recorder)
    with TestClient(app) as client:
        r = client.get("/readyz")

    assert r.status_code == 200
    assert r.json()["redis"] == "disabled"


def test_readyz_reports_redis_down_but_stays_ready(make_settings, sqlite_url, recorder):
    from shared.cache.backend import connect

    broken = connect("redis://127.0.0.1:1/0", socket_timeout=0.2)
    app = create_app(
        make_settings(database_url=sqlite_url, redis_url="redis://127.0.0.1:1/0"),
        enqueue=recorder,
        redis_client=broken,
    )
    with TestClient(app) as client:
        with app.state.services.runtime.sessions() as session:
            key = create_api_key(ALICE, session=session)
        listed = client.get("/api/v2/jobs", headers=auth(key))
        r = client.get("/readyz")

    assert listed.status_code == 200
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "database": "ok", "redis": "unavailable"}


def test_readyz_is_503_when_the_database_does_not_answer(
    make_settings, tmp_path, fake_redis, recorder
):
    # A directory is no SQLite file: every connection attempt fails.
    app = create_app(
        make_settings(
            database_url=f"sqlite:///{tmp_path}", redis_url="redis://fake.invalid:6379/0"
        ),
        enqueue=recorder,
        redis_client=fake_redis,
    )
    with TestClient(app) as client:
        r = client.get("/readyz")

    assert r.status_code == 503
    # Started without the database's incarnation, the process cannot tell its own cache
    # keys apart from another database's: it serves from the database alone.
    assert r.json() == {"status": "unavailable", "database": "unavailable", "redis": "disabled"}


def test_a_database_that_does_not_answer_is_503_not_500(
    make_settings, tmp_path, fake_redis, recorder
):
    app = create_app(
        make_settings(
            database_url=f"sqlite:///{tmp_path}", redis_url="redis://fake.invalid:6379/0"
        ),
        enqueue=recorder,
        redis_client=fake_redis,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/api/v2/jobs/1", headers=auth("rw_some-key"))

    assert r.status_code == 503
    assert r.json() == {"detail": "database unavailable: please retry later"}
    assert str(tmp_path) not in r.text


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def test_metrics_count_db_queries_and_a_cached_poll_costs_none(api, alice):
    job_id = api.create(alice)
    api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice))  # the key is now resolved
    before = scrape(api.client)[("renderwatch_db_queries_total", ())]

    for _ in range(5):
        assert api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice)).status_code == 200
    after_hits = scrape(api.client)[("renderwatch_db_queries_total", ())]
    api.runtime.cache.invalidate_job(job_id)
    api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice))
    after_miss = scrape(api.client)[("renderwatch_db_queries_total", ())]

    assert before > 0
    assert after_hits == before, "cached polls (auth included) must not touch the database"
    assert after_miss > after_hits, "a miss reads the database, and the counter sees it"


def test_metrics_expose_requests_by_route_and_the_cache_statistics(api, alice):
    job_id = api.create(alice)
    for _ in range(3):
        api.client.get(f"/api/v2/jobs/{job_id}", headers=auth(alice))
    api.client.get("/api/v2/jobs/999999", headers=auth(alice))
    api.client.get("/no/such/path")

    samples = scrape(api.client)
    stats = api.runtime.cache.stats()["statistics"]

    def requests(method, route, status):
        labels = (("method", method), ("route", route), ("status", status))
        return samples.get(("renderwatch_http_requests_total", labels), 0)

    assert requests("GET", "/api/v2/jobs/{job_id}", "200") == 3
    assert requests("GET", "/api/v2/jobs/{job_id}", "404") == 1
    assert requests("POST", "/api/v2/jobs", "202") == 1
    assert requests("GET", "unmatched", "404") == 1
    assert samples[("renderwatch_cache_hits_total", ())] == stats["hits"] == 3
    assert samples[("renderwatch_cache_misses_total", ())] == stats["misses"]
    assert samples[("renderwatch_cache_errors_total", ())] == stats["errors"]
    assert samples[("renderwatch_cache_invalidations_total", ())] == stats["invalidations"]
    assert samples[("renderwatch_cache_hit_rate_percent", ())] == stats["hit_rate"]
    assert samples[("renderwatch_cache_redis_available", ())] == 1.0


def test_each_app_has_its_own_metrics(make_settings, sqlite_url, fake_redis, recorder):
    settings = make_settings(database_url=sqlite_url, redis_url="redis://fake.invalid:6379/0")
    first, second = (create_app(settings, enqueue=recorder, redis_client=fake_redis) for _ in "ab")
    with TestClient(first) as one:
        one.get("/healthz")
        one.get("/healthz")
        counted = scrape(one)
    with TestClient(second) as two:
        fresh = scrape(two)

    key = (
        "renderwatch_http_requests_total",
        (("method", "GET"), ("route", "/healthz"), ("status", "200")),
    )
    assert counted[key] == 2
    assert key not in fresh


def test_openapi_describes_every_endpoint_with_its_shapes(api):
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]

    def ok_schema(path, method):
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    assert set(paths) >= {
        "/api/v2/jobs",
        "/api/v2/jobs/{job_id}",
        "/api/v2/jobs/{job_id}/cancel",
        "/api/v2/cache/stats",
        "/api/v2/cache/stats/history",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert ok_schema("/api/v2/jobs/{job_id}", "get") == {"$ref": "#/components/schemas/JobView"}
    assert ok_schema("/api/v2/jobs", "get") == {"$ref": "#/components/schemas/JobList"}
    assert ok_schema("/api/v2/cache/stats", "get") == {"$ref": "#/components/schemas/CacheStats"}
    assert ok_schema("/api/v2/cache/stats/history", "get") == {
        "$ref": "#/components/schemas/StatsHistory"
    }
    created = paths["/api/v2/jobs"]["post"]
    body_schema = created["requestBody"]["content"]["application/json"]["schema"]
    assert set(body_schema["properties"]) == {"prompt", "scenes_total"}
    assert body_schema["additionalProperties"] is False
    assert "202" in created["responses"]
    assert "304" in paths["/api/v2/jobs/{job_id}"]["get"]["responses"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert api.client.get("/docs").status_code == 200


def test_nothing_is_built_before_the_lifespan(make_settings, tmp_path, recorder):
    db = tmp_path / "never.db"
    app = create_app(make_settings(database_url=f"sqlite:///{db}", redis_url=""), enqueue=recorder)

    assert not hasattr(app.state, "services")
    assert not db.exists()


def test_shutdown_releases_the_runtime(api):
    services = api.app.state.services
    api.client.__exit__(None, None, None)

    assert not hasattr(api.app.state, "services")
    with pytest.raises(RuntimeError, match="not configured"):
        update_job_progress_with_cache(1, {"current_stage": "scripting"})
    assert services.metrics._engines == []


@pytest.mark.parametrize(
    ("header", "matches"),
    [('"3"', True), ('W/"3"', True), ('"1", "3"', True), ("*", True), ('"4"', False), ("3", False)],
)
def test_etag_matching(header, matches):
    assert etag_matches(header, '"3"') is matches


def test_python_m_api_runs_uvicorn_in_factory_mode(monkeypatch, make_settings):
    import api.__main__ as main_module

    calls = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(
        main_module,
        "get_settings",
        lambda: make_settings(api_host="0.0.0.0", api_port=8123, api_workers=3, log_level="debug"),
    )

    main_module.main()

    ((args, kwargs),) = calls
    assert args == ("api.app:create_served_app",)
    assert kwargs["factory"] is True
    assert (kwargs["host"], kwargs["port"], kwargs["workers"]) == ("0.0.0.0", 8123, 3)
    assert kwargs["access_log"] is False
    assert kwargs["log_config"]["root"]["level"] == "DEBUG"


@pytest.mark.parametrize(
    ("url", "mode", "cluster"),
    [
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "standalone", True),
        ("redis://127.0.0.1:7000", "cluster", True),
        ("redis://127.0.0.1:6379/0", "standalone", False),
        ("", "standalone", False),
    ],
)
def test_batched_reads_are_split_by_slot_on_any_cluster_url(make_settings, url, mode, cluster):
    from api.app import redis_is_cluster

    assert redis_is_cluster(make_settings(redis_url=url, redis_mode=mode)) is cluster


def test_fastapi_telemetry_is_off_unless_opentelemetry_is_configured(
    make_settings, sqlite_url, monkeypatch
):
    """FastAPI asks per request whether OpenTelemetry is set up: skipped unless an OTEL_*
    variable says it is (then FastAPI's own defaults apply)."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    settings = make_settings(database_url=sqlite_url, redis_url="")
    plain = create_app(settings, enqueue=lambda job_id: "t")
    assert not plain._native_telemetry.enabled()
    assert plain._telemetry["tracing"] is False
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renderwatch-api")
    traced = create_app(settings, enqueue=lambda job_id: "t")
    assert traced._telemetry["tracing"] is True


@dataclass(frozen=True)
class GcState:
    frozen: int
    thresholds: tuple[int, int, int]


@pytest.fixture
def gc_state():
    """The collector's frozen objects and thresholds before the test, restored after it."""
    before = GcState(gc.get_freeze_count(), gc.get_threshold())
    yield before
    gc.unfreeze()
    gc.set_threshold(*before.thresholds)


def test_the_served_app_settles_the_heap_once_started(
    make_settings, sqlite_url, gc_state, caplog, monkeypatch
):
    """`python -m api` serves `create_served_app`: once started, the objects built so far
    are frozen (full collections no longer walk them) and young collections are rarer."""
    from api.app import SETTLED_GC_THRESHOLDS, create_served_app

    caplog.set_level(logging.INFO, logger="api.app")

    settings = make_settings(database_url=sqlite_url, redis_url="")
    monkeypatch.setattr("api.app.get_settings", lambda: settings)
    monkeypatch.setattr("api.app.celery_enqueue", lambda _: (lambda job_id: "t", lambda: None))
    with TestClient(create_served_app()) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > gc_state.frozen
        assert gc.get_threshold() == SETTLED_GC_THRESHOLDS
    assert re.search(r"heap settled: \d+ objects frozen", caplog.text)


def test_an_app_built_for_tests_leaves_the_collector_alone(
    make_settings, sqlite_url, recorder, gc_state
):
    app = create_app(make_settings(database_url=sqlite_url, redis_url=""), enqueue=recorder)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == gc_state.frozen
        assert gc.get_threshold() == gc_state.thresholds
