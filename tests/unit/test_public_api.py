"""The public surface of `shared.cache` (DESIGN.md "Public cache API")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import orjson
import pytest

import shared.cache as cache_api
from shared.runtime import Runtime
from tests.cache_helpers import STATISTICS_KEYS, STATS_KEYS, STEPS, Harness, make_harness, open_db

DESIGN_NAMES = {
    "get_job_with_cache",
    "update_job_progress_with_cache",
    "invalidate_job_cache",
    "invalidate_user_jobs_cache",
    "get_cache_stats",
    "redis_available",
    "CACHE_TTL_SECONDS",
    "JOB_CACHE_KEY_PREFIX",
}
JOB_KEYS = {
    "job_id", "client_id", "status", "progress", "version", "error", "result_url",
    "created_at", "updated_at",
}  # fmt: skip


@pytest.fixture
def h(sqlite_url: str) -> Iterator[Harness]:
    engine, sessions = open_db(sqlite_url)
    server = fakeredis.FakeServer()
    harness = make_harness(lambda: fakeredis.FakeRedis(server=server), sessions, "api")
    cache_api.configure(harness.cache)
    yield harness
    cache_api.configure(None)
    engine.dispose()


def test_all_lists_the_design_names_and_every_name_exists() -> None:
    assert set(cache_api.__all__) >= DESIGN_NAMES
    for name in cache_api.__all__:
        assert hasattr(cache_api, name), name
    assert len(cache_api.__all__) == len(set(cache_api.__all__))


def test_the_defaults_match_the_design_and_the_settings(make_settings: Any) -> None:
    settings = make_settings()
    assert cache_api.CACHE_TTL_SECONDS == 30 == settings.cache_ttl_seconds
    assert cache_api.JOB_CACHE_KEY_PREFIX == "job" == settings.job_cache_key_prefix


def test_without_a_configured_cache_calls_say_what_to_do() -> None:
    cache_api.configure(None)
    assert cache_api.redis_available() is False
    with pytest.raises(RuntimeError, match=r"Runtime\.start"):
        cache_api.get_job_with_cache(1)
    with pytest.raises(RuntimeError, match=r"Runtime\.start"):
        cache_api.get_cache_stats()


def test_the_job_object_has_the_design_shape(h: Harness) -> None:
    job = h.new_job()
    data = cache_api.get_job_with_cache(job.job_id)
    assert data is not None and set(data) == JOB_KEYS
    assert set(data["progress"]) == {
        "current_stage", "scenes_completed", "scenes_total", "percent", "eta_seconds",
    }  # fmt: skip
    assert (data["status"], data["version"], data["error"], data["result_url"]) == (
        "queued", 1, None, None,
    )  # fmt: skip
    cached = h.cache.get(job.job_id)
    assert cached is not None
    assert orjson.loads(cached.body) == data, "the bytes served are the object returned"
    assert cache_api.get_job_with_cache(10**9) is None


def test_the_functions_act_on_the_configured_cache(h: Harness) -> None:
    job = h.new_job()
    assert cache_api.update_job_progress_with_cache(job.job_id, STEPS[0]) is True
    assert h.cached_version(job.job_id) == 2
    assert cache_api.invalidate_job_cache(job.job_id) is True
    assert h.raw(job.job_id) is None
    h.cache.get_list("alice@example.com", "p1", lambda: b"[]")
    assert cache_api.invalidate_user_jobs_cache("alice@example.com") is True
    assert h.client.exists(h.keys.jobs("alice@example.com")) == 0
    stats = cache_api.get_cache_stats()
    statistics = stats["statistics"]
    assert isinstance(statistics, dict)
    assert set(stats) == STATS_KEYS and set(statistics) == STATISTICS_KEYS
    assert statistics["invalidations"] == 3
    assert cache_api.redis_available() is True


def test_runtime_start_configures_the_module_and_close_releases_it(
    make_settings: Any, sqlite_url: str
) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    runtime = Runtime.start(
        make_settings(database_url=sqlite_url, cache_namespace="rt"), redis_client=client
    )
    try:
        assert cache_api.current() is runtime.cache
        assert cache_api.redis_available() is True
    finally:
        runtime.close()
    assert cache_api.redis_available() is False
    with pytest.raises(RuntimeError):
        cache_api.current()
