"""The API on real PostgreSQL and real Redis, enqueuing with the real Celery producer.

Each test has its own Redis key namespace and its own Celery queue on the real
broker (no worker is needed: the message is read back from the queue).
"""

from __future__ import annotations

import base64
import json
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from starlette.exceptions import StarletteDeprecationWarning

from api.app import create_app
from shared.apikeys import create_api_key
from shared.cache import update_job_progress_with_cache
from shared.jobs import get_job_row
from shared.queue import RENDER_VIDEO

with warnings.catch_warnings():
    # Starlette asks for `httpx2` (not in the lock yet); the plain httpx client works the same.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

CLOSED_REDIS = "redis://127.0.0.1:1/0"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def queue(redis_url: str, namespace: str) -> Iterator[str]:
    """A Celery queue private to this test on the real Redis broker, removed afterwards."""
    name = f"test-{namespace}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{name}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def queued_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def start(settings: Any) -> tuple[Any, TestClient, str, str]:
    app = create_app(settings)
    client = TestClient(app)
    client.__enter__()
    owner = f"user-{uuid.uuid4().hex[:8]}@example.com"
    with app.state.services.runtime.sessions() as session:
        key = create_api_key(owner, session=session)
    return app, client, key, owner


@pytest.mark.timeout(120)
def test_create_poll_update_poll_on_postgres_and_redis(
    make_settings, pg_url, redis_url, namespace, queue
):
    settings = make_settings(
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_broker_url=redis_url,
        celery_queue=queue,
    )
    app, client, key, owner = start(settings)
    try:
        created = client.post(
            "/api/v2/jobs", json={"prompt": "a lighthouse", "scenes_total": 3}, headers=auth(key)
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]

        first = client.get(f"/api/v2/jobs/{job_id}", headers=auth(key))
        assert first.status_code == 200
        assert first.headers["etag"] == '"1"'
        assert first.json()["client_id"] == owner
        assert first.json()["status"] == "queued"
        cache = app.state.services.runtime.cache
        hits = cache.stats()["statistics"]["hits"]
        again = client.get(f"/api/v2/jobs/{job_id}", headers=auth(key))
        assert again.content == first.content
        assert cache.stats()["statistics"]["hits"] == hits + 1, "served from real Redis"

        assert update_job_progress_with_cache(
            job_id, {"current_stage": "rendering", "scenes_completed": 1}
        )
        fresh = client.get(f"/api/v2/jobs/{job_id}", headers=auth(key))
        listed = client.get("/api/v2/jobs", headers=auth(key)).json()["items"]
        not_modified = client.get(
            f"/api/v2/jobs/{job_id}", headers={**auth(key), "If-None-Match": '"2"'}
        )
        stats = client.get("/api/v2/cache/stats", headers=auth(key)).json()
        nul = client.post(
            "/api/v2/jobs", json={"prompt": "a\x00b", "scenes_total": 1}, headers=auth(key)
        )
        ready = client.get("/readyz").json()
        with app.state.services.runtime.sessions() as session:
            row = get_job_row(job_id, session=session)
            task_id = row.celery_task_id if row is not None else None
    finally:
        client.__exit__(None, None, None)

    assert fresh.status_code == 200
    assert fresh.headers["etag"] == '"2"'
    assert fresh.json()["progress"]["scenes_completed"] == 1
    assert fresh.json()["status"] == "running"
    assert [(job["job_id"], job["version"]) for job in listed] == [(job_id, 2)]
    assert not_modified.status_code == 304
    assert stats["statistics"]["redis_available"] is True
    assert stats["statistics"]["hits"] >= 2
    assert nul.status_code == 422, "PostgreSQL cannot store NUL: refused before the INSERT"
    assert ready == {"status": "ready", "database": "ok", "redis": "available"}

    (message,) = queued_messages(redis_url, queue)
    assert message["headers"]["task"] == RENDER_VIDEO
    assert json.loads(base64.b64decode(message["body"]))[0] == [job_id]
    assert task_id == message["headers"]["id"], "the row records the task actually sent"


@pytest.mark.timeout(120)
def test_with_redis_unreachable_every_request_is_answered_from_the_database(
    make_settings, pg_url, redis_url, queue
):
    settings = make_settings(
        database_url=pg_url,
        redis_url=CLOSED_REDIS,
        redis_socket_timeout=0.2,
        celery_broker_url=redis_url,
        celery_queue=queue,
    )
    _app, client, key, _owner = start(settings)
    try:
        created = client.post(
            "/api/v2/jobs", json={"prompt": "offline", "scenes_total": 2}, headers=auth(key)
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        answers = [
            client.get(f"/api/v2/jobs/{job_id}", headers=auth(key)),
            client.get(f"/api/v2/jobs/{job_id}", headers=auth(key)),
            client.get("/api/v2/jobs", headers=auth(key)),
        ]
        assert update_job_progress_with_cache(job_id, {"current_stage": "scripting"})
        after_update = client.get(f"/api/v2/jobs/{job_id}", headers=auth(key))
        cancelled = client.post(f"/api/v2/jobs/{job_id}/cancel", headers=auth(key))
        history = client.get("/api/v2/cache/stats/history", headers=auth(key))
        stats = client.get("/api/v2/cache/stats", headers=auth(key))
        ready = client.get("/readyz")
        metrics = client.get("/metrics")
    finally:
        client.__exit__(None, None, None)

    for r in [*answers, after_update, history, stats, ready, metrics]:
        assert r.status_code == 200, (r.request.url, r.text)
    assert answers[0].json()["job_id"] == job_id
    assert [job["job_id"] for job in answers[2].json()["items"]] == [job_id]
    assert after_update.json()["version"] == 2
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "running"
    body = stats.json()
    assert body["cache_enabled"] is True
    assert body["statistics"]["redis_available"] is False
    assert "unavailable" in body["message"]
    assert "127.0.0.1" not in stats.text, "no connection detail in the statistics"
    assert ready.json() == {"status": "ready", "database": "ok", "redis": "unavailable"}
    assert "renderwatch_cache_redis_available 0.0" in metrics.text
    assert len(queued_messages(redis_url, queue)) == 1
