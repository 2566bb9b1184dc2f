"""Issue 3, scenarios 5 and 6: Redis refused, killed, paused or hung under a polling load.

A real API process (`python -m api`) serves polls of one job from a private
redis-server on PostgreSQL, while this test breaks that Redis the way production
does. A writer (the worker's side: its own runtime, its own breaker) keeps reporting
progress during the outage. Then Redis comes back and caching must resume by itself.

What must hold (DESIGN.md guarantee 5, and 1 under faults):
- every poll answers 200 (from the database while Redis is away);
- once the breaker has tripped, polls stop waiting on Redis: only the requests in
  flight when it tripped and the half-open probes (one per reset period) may wait a
  socket timeout, counted on the poll latencies and, for the hung server, on the
  connections it received;
- the statistics say `redis_available: false` with a plain message;
- progress writes reach the database;
- after the outage, caching resumes within 5 s with no restart, and no poll started
  after the last acknowledged write sees an older version (no stale entry survives:
  the breaker's recovery probe drops entries of recently written jobs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.cache import update_job_progress_with_cache
from shared.runtime import Runtime
from tests import procs
from tests.faults.conftest import (
    ApiClient,
    Deployment,
    FaultyRedis,
    HungServer,
    Poll,
    PollingLoad,
    between,
    burst,
    summarize,
)

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]

SOCKET_TIMEOUT = 0.25  # the defaults of Settings, spelled out: the bounds below use them
RESET_SECONDS = 1.0
POLLERS = 4
FAULT_SECONDS = 3.0
RECOVERY_LIMIT = 5.0
# A poll this slow may have waited on Redis; a poll served by the DB takes milliseconds.
SLOW = 0.8 * SOCKET_TIMEOUT

STEPS: list[dict[str, Any]] = [
    {"current_stage": "scripting"},
    {"current_stage": "storyboard"},
    *({"current_stage": "rendering", "scenes_completed": n} for n in range(0, 20)),
]


def fault_settings(redis_url: str) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "breaker_failure_threshold": 1,
        "breaker_reset_seconds": RESET_SECONDS,
        "api_key_cache_seconds": 600,  # polls authenticate from memory, as in production
    }


@pytest.fixture
def writer() -> Iterator[list[Runtime]]:
    """The worker's side of the system, started by the test in its own process."""
    started: list[Runtime] = []
    yield started
    for runtime in started:
        runtime.close()


def start_writer(dep: Deployment, started: list[Runtime]) -> Runtime:
    started.append(Runtime.start(dep.settings))
    return started[-1]


def may_have_waited(polls: list[Poll]) -> list[Poll]:
    return [p for p in polls if p.latency >= SLOW]


def wait_bound(seconds: float) -> int:
    """Polls allowed to wait on Redis during `seconds` of outage: those in flight when the
    breaker tripped, plus one half-open probe per reset period (and one of slack)."""
    return POLLERS + math.ceil(seconds / RESET_SECONDS) + 2


def statistics_during_outage(http: ApiClient, timeout: float = 2.0) -> dict[str, Any]:
    """The statistics object once it reports Redis unavailable (the last one seen if it
    never does: the assertions come after the load's, so a broken breaker shows there)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = http.stats()
        if stats["statistics"]["redis_available"] is False or time.monotonic() >= deadline:
            return stats
        time.sleep(0.1)


def assert_statistics_say_unavailable(stats: dict[str, Any]) -> None:
    assert stats["cache_enabled"] is True
    assert stats["statistics"]["redis_available"] is False, stats
    message = stats["message"].lower()
    assert "unavailable" in message and "database" in message, stats["message"]


def write_during_outage(dep: Deployment, runtime: Runtime, job_id: int, steps: int) -> int:
    """Report progress `steps` times; each must reach the DB. Returns the last acked version."""
    version = dep.db_view(job_id).version
    for step in STEPS[version - 1 : version - 1 + steps]:
        assert update_job_progress_with_cache(job_id, step) is True
        version += 1
        assert dep.db_view(job_id).version == version, "the write did not reach the database"
    return version


def outage_warnings(log: str) -> int:
    return log.count("redis unavailable (")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["refused", "killed", "paused"])
def test_polls_survive_a_redis_outage_and_caching_resumes_by_itself(
    fault: str,
    deployment: Any,
    faulty_redis: FaultyRedis,
    writer: list[Runtime],
    tmp_path: Path,
    record_figures: Any,
) -> None:
    dep: Deployment = deployment(**fault_settings(faulty_redis.url))
    alice = dep.new_client()
    job = dep.new_job(alice, scenes_total=20)
    path = f"/api/v2/jobs/{job.job_id}"
    with dep.api(tmp_path) as api, ApiClient(api.base_url, alice) as http:
        pid = api.pid
        # Warm: the first poll fills the entry, the second is a hit from real Redis.
        assert http.job(job.job_id).status_code == 200
        hits = http.counts()["hits"]
        assert http.job(job.job_id).status_code == 200
        assert http.counts()["hits"] == hits + 1, "precondition: polls are cache hits"
        runtime = start_writer(dep, writer)

        # Grow the API's Redis pool: its idle connections are the ones an outage leaves stale.
        assert burst(api.base_url, path, alice.headers) == [200] * 16
        with PollingLoad(api.base_url, path, alice.headers, clients=POLLERS) as load:
            load.wait_for(40)
            fault_started = time.monotonic()
            if fault == "refused":
                faulty_redis.stop()  # clean shutdown: the port refuses from now on
            elif fault == "killed":
                faulty_redis.kill()
            else:
                faulty_redis.pause(int(FAULT_SECONDS * 1000), "ALL")
            acked = write_during_outage(dep, runtime, job.job_id, steps=3)
            acked_at = time.monotonic()
            writer_saw_outage = not runtime.cache.available()
            stats = statistics_during_outage(http)
            time.sleep(max(0.0, fault_started + FAULT_SECONDS - time.monotonic()))

            # Redis comes back: same port, nothing restarted on our side.
            if fault == "paused":
                faulty_redis.wait_answering()  # the pause ran out
            else:
                faulty_redis.start()
            back_at = time.monotonic()
            recovered_at = wait_for_caching(http)
            # Every pooled connection gets used again: none may reopen the breaker.
            assert burst(api.base_url, path, alice.headers) == [200] * 16
            load.wait_for(40)
            still_available = http.counts()["redis_available"]
        polls = load.polls
        assert api.alive() and api.pid == pid, "the API process was restarted"
        warnings = outage_warnings(api.log())

    during = between(polls, fault_started + 0.05, back_at)
    after_ack = between(polls, acked_at)
    stale = [p for p in after_ack if p.version is not None and p.version < acked]
    waited = may_have_waited(during)
    summary = summarize(during)
    record_figures(
        fault=fault,
        polls_total=len(polls),
        polls_non_200=sum(p.status != 200 for p in polls),
        polls_during_fault=summary["polls"],
        p50_during_fault_s=summary["p50_s"],
        p99_during_fault_s=summary["p99_s"],
        polls_waiting_on_redis=len(waited),
        allowed_waiting=wait_bound(back_at - fault_started),
        writes_during_fault=3,
        recovery_s=recovered_at - back_at,
        stale_polls_after_ack=len(stale),
        outage_warnings=warnings,
    )
    assert [p for p in polls if p.status != 200] == [], "a poll was not answered 200"
    assert len(during) >= 20, "precondition: the load ran during the fault"
    assert summary["p50_s"] < SLOW, "polls kept waiting on Redis"
    assert len(waited) <= wait_bound(back_at - fault_started), (
        f"{len(waited)} polls waited on Redis during the outage: {waited}"
    )
    assert stale == [], f"polls after the write of v{acked} saw older versions: {stale[:5]}"
    assert recovered_at - back_at <= RECOVERY_LIMIT, "caching did not resume within 5 s"
    assert_statistics_say_unavailable(stats)
    assert writer_saw_outage, "the writer kept waiting on Redis (its breaker did not open)"
    assert warnings == 1, "one outage, one WARNING (a second one: the breaker reopened)"
    assert still_available is True, "caching stopped again after it had resumed"
    assert dep.db_view(job.job_id).version == acked


def wait_for_caching(http: ApiClient) -> float:
    """Wait until the API serves from Redis again (hits grow while the load polls)."""
    last = [-1]

    def hits_grow() -> bool:
        counts = http.counts()
        grew = counts["redis_available"] is True and last[0] >= 0 and counts["hits"] > last[0]
        last[0] = counts["hits"] if counts["redis_available"] else -1
        return grew

    procs.wait_until(hits_grow, timeout=RECOVERY_LIMIT + 10, interval=0.1, what="cache hits")
    return time.monotonic()


@pytest.mark.timeout(120)
def test_a_hung_redis_is_waited_on_once_per_probe_and_polls_are_served_from_the_db(
    deployment: Any,
    hung_redis: HungServer,
    writer: list[Runtime],
    tmp_path: Path,
    record_figures: Any,
) -> None:
    dep: Deployment = deployment(**fault_settings(hung_redis.url))
    alice = dep.new_client()
    job = dep.new_job(alice, scenes_total=20)
    path = f"/api/v2/jobs/{job.job_id}"
    with dep.api(tmp_path) as api, ApiClient(api.base_url, alice) as http:
        first = http.job(job.job_id)  # trips the breaker: one socket timeout, then the DB
        assert first.status_code == 200 and first.json()["version"] == 1
        runtime = start_writer(dep, writer)
        started = time.monotonic()
        with PollingLoad(api.base_url, path, alice.headers, clients=POLLERS) as load:
            load.wait_for(40)
            acked = write_during_outage(dep, runtime, job.job_id, steps=3)
            acked_at = time.monotonic()
            writer_saw_outage = not runtime.cache.available()
            stats = statistics_during_outage(http)
            time.sleep(max(0.0, started + FAULT_SECONDS - time.monotonic()))
        polls = load.polls
        elapsed = time.monotonic() - started
        warnings = outage_warnings(api.log())

    waited = may_have_waited(polls)
    stale = [p for p in between(polls, acked_at) if p.version is not None and p.version < acked]
    summary = summarize(polls)
    # Each attempt on a hung server costs a connection (a timed-out one is dropped): the
    # first poll, the pollers in flight, the writer, one probe per reset period.
    allowed_connections = 1 + POLLERS + 1 + math.ceil(elapsed / RESET_SECONDS) + 2
    record_figures(
        fault="hung",
        polls_total=len(polls),
        polls_non_200=sum(p.status != 200 for p in polls),
        p50_s=summary["p50_s"],
        p99_s=summary["p99_s"],
        polls_waiting_on_redis=len(waited),
        allowed_waiting=wait_bound(elapsed),
        connections_to_hung_redis=hung_redis.connections,
        allowed_connections=allowed_connections,
        stale_polls_after_ack=len(stale),
    )
    assert [p for p in polls if p.status != 200] == [], "a poll was not answered 200"
    assert summary["p50_s"] < SLOW, "polls kept waiting on the hung Redis"
    assert len(waited) <= wait_bound(elapsed), f"{len(waited)} polls waited on Redis"
    assert hung_redis.connections <= allowed_connections, "Redis was asked again and again"
    assert stale == [], f"polls after the write of v{acked} saw older versions: {stale[:5]}"
    assert_statistics_say_unavailable(stats)
    assert writer_saw_outage, "the writer kept waiting on Redis (its breaker did not open)"
    assert warnings == 1, "one outage, one WARNING"
