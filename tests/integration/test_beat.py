"""Beat and the snapshot task with real processes: one snapshot per interval, no duplicates.

Each test gets its own PostgreSQL database (the snapshot table is global to a database),
a private broker redis-server and its own cache namespace on the shared Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from shared import jobs
from shared.cache import get_cache_stats, get_job_with_cache
from shared.models import CacheStatsSnapshot
from shared.queue import SNAPSHOT_CACHE_STATS, create_celery
from shared.runtime import Runtime
from tests import procs

pytestmark = [pytest.mark.celery, pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture
def beat_settings(private_pg_url, redis_url, namespace, broker_url, make_settings):
    return make_settings(
        database_url=private_pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_broker_url=broker_url,
        celery_queue=f"test-{namespace}",
        stats_snapshot_seconds=1,
        log_level="INFO",
    )


@pytest.fixture
def runtime(beat_settings) -> Iterator[Runtime]:
    rt = Runtime.start(beat_settings)
    yield rt
    rt.close()


def snapshots(runtime: Runtime) -> list[CacheStatsSnapshot]:
    with runtime.sessions() as session:
        return list(session.scalars(select(CacheStatsSnapshot).order_by(CacheStatsSnapshot.id)))


@pytest.mark.timeout(120)
def test_beat_stores_one_snapshot_per_interval_of_the_global_statistics(
    runtime, beat_settings, tmp_path
):
    # Some reads in this process: the snapshots must count them (statistics are global).
    with runtime.sessions() as session:
        job_id = jobs.create_job(
            session=session, client_id="beat@test", prompt="stats", scenes_total=1
        ).job_id
    for _ in range(5):
        assert get_job_with_cache(job_id) is not None
    runtime.cache.flush()
    stats = get_cache_stats()["statistics"]
    assert isinstance(stats, dict)
    assert stats["hits"] + stats["misses"] == 5

    env = procs.settings_env(beat_settings)
    with procs.celery_worker(env, tmp_path, queue=beat_settings.celery_queue, concurrency=2):
        started = time.monotonic()
        with procs.celery_beat(env, tmp_path):
            rows = procs.wait_until(
                lambda: len(found := snapshots(runtime)) >= 3 and found,
                timeout=60,
                what="three snapshots",
            )
        elapsed = time.monotonic() - started

    slots = [row.slot for row in rows]
    assert len(set(slots)) == len(slots)
    assert slots == sorted(slots)
    # One beat, one snapshot per second at most (beat started after `started`).
    assert slots[-1] - slots[0] + 1 >= len(rows)
    assert len(rows) <= elapsed + 2
    for row in rows:
        assert row.slot == int(row.taken_at.timestamp())
        assert (row.hits, row.misses) == (stats["hits"], stats["misses"])
        assert row.total_requests == 5
        assert row.redis_available is True


@pytest.mark.timeout(120)
def test_a_snapshot_delivered_again_in_the_same_interval_is_a_no_op(
    runtime, beat_settings, make_settings, tmp_path
):
    daily = beat_settings.model_copy(update={"stats_snapshot_seconds": 86_400})
    env = procs.settings_env(daily)
    app = create_celery(daily)
    try:
        with procs.celery_worker(env, tmp_path, queue=daily.celery_queue) as worker:
            task_ids = [str(app.send_task(SNAPSHOT_CACHE_STATS).id) for _ in range(3)]
            results = [
                worker.wait_for_log(
                    rf"{tid}\] succeeded in [\d.]+s: (True|False)", timeout=60
                ).group(1)
                for tid in task_ids
            ]
    finally:
        app.close()

    rows = snapshots(runtime)
    # Within one day-long slot only the first delivery writes (midnight UTC would make two).
    assert len(rows) == len({row.slot for row in rows}) == results.count("True")
    assert results[0] == "True"
    assert results.count("False") >= 1
