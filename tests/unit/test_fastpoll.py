"""The cached poll's fast path (`api.fastpoll`) answers exactly as the FastAPI route does."""

from __future__ import annotations

import warnings

import pytest
from sqlalchemy.exc import OperationalError
from starlette.exceptions import StarletteDeprecationWarning

from api.app import create_app
from api.deps import get_reader
from shared.apikeys import create_api_key

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def comparable(response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k.lower() != "date"}
    return response.status_code, response.content, headers


@pytest.fixture
def api(make_settings, sqlite_url, fake_redis):
    settings = make_settings(database_url=sqlite_url, redis_url="redis://fake.invalid:6379/0")
    app = create_app(settings, enqueue=lambda job_id: f"task-{job_id}", redis_client=fake_redis)
    with TestClient(app) as client:
        runtime = app.state.services.runtime
        with runtime.sessions() as session:
            alice = create_api_key("alice@example.com", session=session)
            bob = create_api_key("bob@example.com", session=session)
        job = client.post(
            "/api/v2/jobs", json={"prompt": "a cat", "scenes_total": 3}, headers=auth(alice)
        ).json()["job_id"]
        yield app, client, alice, bob, job


def forbid_the_route(app):
    """Make the FastAPI route unusable: a request that still succeeds took the fast path."""

    async def broken():
        raise AssertionError("the FastAPI route was used")

    app.dependency_overrides[get_reader] = broken


def test_a_warm_key_is_answered_before_routing(api):
    app, client, alice, _, job = api
    slow = client.get(f"/api/v2/jobs/{job}", headers=auth(alice))  # resolves (warms) the key
    forbid_the_route(app)
    fast = client.get(f"/api/v2/jobs/{job}", headers=auth(alice))
    assert fast.status_code == 200
    assert comparable(fast) == comparable(slow)


def test_fast_and_slow_paths_answer_alike_for_200_304_and_404(api):
    app, client, alice, bob, job = api
    client.get("/api/v2/jobs/1", headers=auth(bob))  # warm bob's key on the slow path too
    slow_200 = client.get(f"/api/v2/jobs/{job}", headers=auth(alice))
    etag = slow_200.headers["etag"]
    slow_304 = client.get(f"/api/v2/jobs/{job}", headers={**auth(alice), "If-None-Match": etag})
    app.dependency_overrides.clear()

    # The slow path's answers for the same requests, with the fast path forced off by a
    # second Authorization header (the fast path leaves ambiguous requests to the app).
    def slow(path, headers):
        return client.get(path, headers=[*headers.items(), ("Authorization", "Bearer x")])

    forbid_the_route(app)
    fast_200 = client.get(f"/api/v2/jobs/{job}", headers=auth(alice))
    fast_304 = client.get(f"/api/v2/jobs/{job}", headers={**auth(alice), "If-None-Match": etag})
    fast_foreign = client.get(f"/api/v2/jobs/{job}", headers=auth(bob))
    fast_missing = client.get("/api/v2/jobs/999999", headers=auth(bob))
    assert comparable(fast_200) == comparable(slow_200)
    assert comparable(fast_304) == comparable(slow_304)
    assert fast_304.status_code == 304 and fast_304.content == b""
    assert fast_foreign.status_code == 404
    assert comparable(fast_foreign) == comparable(fast_missing)

    app.dependency_overrides.clear()
    slow_missing = slow("/api/v2/jobs/999999", auth(bob))
    assert comparable(slow_missing) == comparable(fast_missing)


@pytest.mark.parametrize(
    ("path", "status"),
    [("/api/v2/jobs/abc", 422), ("/api/v2/jobs/0", 422), ("/api/v2/jobs/-1", 422)],
)
def test_malformed_ids_are_left_to_the_app(api, path, status):
    _, client, alice, _, job = api
    client.get(f"/api/v2/jobs/{job}", headers=auth(alice))
    response = client.get(path, headers=auth(alice))
    assert response.status_code == status
    assert "job_id" in response.text


def test_a_wrong_or_cold_key_is_left_to_the_app(api):
    app, client, _, _, job = api
    with app.state.services.runtime.sessions() as session:
        cold = create_api_key("alice@example.com", session=session)  # never used yet
    forbid_the_route(app)
    # A key never seen by this process is resolved by the app (here: the broken route).
    with pytest.raises(AssertionError, match="route was used"):
        client.get(f"/api/v2/jobs/{job}", headers=auth(cold))
    app.dependency_overrides.clear()
    assert client.get(f"/api/v2/jobs/{job}", headers=auth("rw_nope")).status_code == 401
    assert client.get(f"/api/v2/jobs/{job}").status_code == 401


def test_statistics_count_each_poll_once_on_either_path(api):
    _, client, alice, _, job = api
    before = client.get("/api/v2/cache/stats", headers=auth(alice)).json()["statistics"]
    polls = 25
    for _ in range(polls):
        assert client.get(f"/api/v2/jobs/{job}", headers=auth(alice)).status_code == 200
    after = client.get("/api/v2/cache/stats", headers=auth(alice)).json()["statistics"]
    served = (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])
    assert served == polls


def test_a_database_outage_on_the_fast_path_is_the_apps_503(api, monkeypatch):
    app, client, alice, _, job = api
    client.get(f"/api/v2/jobs/{job}", headers=auth(alice))
    reader = app.state.services.reader

    async def down(job_id, *, client_id=None):
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setattr(reader, "get", down)
    response = client.get(f"/api/v2/jobs/{job}", headers=auth(alice))
    assert response.status_code == 503


@pytest.mark.parametrize("warm", [False, True])
def test_a_get_with_a_large_content_length_is_413_warm_or_cold(api, warm):
    """The body limit applies before the fast path: warm and cold polls answer alike."""
    app, client, _, _, job = api
    with app.state.services.runtime.sessions() as session:
        key = create_api_key("alice@example.com", session=session)  # never used yet
    if warm:
        assert client.get(f"/api/v2/jobs/{job}", headers=auth(key)).status_code == 200
    big = b"x" * (2 * 1024 * 1024)
    response = client.request("GET", f"/api/v2/jobs/{job}", headers=auth(key), content=big)
    assert response.status_code == 413
    assert response.json()["detail"].startswith("request body too large")


def test_the_fast_path_is_counted_and_timed_under_the_route_template(api):
    app, client, alice, _, job = api
    client.get(f"/api/v2/jobs/{job}", headers=auth(alice))  # warm the key (routed)
    forbid_the_route(app)
    for _ in range(3):
        assert client.get(f"/api/v2/jobs/{job}", headers=auth(alice)).status_code == 200
    app.dependency_overrides.clear()
    text = client.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = (("method", "GET"), ("route", "/api/v2/jobs/{job_id}"))
    assert samples[("renderwatch_http_requests_total", (*route, ("status", "200")))] == 4
    assert samples[("renderwatch_http_request_duration_seconds_count", route)] == 4
    assert samples[("renderwatch_http_request_duration_seconds_sum", route)] > 0
