"""End-to-end: the services of docker-compose.yml as real processes, used as a user would.

One stack per module (see conftest.py): a key from `renderwatch create-key`, jobs over
HTTP rendered by the real worker, the cache statistics counted across the two API
processes, beat's snapshots, Flower's view of the tasks, /metrics, and the compose
healthchecks themselves (they pass for the stack and fail for what is not there).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.e2e.conftest import RunningStack

# The first test of the module also pays for starting the stack (its fixture setup).
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.celery,
    pytest.mark.timeout(300),
]

T = TypeVar("T")
RENDER_TASK = "renderwatch.render_video"
SNAPSHOT_TASK = "renderwatch.snapshot_cache_stats"
JOBS = 20
SCENES = 3
CLIENTS = (
    "e2e-alice@example.com",
    "e2e-bob@example.com",
    "e2e-carol@example.com",
    "e2e-dave@example.com",
)


def eventually(probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def statistics(http: httpx.Client, key: str) -> dict[str, Any]:
    response = http.get("/api/v2/cache/stats", headers=bearer(key))
    assert response.status_code == 200, response.text
    stats: dict[str, Any] = response.json()["statistics"]
    return stats


def settled_statistics(http: httpx.Client, key: str, *, timeout: float = 15.0) -> dict[str, Any]:
    """The global statistics once every process has flushed its counts.

    Each process counts locally and flushes to Redis at least every
    CACHE_STATS_FLUSH_SECONDS (1 s): two answers 1.5 s apart that agree mean no count was
    still on its way. Bounded: an answer that keeps moving fails the test."""
    deadline = time.monotonic() + timeout
    last = statistics(http, key)
    while True:
        time.sleep(1.5)
        now = statistics(http, key)
        if now["hits"] + now["misses"] == last["hits"] + last["misses"]:
            return now
        assert time.monotonic() < deadline, f"statistics still moving after {timeout}s"
        last = now


@dataclass
class Rendered:
    """Jobs submitted by several clients and polled to the end, with the polls it took.

    `key` and `job_ids` are the first client's; `all_job_ids`, `owner` and `keys` cover
    every client.
    """

    key: str
    job_ids: list[int]
    all_job_ids: list[int]
    owner: dict[int, str]
    keys: dict[str, str]
    polls: int
    stats_before: dict[str, Any]
    stats_after: dict[str, Any]
    finals: dict[int, dict[str, Any]]


def submit(http: httpx.Client, key: str, n: int) -> int:
    response = http.post(
        "/api/v2/jobs",
        json={"prompt": f"a lighthouse in a storm, take {n}", "scenes_total": SCENES},
        headers=bearer(key),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["status_url"] == f"/api/v2/jobs/{body['job_id']}"
    assert response.headers["Location"] == body["status_url"]
    return int(body["job_id"])


def poll_until_done(
    stack: RunningStack, key: str, job_ids: list[int]
) -> tuple[int, dict[int, dict[str, Any]]]:
    """One client's polling loop (its own connection); returns (polls, final objects)."""
    polls = 0
    finals: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 150
    with stack.http() as http:
        while len(finals) < len(job_ids):
            assert time.monotonic() < deadline, f"not finished: {set(job_ids) - set(finals)}"
            for job_id in job_ids:
                if job_id in finals:
                    continue
                response = http.get(f"/api/v2/jobs/{job_id}", headers=bearer(key))
                polls += 1
                assert response.status_code == 200, response.text
                job = response.json()
                assert job["status"] in ("queued", "running", "succeeded"), job
                if job["status"] == "succeeded":
                    finals[job_id] = job
            time.sleep(0.1)
    return polls, finals


@pytest.fixture(scope="module")
def rendered(stack: RunningStack) -> Rendered:
    """CLIENTS clients submit JOBS jobs in all and poll them, concurrently, to `succeeded`."""
    keys = {client: stack.create_key(client) for client in CLIENTS}
    mine: dict[str, list[int]] = {client: [] for client in CLIENTS}
    with stack.http() as http:
        for n in range(JOBS):
            client = CLIENTS[n % len(CLIENTS)]
            mine[client].append(submit(http, keys[client], n))
        stats_before = settled_statistics(http, keys[CLIENTS[0]])
    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        results = list(
            pool.map(lambda client: poll_until_done(stack, keys[client], mine[client]), CLIENTS)
        )
    with stack.http() as http:
        stats_after = settled_statistics(http, keys[CLIENTS[0]])
    finals = {job_id: job for _, done in results for job_id, job in done.items()}
    owner = {job_id: client for client, ids in mine.items() for job_id in ids}
    first = CLIENTS[0]
    return Rendered(
        key=keys[first],
        job_ids=mine[first],
        all_job_ids=sorted(owner),
        owner=owner,
        keys=keys,
        polls=sum(polls for polls, _ in results),
        stats_before=stats_before,
        stats_after=stats_after,
        finals=finals,
    )


def test_jobs_submitted_over_http_render_to_succeeded(rendered: Rendered) -> None:
    assert sorted(rendered.finals) == rendered.all_job_ids
    assert len(rendered.all_job_ids) == JOBS
    for job_id, job in rendered.finals.items():
        assert job["job_id"] == job_id
        assert job["client_id"] == rendered.owner[job_id]
        assert job["progress"] == {
            "current_stage": "done",
            "scenes_completed": SCENES,
            "scenes_total": SCENES,
            "percent": 100.0,
            # A finished job has nothing left to estimate.
            "eta_seconds": None,
        }
        assert job["error"] is None
        # Every stage and scene was a versioned write: far more than the first version.
        assert job["version"] > SCENES + 1


def test_every_poll_is_one_cache_read_counted_exactly(
    stack: RunningStack, rendered: Rendered
) -> None:
    # While the jobs rendered: the worker writes but never reads through the cache, so
    # the global counters moved by exactly the polls the API served.
    before, after = rendered.stats_before, rendered.stats_after
    served = (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])
    assert served == rendered.polls

    # Quiet now: polls on fresh connections, which the kernel spreads over both API
    # processes; the counters are global, so the sum is still exact.
    reads = 40
    with stack.http() as http:
        start = settled_statistics(http, rendered.key)
        for n in range(reads):
            job_id = rendered.all_job_ids[n % len(rendered.all_job_ids)]
            key = rendered.keys[rendered.owner[job_id]]
            response = http.get(
                f"/api/v2/jobs/{job_id}", headers={**bearer(key), "Connection": "close"}
            )
            assert response.status_code == 200
        end = settled_statistics(http, rendered.key)
    assert (end["hits"] + end["misses"]) - (start["hits"] + start["misses"]) == reads
    assert end["total_requests"] - start["total_requests"] == reads
    # Finished jobs were cached on their last write: these polls were hits.
    assert end["hits"] - start["hits"] == reads
    assert end["redis_available"] is True


def test_the_api_runs_two_worker_processes(stack: RunningStack) -> None:
    group = stack.local().pid("api")
    proc = Path("/proc")
    if not proc.is_dir():
        pytest.skip("needs /proc to list the API's processes")
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited while we looked
        # Field 5 of /proc/PID/stat (after the parenthesised command) is the group id.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == group and b"resource_tracker" not in cmdline:
            members.append(int(entry.name))
    # uvicorn's supervisor plus API_WORKERS=2 serving processes.
    assert len(members) >= 3, members


def test_etag_poll_answers_304_until_the_job_changes(
    rendered: Rendered, stack: RunningStack
) -> None:
    job_id = rendered.job_ids[0]
    with stack.http() as http:
        first = http.get(f"/api/v2/jobs/{job_id}", headers=bearer(rendered.key))
        etag = first.headers["ETag"]
        assert etag == f'"{first.json()["version"]}"'
        again = http.get(
            f"/api/v2/jobs/{job_id}", headers={**bearer(rendered.key), "If-None-Match": etag}
        )
    assert again.status_code == 304
    assert again.content == b""


def test_keys_and_ownership_over_http(stack: RunningStack, rendered: Rendered) -> None:
    job_id = rendered.job_ids[0]
    other = stack.create_key("e2e-mallory@example.com")
    with stack.http() as http:
        anonymous = http.get(f"/api/v2/jobs/{job_id}")
        assert anonymous.status_code == 401, anonymous.text
        bad = http.get(f"/api/v2/jobs/{job_id}", headers=bearer("rw_not-a-key"))
        assert bad.status_code == 401, bad.text
        # Another client's job answers exactly like a job that does not exist.
        foreign = http.get(f"/api/v2/jobs/{job_id}", headers=bearer(other))
        missing = http.get("/api/v2/jobs/999999999", headers=bearer(other))
        assert foreign.status_code == 404, foreign.text
        assert missing.status_code == 404, missing.text
        assert foreign.json().keys() == missing.json().keys()
        listing = http.get("/api/v2/jobs", headers=bearer(rendered.key))
    assert listing.status_code == 200, listing.text
    listed = [job["job_id"] for job in _items(listing.json())]
    assert listed[: len(rendered.job_ids)] == sorted(rendered.job_ids, reverse=True)


def _items(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, list):
        return body
    for name in ("items", "jobs"):
        if isinstance(body.get(name), list):
            items: list[dict[str, Any]] = body[name]
            return items
    raise AssertionError(f"no list of jobs in {body!r}")


def test_cancel_stops_a_running_render(stack: RunningStack, rendered: Rendered) -> None:
    with stack.http() as http:
        created = http.post(
            "/api/v2/jobs",
            json={"prompt": "a very long film", "scenes_total": 1000},
            headers=bearer(rendered.key),
        )
        assert created.status_code == 202
        url = created.json()["status_url"]

        def running() -> dict[str, Any] | None:
            job: dict[str, Any] = http.get(url, headers=bearer(rendered.key)).json()
            return job if job["progress"]["scenes_completed"] > 0 else None

        eventually(running, timeout=30, what="the render to start its scenes")
        cancel = http.post(f"{url}/cancel", headers=bearer(rendered.key))
        assert cancel.status_code == 202, cancel.text

        def cancelled() -> dict[str, Any] | None:
            job: dict[str, Any] = http.get(url, headers=bearer(rendered.key)).json()
            return job if job["status"] == "cancelled" else None

        job = eventually(cancelled, timeout=30, what="the job to be cancelled")
    assert job["progress"]["scenes_completed"] < 1000


def test_beat_snapshots_show_in_the_stats_history(stack: RunningStack, rendered: Rendered) -> None:
    with stack.http() as http:

        def snapshots() -> list[dict[str, Any]] | None:
            response = http.get("/api/v2/cache/stats/history", headers=bearer(rendered.key))
            assert response.status_code == 200, response.text
            items: list[dict[str, Any]] = response.json()["items"]
            return items if len(items) >= 2 else None

        items = eventually(snapshots, timeout=60, what="two beat snapshots (one per second)")
    taken = [item["taken_at"] for item in items]
    assert taken == sorted(taken, reverse=True)  # newest first
    for item in items:
        assert {"hits", "misses", "errors", "hit_rate", "redis_available"} <= item.keys()
    # Snapshots are taken after the renders began: they saw this stack's reads.
    assert items[0]["hits"] + items[0]["misses"] > 0


def test_flower_shows_the_worker_and_its_successful_tasks(
    stack: RunningStack, rendered: Rendered
) -> None:
    with httpx.Client(base_url=stack.flower_url, timeout=10.0, trust_env=False) as flower:
        workers = flower.get("/api/workers", params={"refresh": "true"})
        assert workers.status_code == 200, workers.text
        if stack.worker_node is None:
            assert workers.json(), "Flower knows no worker"
        else:
            assert stack.worker_node in workers.json()

        def tasks(name: str) -> dict[str, dict[str, Any]]:
            response = flower.get(
                "/api/tasks",
                params={"taskname": name}
                | ({"workername": stack.worker_node} if stack.worker_node else {}),
            )
            assert response.status_code == 200, response.text
            found: dict[str, dict[str, Any]] = response.json()
            return found

        def renders_succeeded() -> dict[int, str] | None:
            states = {}
            for task in tasks(RENDER_TASK).values():
                for job_id in rendered.all_job_ids:
                    if task.get("args") in (f"[{job_id}]", f"({job_id},)"):
                        states[job_id] = task["state"]
            done = all(states.get(job_id) == "SUCCESS" for job_id in rendered.all_job_ids)
            return states if done else None

        eventually(renders_succeeded, timeout=30, what="Flower to show each render as SUCCESS")

        def snapshots_succeeded() -> list[dict[str, Any]] | None:
            ok = [t for t in tasks(SNAPSHOT_TASK).values() if t["state"] == "SUCCESS"]
            return ok or None

        eventually(snapshots_succeeded, timeout=30, what="Flower to show beat's snapshot task")


def test_metrics_answer_in_prometheus_text(stack: RunningStack) -> None:
    with stack.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE " in response.text


@pytest.mark.parametrize("service", ["api", "worker", "beat", "flower"])
def test_compose_healthchecks_pass_for_the_stack_and_fail_for_a_stranger(
    stack: RunningStack, service: str
) -> None:
    stack.local()  # under Docker, compose runs these healthchecks itself, per container
    healthy = stack.cli("healthcheck", service)
    assert healthy.returncode == 0, healthy.stderr
    # The same check pointed at something that is not running must fail, or it
    # would prove nothing about the stack.
    elsewhere = {
        "api": {"API_PORT": "1"},
        "worker": {"WORKER_NAME": "nobody-runs-this-worker"},
        "beat": {"BEAT_NAME": "nobody-runs-this-beat"},
        "flower": {"FLOWER_PORT": "1"},
    }[service]
    sick = stack.cli("healthcheck", service, **elsewhere)
    assert sick.returncode == 1, sick.stdout + sick.stderr
    assert service in sick.stderr


def test_a_client_session_with_the_cli_as_the_readme_tells_it(stack: RunningStack) -> None:
    """create-key, submit, watch (plain progress lines without a TTY) and stats, as processes."""
    key = stack.create_key("e2e-cli@example.com")
    # Flags rather than RENDERWATCH_API_* variables: they also cross `docker compose exec`.
    http = ("--api-url", stack.api_url, "--key", key)
    submitted = stack.cli(
        "submit", *http, "--prompt", "a paper boat on a river", "--scenes", str(SCENES)
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    found = re.search(r"Submitted job (\d+) \(queued\)\.", submitted.stdout)
    assert found, submitted.stdout
    job_id = found.group(1)
    assert f"Status URL: {stack.api_url}/api/v2/jobs/{job_id}" in submitted.stdout

    watched = stack.cli("watch", *http, job_id, "--interval", "0.1")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = watched.stdout.strip().splitlines()
    assert lines[-1].startswith(f"job {job_id} succeeded: {SCENES} scenes, 100%"), lines
    progress = [line for line in lines if line.startswith(f"job {job_id}: ")]
    assert progress, lines
    percents = [float(line.rsplit(maxsplit=1)[-1].rstrip("%")) for line in progress]
    assert percents == sorted(percents), "progress went backwards"

    stats = stack.cli("stats", *http)
    assert stats.returncode == 0, stats.stderr
    for row in ("hits", "misses", "hit rate", "redis available"):
        assert row in stats.stdout, stats.stdout
    for output in (submitted, watched, stats):
        assert key not in output.stdout + output.stderr, "the CLI printed the API key"
