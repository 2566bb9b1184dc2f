"""The render task in real Celery worker processes (prefork), no eager mode.

Services: PostgreSQL (jobs), the shared Redis (cache, under the test's namespace) and
a private redis-server as the broker with a per-test queue, so that short visibility
timeouts and killed workers never touch anyone else's messages. The test process
runs its own `Runtime` with the same settings and watches the job through
`get_job_with_cache` and the job's pub/sub channel (which carries every version).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from shared import jobs
from shared.cache import get_job_with_cache, update_job_progress_with_cache
from shared.queue import create_celery, enqueue_render
from shared.runtime import Runtime
from shared.schemas import JobView
from tests import procs
from tests.renderers import (
    FAILURE_MESSAGE,
    RENDER_LOG_ENV,
    SECRET,
    renderer_log,
)
from worker.renderer import RESULT_URL_TEMPLATE

pytestmark = [pytest.mark.celery, pytest.mark.redis, pytest.mark.postgres]

RECORDING = "tests.renderers:RecordingRenderer"
FINISH_TIMEOUT = 60.0


def expected_steps(scenes: int) -> list[tuple[str, int]]:
    """(stage, scenes_completed) of every version a full render publishes, in order."""
    return [
        ("scripting", 0),
        ("storyboard", 0),
        *(("rendering", n) for n in range(1, scenes + 1)),
        ("encoding", scenes),
        ("uploading", scenes),
        ("done", scenes),
    ]


class Watch:
    """Every version published on a job's channel, in arrival order."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(channel)
        # Wait for the server's confirmation, so that no early version can be missed.
        procs.wait_until(
            lambda: (m := self.pubsub.get_message(timeout=0.1)) and m["type"] == "subscribe",
            timeout=5,
            what="the pub/sub subscription",
        )
        self.views: list[dict[str, Any]] = []

    def drain(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        while True:
            message = self.pubsub.get_message(timeout=timeout)
            if message is None:
                return self.views
            if message["type"] == "message":
                self.views.append(orjson.loads(message["data"]))

    def close(self) -> None:
        self.pubsub.close()


@dataclass
class Stack:
    """Settings shared by the test process and its workers, plus helpers."""

    runtime: Runtime
    tmp_path: Path
    redis_client: redis.Redis
    celery: Any = None
    watches: list[Watch] = field(default_factory=list)

    @property
    def settings(self) -> Any:
        return self.runtime.settings

    @property
    def render_log(self) -> Path:
        return self.tmp_path / "renders.log"

    def worker(self, *, concurrency: int = 1, pool: str = "prefork", **overrides: object) -> Any:
        env = procs.settings_env(self.settings, **overrides)
        env[RENDER_LOG_ENV] = str(self.render_log)
        return procs.celery_worker(
            env,
            self.tmp_path,
            queue=self.settings.celery_queue,
            concurrency=concurrency,
            pool=pool,
        )

    def create_job(self, scenes: int) -> int:
        with self.runtime.sessions() as session:
            view = jobs.create_job(
                session=session, client_id="worker@test", prompt="a cat", scenes_total=scenes
            )
        return view.job_id

    def enqueue(self, job_id: int) -> str:
        return enqueue_render(self.celery, job_id)

    def db_job(self, job_id: int) -> JobView:
        with self.runtime.sessions() as session:
            view = jobs.get_job(job_id, session=session)
        assert view is not None
        return view

    def watch(self, job_id: int) -> Watch:
        watch = Watch(self.redis_client, self.runtime.cache.keys.channel(job_id))
        self.watches.append(watch)
        return watch

    def wait_finished(self, job_id: int, timeout: float = FINISH_TIMEOUT) -> JobView:
        view: JobView = procs.wait_until(
            lambda: (v := self.db_job(job_id)).finished and v,
            timeout=timeout,
            what=f"job {job_id} to finish",
        )
        return view


def task_done(worker: Any, task_id: str, outcome: str = r"'\w+'") -> str:
    """Wait until the worker logs the task's return value; returns it (unquoted)."""
    match = worker.wait_for_log(
        rf"{task_id}\] succeeded in [\d.]+s: ({outcome})", timeout=FINISH_TIMEOUT
    )
    return str(match.group(1)).strip("'")


@pytest.fixture
def stack(pg_url, redis_url, namespace, broker_url, make_settings, tmp_path) -> Iterator[Stack]:
    settings = make_settings(
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_broker_url=broker_url,
        celery_queue=f"test-{namespace}",
        scene_seconds=0.05,
        log_level="INFO",
    )
    runtime = Runtime.start(settings)
    client = redis.Redis.from_url(redis_url)
    st = Stack(runtime=runtime, tmp_path=tmp_path, redis_client=client)
    st.celery = create_celery(settings)
    try:
        yield st
    finally:
        for watch in st.watches:
            watch.close()
        st.celery.close()
        client.close()
        runtime.close()


@pytest.mark.timeout(120)
def test_job_goes_from_queued_to_succeeded_with_every_version_in_order(stack):
    scenes = 4
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    polled: list[int] = []
    with stack.worker(renderer="simulated"):
        stack.enqueue(job_id)
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            watch.drain(timeout=0.01)
            job = get_job_with_cache(job_id)
            assert job is not None
            polled.append(job["version"])
            if job["status"] == "succeeded":
                break
            assert time.monotonic() < deadline, f"job still {job['status']}"
    watch.drain(timeout=0.5)

    published = watch.views
    assert [v["version"] for v in published] == list(range(2, 2 + len(expected_steps(scenes))))
    assert [
        (v["progress"]["current_stage"], v["progress"]["scenes_completed"]) for v in published
    ] == expected_steps(scenes)
    assert [v["status"] for v in published] == ["running"] * (len(published) - 1) + ["succeeded"]
    percents = [v["progress"]["percent"] for v in published]
    assert percents == sorted(percents)
    assert polled == sorted(polled), "a poll went back to an older version"

    final = get_job_with_cache(job_id)
    assert final is not None
    assert final["version"] == published[-1]["version"] == stack.db_job(job_id).version
    assert final["progress"]["percent"] == 100.0
    assert final["result_url"] == RESULT_URL_TEMPLATE.format(job_id=job_id)
    assert final["error"] is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_pools_without_children_build_their_runtime_in_the_main_process(stack, pool):
    job_id = stack.create_job(2)
    with stack.worker(pool=pool, renderer=RECORDING) as worker:
        assert task_done(worker, stack.enqueue(job_id)) == "succeeded"
        assert worker.child_pids() == []
        log = worker.log()

    assert f"worker process {worker.pid} ready" in log
    assert {pid for pid, *_ in renderer_log(stack.render_log)} == {worker.pid}
    assert stack.db_job(job_id).status == "succeeded"


@pytest.mark.timeout(120)
def test_cancel_stops_the_render_at_the_next_scene(stack):
    scenes = 40
    job_id = stack.create_job(scenes)
    with stack.worker(renderer=RECORDING, scene_seconds=0.2) as worker:
        task_id = stack.enqueue(job_id)
        procs.wait_until(
            lambda: stack.db_job(job_id).progress.scenes_completed >= 2,
            timeout=FINISH_TIMEOUT,
            what="two rendered scenes",
        )
        with stack.runtime.sessions() as session:
            assert jobs.request_cancel(job_id, session=session)
        assert task_done(worker, task_id) == "cancelled"

    final = stack.db_job(job_id)
    assert final.status == "cancelled"
    assert final.progress.current_stage == "rendering"
    done = final.progress.scenes_completed
    assert 2 <= done < scenes
    # The task has returned: the scenes rendered are exactly those reported, no more.
    rendered = [int(what) for _, _, kind, what in renderer_log(stack.render_log) if kind == "scene"]
    assert rendered == list(range(1, done + 1))
    assert stack.db_job(job_id).version == final.version
    cached = get_job_with_cache(job_id)
    assert cached is not None and cached["status"] == "cancelled"


@pytest.mark.timeout(120)
def test_a_redelivered_task_resumes_from_the_stored_progress(stack):
    scenes = 6
    job_id = stack.create_job(scenes)
    for stage, done in [("scripting", 0), ("storyboard", 0)] + [
        ("rendering", n) for n in (1, 2, 3)
    ]:
        assert update_job_progress_with_cache(
            job_id, {"current_stage": stage, "scenes_completed": done}
        )
    before = stack.db_job(job_id)
    assert (before.version, before.progress.scenes_completed) == (6, 3)
    watch = stack.watch(job_id)

    with stack.worker(renderer=RECORDING) as worker:
        assert task_done(worker, stack.enqueue(job_id)) == "succeeded"

    work = [(kind, what) for _, _, kind, what in renderer_log(stack.render_log)]
    assert work == [
        ("scene", "4"),
        ("scene", "5"),
        ("scene", "6"),
        ("stage", "encoding"),
        ("stage", "uploading"),
    ]
    published = watch.drain(timeout=0.5)
    assert [v["version"] for v in published] == list(range(7, 13))
    assert [
        (v["progress"]["current_stage"], v["progress"]["scenes_completed"]) for v in published
    ] == expected_steps(scenes)[5:]
    final = stack.db_job(job_id)
    assert (final.status, final.version) == ("succeeded", 12)


@pytest.mark.timeout(120)
def test_a_duplicate_delivery_of_a_finished_job_changes_nothing(stack):
    job_id = stack.create_job(3)
    with stack.worker(renderer=RECORDING) as worker:
        assert task_done(worker, stack.enqueue(job_id)) == "succeeded"
        finished = stack.db_job(job_id)
        work_before = renderer_log(stack.render_log)
        watch = stack.watch(job_id)

        assert task_done(worker, stack.enqueue(job_id)) == "succeeded"

    assert stack.db_job(job_id) == finished
    assert renderer_log(stack.render_log) == work_before
    assert watch.drain(timeout=0.3) == []


@pytest.mark.timeout(120)
def test_two_copies_delivered_at_once_publish_each_version_once(stack):
    scenes = 8
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    with stack.worker(concurrency=2, renderer=RECORDING) as worker:
        first, second = stack.enqueue(job_id), stack.enqueue(job_id)
        outcomes = {task_done(worker, first), task_done(worker, second)}
    assert outcomes <= {"succeeded", "superseded"}
    assert "succeeded" in outcomes

    published = watch.drain(timeout=0.5)
    assert [v["version"] for v in published] == list(range(2, 2 + len(expected_steps(scenes))))
    assert [
        (v["progress"]["current_stage"], v["progress"]["scenes_completed"]) for v in published
    ] == expected_steps(scenes)
    assert stack.db_job(job_id).status == "succeeded"


@pytest.mark.timeout(120)
def test_a_renderer_error_fails_the_job_with_its_message(stack):
    job_id = stack.create_job(5)
    with stack.worker(renderer="tests.renderers:FailingRenderer") as worker:
        task_id = stack.enqueue(job_id)
        worker.wait_for_log(rf"{task_id}\] raised unexpected: RenderFailed", timeout=60)

    final = stack.db_job(job_id)
    assert final.status == "failed"
    assert final.error == FAILURE_MESSAGE
    assert (final.progress.current_stage, final.progress.scenes_completed) == ("rendering", 1)
    cached = get_job_with_cache(job_id)
    assert cached is not None
    assert (cached["status"], cached["error"]) == ("failed", FAILURE_MESSAGE)


@pytest.mark.timeout(120)
def test_an_unexpected_renderer_crash_fails_the_job_without_leaking_its_message(stack):
    job_id = stack.create_job(5)
    with stack.worker(renderer="tests.renderers:CrashingRenderer") as worker:
        task_id = stack.enqueue(job_id)
        worker.wait_for_log(rf"{task_id}\] raised unexpected: RenderFailed", timeout=60)
        log = worker.log()

    final = stack.db_job(job_id)
    assert final.status == "failed"
    assert final.error == "internal renderer error (ConnectionError)"
    assert SECRET not in log
    assert "redis://render:***@10.0.0.7" in log, "the failure should still be logged"


@pytest.mark.faults
@pytest.mark.timeout(180)
def test_a_killed_worker_child_is_replaced_and_the_job_resumes(stack):
    scenes = 12
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    with stack.worker(renderer=RECORDING, scene_seconds=0.3, task_visibility_timeout=5) as worker:
        stack.enqueue(job_id)
        reported = procs.wait_until(
            lambda: (n := stack.db_job(job_id).progress.scenes_completed) >= 3 and n,
            timeout=FINISH_TIMEOUT,
            what="three rendered scenes",
        )
        children = worker.child_pids()
        assert len(children) == 1, f"expected one pool process, found {children}"
        os.kill(children[0], signal.SIGKILL)
        final = stack.wait_finished(job_id)
        worker.wait_for_log(r"signal 9 \(SIGKILL\)", timeout=10)

    assert final.status == "succeeded"
    scene_work = [(pid, int(what)) for pid, _, kind, what in renderer_log(stack.render_log)
                  if kind == "scene"]  # fmt: skip
    rendered = [scene for _, scene in scene_work]
    assert set(rendered) == set(range(1, scenes + 1))
    for scene in range(1, reported + 1):
        assert rendered.count(scene) == 1, f"scene {scene} was rendered again after the kill"
    pids = {pid for pid, _ in scene_work}
    assert children[0] in pids and len(pids) == 2, "the job should finish in a new process"

    published = watch.drain(timeout=0.5)
    assert [v["version"] for v in published] == list(range(2, 2 + len(expected_steps(scenes))))
