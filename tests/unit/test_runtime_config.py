"""Start-up configuration of the cache: CACHE_SEAL_KEY(S) key the seal and rotate; REDIS_URL
is checked."""

from __future__ import annotations

import json
import logging

import pytest

from shared import jobs
from shared.db import build_engine, build_session_factory
from shared.runtime import build_cache


@pytest.fixture
def sessions(sqlite_url):
    engine = build_engine(sqlite_url)
    yield build_session_factory(engine)
    engine.dispose()


def test_a_value_sealed_with_another_key_is_never_served(
    make_settings, sqlite_url, sessions, fake_redis
):
    ours = build_cache(
        make_settings(database_url=sqlite_url, cache_seal_key="ours"),
        sessions,
        redis_client=fake_redis,
    )
    theirs = build_cache(
        make_settings(database_url=sqlite_url, cache_seal_key="theirs"),
        sessions,
        redis_client=fake_redis,
    )
    with sessions() as session:
        view = jobs.create_job(session=session, client_id="alice", prompt="p", scenes_total=2)
    theirs.publish(view)  # a value written under another key (another deployment, a forger)
    assert fake_redis.get(ours.keys.job(view.job_id)) is not None

    job = ours.get(view.job_id, client_id="alice")

    assert job is not None and job.view.version == view.version  # served from the DB
    stats = ours.stats()["statistics"]
    assert isinstance(stats, dict)
    assert stats["errors"] == 1 and stats["hits"] == 0
    # Refilled under our key: the next read is a hit.
    assert ours.get(view.job_id, client_id="alice") is not None
    after = ours.stats()["statistics"]
    assert isinstance(after, dict) and after["hits"] == 1


def test_the_key_never_shows_in_settings_repr_or_logs_but_reaches_children(
    make_settings, sqlite_url, sessions, fake_redis, caplog
):
    settings = make_settings(database_url=sqlite_url, cache_seal_key="s3cr3t-seal")
    assert "s3cr3t-seal" not in repr(settings)
    assert settings.as_environment()["CACHE_SEAL_KEY"] == "s3cr3t-seal"
    with caplog.at_level(logging.DEBUG):
        build_cache(settings, sessions, redis_client=fake_redis)
    assert "s3cr3t-seal" not in caplog.text


def test_a_missing_key_is_warned_about_once_at_start(
    make_settings, sqlite_url, sessions, fake_redis, caplog
):
    with caplog.at_level(logging.WARNING, logger="shared.runtime"):
        build_cache(make_settings(database_url=sqlite_url), sessions, redis_client=fake_redis)
    assert "CACHE_SEAL_KEY is not set" in caplog.text


@pytest.mark.parametrize(
    ("url", "mode", "part"),
    [
        ("redis://:s3cret-pw@127.0.0.1:6379/0", "sentinel", "REDIS_MODE=sentinel"),
        ("redis+sentinel://:s3cret-pw@127.0.0.1:26379", "standalone", "service name"),
        ("redis+cluster://:s3cret-pw@127.0.0.1:7000/3", "standalone", "database 0"),
        ("redis://:s3cret-pw@127.0.0.1:port/0", "standalone", "port of host 1"),
    ],
)
def test_a_bad_redis_url_stops_the_start_naming_the_part_without_the_password(
    make_settings, sqlite_url, sessions, url, mode, part
):
    from shared.cache.redis_url import RedisUrlError

    settings = make_settings(database_url=sqlite_url, redis_url=url, redis_mode=mode)
    with pytest.raises(RedisUrlError) as caught:
        build_cache(settings, sessions)
    assert part in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


def test_every_topology_is_accepted_at_start_without_connecting(
    make_settings, sqlite_url, sessions
):
    """Building the cache sends nothing: a Sentinel or Cluster address that is not up
    yet does not stop the process (the breaker handles it like any outage)."""
    for url, mode in [
        ("redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/0", "standalone"),
        ("redis+cluster://127.0.0.1:1,127.0.0.1:2", "standalone"),
        ("redis://127.0.0.1:1", "cluster"),
    ]:
        settings = make_settings(database_url=sqlite_url, redis_url=url, redis_mode=mode)
        cache = build_cache(settings, sessions)
        assert cache.backend is not None
        cache.close()


# -- seal key rotation (CACHE_SEAL_KEYS) ----------------------------------------------------


def _served(cache, job_id: int) -> tuple[int, int]:
    job = cache.get(job_id, client_id="alice")
    assert job is not None
    stats = cache.stats()["statistics"]
    return stats["hits"], stats["errors"]


def test_during_a_rotation_entries_of_processes_on_the_old_key_are_hits(
    make_settings, sqlite_url, sessions, fake_redis
):
    on_old_key = build_cache(
        make_settings(database_url=sqlite_url, cache_seal_key="s3cr3t-old"),
        sessions,
        redis_client=fake_redis,
    )
    rotating = build_cache(
        make_settings(database_url=sqlite_url, cache_seal_keys="s3cr3t-new, s3cr3t-old"),
        sessions,
        redis_client=fake_redis,
    )
    with sessions() as session:
        view = jobs.create_job(session=session, client_id="alice", prompt="p", scenes_total=2)
    on_old_key.publish(view)

    assert _served(rotating, view.job_id) == (1, 0), "an old-key entry must be a plain hit"


def test_a_key_dropped_from_the_list_no_longer_verifies(
    make_settings, sqlite_url, sessions, fake_redis
):
    on_old_key = build_cache(
        make_settings(database_url=sqlite_url, cache_seal_key="s3cr3t-old"),
        sessions,
        redis_client=fake_redis,
    )
    rotated = build_cache(
        make_settings(database_url=sqlite_url, cache_seal_keys="s3cr3t-new"),
        sessions,
        redis_client=fake_redis,
    )
    with sessions() as session:
        view = jobs.create_job(session=session, client_id="alice", prompt="p", scenes_total=2)
    on_old_key.publish(view)

    assert _served(rotated, view.job_id) == (0, 1), "served from the DB, counted as an error"


def test_seal_keys_never_show_in_settings_logs_stats_or_the_sealer_but_reach_children(
    make_settings, sqlite_url, sessions, fake_redis, caplog
):
    settings = make_settings(
        database_url=sqlite_url,
        cache_seal_keys="s3cr3t-new,s3cr3t-old",
        cache_seal_key="s3cr3t-single",
    )
    with caplog.at_level(logging.DEBUG):
        cache = build_cache(settings, sessions, redis_client=fake_redis)
        with sessions() as session:
            view = jobs.create_job(session=session, client_id="alice", prompt="p", scenes_total=2)
        cache.publish(view)
        cache.get(view.job_id, client_id="alice")
        stats = cache.stats()
    assert settings.as_environment()["CACHE_SEAL_KEYS"] == "s3cr3t-new,s3cr3t-old"
    assert cache.backend is not None
    sealer = cache.backend.sealer
    seen = " ".join([repr(settings), caplog.text, json.dumps(stats), repr(sealer)])
    assert "s3cr3t" not in seen
    # What is logged instead: the key ids, and that the single key is ignored.
    assert sealer.key_ids[0] in caplog.text and sealer.key_ids[1] in caplog.text
    assert "CACHE_SEAL_KEY is ignored" in caplog.text
