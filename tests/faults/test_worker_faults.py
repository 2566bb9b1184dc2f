"""Scenarios 4, 8 and 9: duplicate delivery, killed workers, a restarted beat.

Real processes only: prefork Celery workers and beat (`celery -A worker.app ...`) on a
private redis-server broker (short visibility timeouts never touch anyone else's
messages) and, for the killed workers, on a private RabbitMQ vhost too; jobs in
PostgreSQL, the cache on the shared Redis under the test's namespace. The test process
runs its own `Runtime` and watches each job through its pub/sub channel, which carries
every new version: a version published twice, out of
order or missing shows there.

Promises checked:

4. a duplicate progress update changes nothing (no version, no publication); copies
   of `render_video` running at once (the visibility timeout redelivers a task still
   running) never move a job backwards and finish it once, consistently;
8. a job whose worker child, or whole worker, is SIGKILLed is redelivered and resumes
   from its stored progress: work already reported is not done or reported again;
9. a beat killed and restarted keeps the snapshots coming, never two in one interval.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis
from sqlalchemy import select

from renderwatch.migrate import upgrade
from shared import jobs
from shared.cache import get_job_with_cache, update_job_progress_with_cache
from shared.models import CacheStatsSnapshot
from shared.queue import SNAPSHOT_CACHE_STATS, create_celery, enqueue_render
from shared.runtime import Runtime
from shared.schemas import JobView, ProgressRegression, Stage
from shared.settings import Settings
from tests import procs
from tests.brokers import private_vhost
from tests.conftest import require
from tests.renderers import RENDER_LOG_ENV, RecordingRenderer, renderer_log

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.postgres]

RECORDING = "tests.renderers:RecordingRenderer"
SLOW_ENCODING = "tests.faults.test_worker_faults:SlowEncodingRenderer"
ENCODING_SECONDS = 1.5
VISIBILITY_TIMEOUT = 5  # the smallest the settings accept
FINISH_TIMEOUT = 60.0


class SlowEncodingRenderer(RecordingRenderer):
    """The recording renderer with a long encoding stage: a window to kill a worker in."""

    def run_stage(self, job_id: int, stage: Stage) -> None:
        if stage is Stage.ENCODING:
            time.sleep(ENCODING_SECONDS)
        super().run_stage(job_id, stage)


def steps(scenes: int) -> list[tuple[str, int]]:
    """(stage, scenes_completed) of every version a full render writes, in order."""
    return [
        ("scripting", 0),
        ("storyboard", 0),
        *(("rendering", n) for n in range(1, scenes + 1)),
        ("encoding", scenes),
        ("uploading", scenes),
        ("done", scenes),
    ]


def step_of(view: dict[str, Any]) -> tuple[str, int]:
    return view["progress"]["current_stage"], view["progress"]["scenes_completed"]


class Watch:
    """Every version published on a job's channel, in arrival order."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(channel)
        # Wait for the confirmation, so that no early version can be missed.
        procs.wait_until(
            lambda: (m := self.pubsub.get_message(timeout=0.1)) and m["type"] == "subscribe",
            timeout=5,
            what="the pub/sub subscription",
        )
        self.views: list[dict[str, Any]] = []

    def drain(self, timeout: float = 0.3) -> list[dict[str, Any]]:
        while (message := self.pubsub.get_message(timeout=timeout)) is not None:
            if message["type"] == "message":
                self.views.append(orjson.loads(message["data"]))
        return self.views


def assert_published_once_in_order(views: list[dict[str, Any]], scenes: int) -> None:
    """Each step published exactly once, in order, with versions 2, 3, ...; one ending."""
    expected = steps(scenes)
    assert [step_of(v) for v in views] == expected
    assert [v["version"] for v in views] == list(range(2, 2 + len(expected)))
    terminal = [v for v in views if v["status"] in ("succeeded", "failed", "cancelled")]
    assert [v["status"] for v in terminal] == ["succeeded"], "the job must end exactly once"


def assert_finished_consistently(view: JobView, scenes: int) -> None:
    assert view.status == "succeeded", view
    assert view.progress.current_stage == "done"
    assert view.progress.scenes_completed == view.progress.scenes_total == scenes
    assert view.progress.percent == 100.0
    assert view.version == 1 + len(steps(scenes)), "one version per step, none lost or doubled"
    assert view.error is None and view.result_url


@dataclass
class Stack:
    """Settings shared by the test process and its workers, plus helpers."""

    runtime: Runtime
    tmp_path: Path
    redis_client: redis.Redis
    celery: Any
    watches: list[Watch] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def render_log(self) -> Path:
        return self.tmp_path / "renders.log"

    def env(self, **overrides: object) -> dict[str, str]:
        env = procs.settings_env(self.settings, **overrides)
        env[RENDER_LOG_ENV] = str(self.render_log)
        return env

    def worker(self, *, concurrency: int = 1, **overrides: object) -> Any:
        return procs.celery_worker(
            self.env(**overrides),
            self.tmp_path,
            queue=self.settings.celery_queue,
            concurrency=concurrency,
        )

    def create_job(self, scenes: int) -> int:
        with self.runtime.sessions() as session:
            return jobs.create_job(
                session=session, client_id="faults@test", prompt="a fox", scenes_total=scenes
            ).job_id

    def db_job(self, job_id: int) -> JobView:
        with self.runtime.sessions() as session:
            view = jobs.get_job(job_id, session=session)
        assert view is not None
        return view

    def watch(self, job_id: int) -> Watch:
        watch = Watch(self.redis_client, self.runtime.cache.keys.channel(job_id))
        self.watches.append(watch)
        return watch

    def wait_scenes(self, job_id: int, scenes: int) -> int:
        done: int = procs.wait_until(
            lambda: (n := self.db_job(job_id).progress.scenes_completed) >= scenes and n,
            timeout=FINISH_TIMEOUT,
            what=f"{scenes} rendered scenes",
        )
        return done

    def wait_finished(self, job_id: int, *workers: Any) -> JobView:
        def finished() -> JobView | None:
            for worker in workers:
                # A task that failed outright will never finish the job: say so at once.
                assert "raised unexpected" not in worker.log(), worker.log()[-3000:]
            view = self.db_job(job_id)
            return view if view.finished else None

        view: JobView = procs.wait_until(
            finished, timeout=FINISH_TIMEOUT, what=f"job {job_id} to finish"
        )
        return view


def outcomes(log: str, task_id: str) -> list[str]:
    """Return values logged for every run of the task (one per delivery that completed)."""
    return re.findall(rf"{task_id}\] succeeded in [\d.]+s: '(\w+)'", log)


@pytest.fixture
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A private broker: a redis-server of its own, or (parametrized "amqp") a private
    virtual host on the machine's RabbitMQ."""
    if getattr(request, "param", "redis") == "amqp":
        amqp_url = request.getfixturevalue("amqp_url")
        with private_vhost(amqp_url) as url:
            yield url
        return
    require("redis-server (binary)", procs.redis_server_binary() is not None)
    with procs.private_redis(tmp_path) as url:
        yield url


# The kill scenarios on each broker: Redis redelivers through the visibility timeout,
# RabbitMQ when the dead consumer's connection closes.
on_each_broker = pytest.mark.parametrize("broker_url", ["redis", "amqp"], indirect=True)


@pytest.fixture
def stack(pg_url, redis_url, namespace, broker_url, make_settings, tmp_path) -> Iterator[Stack]:
    settings = make_settings(
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_broker_url=broker_url,
        celery_queue=f"test-{namespace}",
        scene_seconds=0.05,
        task_visibility_timeout=VISIBILITY_TIMEOUT,
        log_level="INFO",
    )
    runtime = Runtime.start(settings)
    client = redis.Redis.from_url(redis_url)
    st = Stack(runtime=runtime, tmp_path=tmp_path, redis_client=client, celery=None)
    st.celery = create_celery(settings)
    try:
        yield st
    finally:
        for watch in st.watches:
            watch.pubsub.close()
        st.celery.close()
        client.close()
        runtime.close()


# -- 4. duplicate delivery ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_same_progress_update_applied_twice_changes_nothing_the_second_time(
    stack, record_figures
):
    job_id = stack.create_job(4)
    watch = stack.watch(job_id)
    update = {"current_stage": "rendering", "scenes_completed": 2}

    assert update_job_progress_with_cache(job_id, {"current_stage": "scripting"})
    assert update_job_progress_with_cache(job_id, update)
    first = stack.db_job(job_id)
    assert update_job_progress_with_cache(job_id, update), "a duplicate is accepted"
    second = stack.db_job(job_id)

    assert second == first, "a duplicate must not bump the version or touch updated_at"
    assert [(v["version"], step_of(v)) for v in watch.drain()] == [
        (2, ("scripting", 0)),
        (3, ("rendering", 2)),
    ], "a duplicate must publish nothing"
    cached = get_job_with_cache(job_id)
    assert cached is not None and cached["version"] == 3
    record_figures(
        scenario=4,
        fault="same progress update applied twice",
        version_after_first=3,
        version_after_second=second.version,
        publications=2,
    )


@pytest.mark.timeout(60)
def test_each_version_is_published_once_even_when_redis_has_forgotten_its_scripts(
    pg_url, make_settings, tmp_path, record_figures
):
    """A restarted (or SCRIPT FLUSHed) Redis answers the pre-warm NOSCRIPT while the
    PUBLISH beside it in the same round trip has already gone out: reloading the scripts
    must re-run only what failed, or every subscriber sees that version twice."""
    require("redis-server (binary)", procs.redis_server_binary() is not None)
    with procs.private_redis(tmp_path) as url:  # private: flushing the shared one hurts others
        settings = make_settings(database_url=pg_url, redis_url=url, log_level="INFO")
        runtime = Runtime.start(settings)
        client = redis.Redis.from_url(url)
        try:
            with runtime.sessions() as session:
                job_id = jobs.create_job(
                    session=session, client_id="faults@test", prompt="a fox", scenes_total=3
                ).job_id
            watch = Watch(client, runtime.cache.keys.channel(job_id))
            # A fresh server knows no script yet; later, SCRIPT FLUSH forgets them again.
            assert update_job_progress_with_cache(job_id, {"current_stage": "scripting"})
            client.script_flush()
            assert update_job_progress_with_cache(job_id, {"current_stage": "storyboard"})
            published = [(v["version"], step_of(v)) for v in watch.drain()]
            cached = get_job_with_cache(job_id)
            watch.pubsub.close()
        finally:
            client.close()
            runtime.close()
    record_figures(
        scenario=4,
        fault="Redis forgot its scripts (fresh server, SCRIPT FLUSH) at a publication",
        updates=2,
        publications=len(published),
    )
    assert published == [(2, ("scripting", 0)), (3, ("storyboard", 0))]
    assert cached is not None and cached["version"] == 3


@pytest.mark.timeout(60)
def test_racing_copies_of_every_report_never_move_the_job_backwards(stack, record_figures):
    """Six threads replay a whole render's reports at once, like six deliveries of a task."""
    scenes = 10
    copies = 6
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    plan = steps(scenes)
    barrier = threading.Barrier(copies)
    results: list[str] = []
    seen: list[list[int]] = [[] for _ in range(copies)]

    def copy(n: int) -> None:
        barrier.wait()
        for stage, done in plan:
            update: dict[str, Any] = {"current_stage": stage, "scenes_completed": done}
            if stage == "done":
                update |= {"status": "succeeded", "result_url": f"https://x.example/{job_id}"}
            try:
                assert update_job_progress_with_cache(job_id, update)
            except ProgressRegression:
                results.append("superseded")  # another copy is ahead: stop, like the task
                return
            job = get_job_with_cache(job_id)
            assert job is not None
            seen[n].append(job["version"])
        results.append("finished")

    threads = [threading.Thread(target=copy, args=(n,)) for n in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(results) == copies, "a copy died with an unexpected error"
    assert "finished" in results
    for versions in seen:
        assert versions == sorted(versions), "a reader saw the job go backwards"
    assert_published_once_in_order(watch.drain(), scenes)
    assert_finished_consistently(stack.db_job(job_id), scenes)
    record_figures(
        scenario=4,
        fault=f"{copies} racing copies of every report",
        reports=copies * len(plan),
        copies_finished=results.count("finished"),
        copies_superseded=results.count("superseded"),
        versions_published=len(watch.views),
        steps=len(plan),
        reads_backwards=0,
    )


@pytest.mark.celery
@pytest.mark.timeout(120)
def test_a_task_redelivered_while_still_running_finishes_the_job_once(stack, record_figures):
    """The visibility timeout lapses mid-render: the broker hands the task to a second
    process while the first still runs it. Both copies race to the end."""
    scenes = 14
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    polled: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            job = get_job_with_cache(job_id)
            assert job is not None
            polled.append(job["version"])
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    # 14 scenes of 0.6 s: the render outlasts the 5 s visibility timeout.
    with stack.worker(concurrency=2, renderer=RECORDING, scene_seconds=0.6) as worker:
        task_id = enqueue_render(stack.celery, job_id)
        poller.start()
        try:
            final = stack.wait_finished(job_id, worker)
            procs.wait_until(
                lambda: len(outcomes(worker.log(), task_id)) >= 2,
                timeout=FINISH_TIMEOUT,
                what="both copies of the task to return",
            )
        finally:
            stop.set()
            poller.join(10)
        log = worker.log()

    runs = outcomes(log, task_id)
    received = len(re.findall(rf"\[{task_id}\] received", log))
    renders = [
        (pid, int(what)) for pid, _, kind, what in renderer_log(stack.render_log) if kind == "scene"
    ]
    pids = {pid for pid, _ in renders}
    published = watch.drain()
    record_figures(
        scenario=4,
        fault="visibility timeout lapsed mid-render (2 copies at once)",
        deliveries=received,
        outcomes="/".join(runs),
        rendering_processes=len(pids),
        polls=len(polled),
        polls_backwards=sum(b < a for a, b in itertools.pairwise(polled)),
        versions_published=len(published),
        steps=len(steps(scenes)),
    )
    assert received >= 2, "the visibility timeout did not redeliver the running task"
    assert len(pids) == 2, "the two copies should have run in two processes at once"
    assert set(runs) <= {"succeeded", "superseded"}, runs
    assert polled == sorted(polled), "a poll saw the job go backwards"
    assert_published_once_in_order(published, scenes)
    assert_finished_consistently(final, scenes)


# -- 8. killed workers ----------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.timeout(120)
@on_each_broker
def test_a_worker_child_killed_in_a_stage_resumes_it_without_reporting_it_again(
    stack, broker_url, record_figures
):
    """Encoding is reported before its work: the new process redoes the work, and neither
    re-renders a scene nor publishes encoding a second time."""
    scenes = 3
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    with stack.worker(renderer=SLOW_ENCODING) as worker:
        enqueue_render(stack.celery, job_id)
        procs.wait_until(
            lambda: stack.db_job(job_id).progress.current_stage == "encoding",
            timeout=FINISH_TIMEOUT,
            what="the encoding stage",
        )
        (child,) = worker.child_pids()
        os.kill(child, signal.SIGKILL)
        killed_at = time.monotonic()
        final = stack.wait_finished(job_id, worker)
        resumed_after = time.monotonic() - killed_at
        log = worker.log()

    work = renderer_log(stack.render_log)
    scene_renders = [int(what) for _, _, kind, what in work if kind == "scene"]
    encodings = [pid for pid, _, kind, what in work if what == "encoding"]
    record_figures(
        scenario=8,
        fault="worker child SIGKILLed during encoding",
        broker=broker_url.split(":", 1)[0],
        finished_after_kill_s=resumed_after,
        scenes=scenes,
        scene_renders=len(scene_renders),
        encoding_published=sum(step_of(v)[0] == "encoding" for v in watch.drain()),
    )
    assert "resuming at encoding" in log
    assert scene_renders == list(range(1, scenes + 1)), "a scene was rendered again"
    assert len(encodings) == 1 and encodings[0] != child, "encoding is redone by a new process"
    assert_published_once_in_order(watch.drain(), scenes)
    assert_finished_consistently(final, scenes)


@pytest.mark.celery
@pytest.mark.timeout(150)
@on_each_broker
def test_a_whole_worker_killed_is_redelivered_to_a_new_worker_that_resumes(
    stack, broker_url, record_figures
):
    """SIGKILL of the main process and its children: nothing can reject the task, so it
    comes back to the worker started after, through the visibility timeout on Redis,
    and on RabbitMQ as soon as the dead worker's connection is closed (unacked messages
    of a closed channel go back to the queue)."""
    scenes = 12
    job_id = stack.create_job(scenes)
    watch = stack.watch(job_id)
    with stack.worker(renderer=RECORDING, scene_seconds=0.3) as first:
        enqueue_render(stack.celery, job_id)
        reported = stack.wait_scenes(job_id, 3)
        first_children = first.child_pids()
        os.killpg(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        procs.wait_until(lambda: not first.alive(), timeout=10, what="the worker to die")
        at_kill = stack.db_job(job_id)

    # Restarted at once, as a supervisor would.
    with stack.worker(renderer=RECORDING, scene_seconds=0.3) as second:
        ready_after = time.monotonic() - killed_at
        second.wait_for_log(r"\] received", timeout=FINISH_TIMEOUT)
        redelivered_after = time.monotonic() - killed_at
        final = stack.wait_finished(job_id, second)
        log = second.log()
    resumed = [
        v for v in watch.drain() if v["version"] > at_kill.version
    ]  # what the new worker wrote
    delay = time.monotonic() - killed_at

    renders = [
        (pid, int(what)) for pid, _, kind, what in renderer_log(stack.render_log) if kind == "scene"
    ]
    rendered = [scene for _, scene in renders]
    done_at_kill = at_kill.progress.scenes_completed
    record_figures(
        scenario=8,
        fault="whole worker SIGKILLed, new worker started",
        broker=broker_url.split(":", 1)[0],
        scenes=scenes,
        scenes_done_at_kill=done_at_kill,
        visibility_timeout_s=VISIBILITY_TIMEOUT,
        new_worker_ready_after_kill_s=ready_after,
        redelivered_after_kill_s=redelivered_after,
        finished_after_kill_s=delay,
        scene_renders=len(rendered),
    )
    assert reported >= 3
    assert re.search(rf"job {job_id}: resuming at scene {done_at_kill + 1}\b", log), log[-3000:]
    assert set(rendered) == set(range(1, scenes + 1))
    for scene in range(1, done_at_kill + 1):
        assert rendered.count(scene) == 1, f"scene {scene} was rendered again after the kill"
    # Only the scene being rendered when the worker died may be rendered twice.
    assert len(rendered) - scenes <= 1
    assert {pid for pid, scene in renders if scene > done_at_kill + 1}.isdisjoint(first_children)
    assert resumed and resumed[0]["version"] == at_kill.version + 1
    assert_published_once_in_order(watch.views, scenes)
    assert_finished_consistently(final, scenes)


@pytest.mark.celery
@pytest.mark.timeout(150)
@on_each_broker
def test_a_standby_worker_takes_over_the_render_of_a_killed_worker(
    stack, broker_url, record_figures
):
    """Two idle workers on the queue; the one that took the task is SIGKILLed whole. The
    other gets it: on RabbitMQ once the dead connection is closed, on Redis once the
    visibility timeout (counted from the delivery) has lapsed. Measures kill -> redelivery
    with no worker start-up in between (the README's broker figures)."""
    scenes = 12
    job_id = stack.create_job(scenes)
    with (
        stack.worker(renderer=RECORDING, scene_seconds=0.3) as a,
        stack.worker(renderer=RECORDING, scene_seconds=0.3) as b,
    ):
        task_id = enqueue_render(stack.celery, job_id)
        stack.wait_scenes(job_id, 2)
        received = rf"\[{task_id}\] received"
        taker, standby = (a, b) if re.search(received, a.log()) else (b, a)
        assert re.search(received, taker.log()), "neither worker logged the task"
        os.killpg(taker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        procs.wait_until(lambda: not taker.alive(), timeout=10, what="the worker to die")
        at_kill = stack.db_job(job_id)
        standby.wait_for_log(received, timeout=FINISH_TIMEOUT)
        redelivered_after = time.monotonic() - killed_at
        final = stack.wait_finished(job_id, standby)
        log = standby.log()

    rendered = [int(what) for _, _, kind, what in renderer_log(stack.render_log) if kind == "scene"]
    done_at_kill = at_kill.progress.scenes_completed
    record_figures(
        scenario=8,
        fault="whole worker SIGKILLed, a standby worker idle on the queue",
        broker=broker_url.split(":", 1)[0],
        visibility_timeout_s=VISIBILITY_TIMEOUT,
        scenes_done_at_kill=done_at_kill,
        redelivered_after_kill_s=redelivered_after,
        finished_after_kill_s=time.monotonic() - killed_at,
        scene_renders=len(rendered),
    )
    assert re.search(rf"job {job_id}: resuming at scene {done_at_kill + 1}\b", log), log[-3000:]
    assert set(rendered) == set(range(1, scenes + 1))
    assert len(rendered) - scenes <= 1, "only the scene in progress may be rendered twice"
    assert_finished_consistently(final, scenes)


# -- 9. beat restarted ----------------------------------------------------------------------


@pytest.fixture
def private_pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, migrated database: the snapshot table must hold only this test's rows."""
    name = f"rw_beatfault_{uuid.uuid4().hex[:10]}"
    admin = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{pg_admin_url.rsplit('/', 1)[0]}/{name}"
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def beat(env: dict[str, str], tmp_path: Path, schedule: Path, tag: str) -> Iterator[Any]:
    """`celery beat` with a given schedule file, so that a restart reuses it."""
    args: list[str | Path] = [
        procs.CELERY, "-A", "worker.app", "beat", "-s", str(schedule),
        "--pidfile", str(tmp_path / f"beat-{tag}.pid"), "-l", "INFO",
    ]  # fmt: skip
    proc = procs.ServiceProcess(f"beat {tag}", args, env, tmp_path / f"beat-{tag}.log")
    with procs.running(proc, lambda p: p.wait_for_log(r"beat: Starting", timeout=60)) as p:
        yield p


@pytest.mark.celery
@pytest.mark.timeout(120)
def test_a_restarted_beat_keeps_snapshotting_with_one_snapshot_per_interval(
    private_pg_url, redis_url, namespace, broker_url, make_settings, tmp_path, record_figures
):
    interval = 1
    settings = make_settings(
        database_url=private_pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_broker_url=broker_url,
        celery_queue=f"test-{namespace}",
        stats_snapshot_seconds=interval,
        log_level="INFO",
    )
    runtime = Runtime.start(settings)
    celery = create_celery(settings)

    def rows() -> list[CacheStatsSnapshot]:
        with runtime.sessions() as session:
            return list(session.scalars(select(CacheStatsSnapshot).order_by(CacheStatsSnapshot.id)))

    env = procs.settings_env(settings)
    schedule = tmp_path / "beat-schedule"
    try:
        with procs.celery_worker(env, tmp_path, queue=settings.celery_queue, concurrency=2):
            with beat(env, tmp_path, schedule, "first") as first:
                procs.wait_until(lambda: len(rows()) >= 2, timeout=30, what="two snapshots")
                # A crash, not a clean stop: the schedule file is left as it was.
                os.killpg(first.pid, signal.SIGKILL)
                procs.wait_until(lambda: not first.alive(), timeout=10, what="beat to die")
            before = len(rows())
            restarted_at = time.time()
            with beat(env, tmp_path, schedule, "second"):
                # The overlap of a restart: an old beat's last send and the new one's first
                # (and any other duplicate delivery) land in the same interval.
                for _ in range(3):
                    celery.send_task(SNAPSHOT_CACHE_STATS)
                procs.wait_until(
                    lambda: sum(r.taken_at.timestamp() > restarted_at for r in rows()) >= 3,
                    timeout=30,
                    what="three snapshots after the restart",
                )
            found = rows()
    finally:
        celery.close()
        runtime.close()

    slots = [int(row.taken_at.timestamp()) // interval for row in found]
    after = [row for row in found if row.taken_at.timestamp() > restarted_at]
    span = slots[-1] - slots[0] + 1
    record_figures(
        scenario=9,
        fault="beat SIGKILLed and restarted (+3 duplicate sends)",
        snapshots_before=before,
        snapshots_after=len(after),
        rows=len(found),
        intervals=span,
        duplicates=len(slots) - len(set(slots)),
    )
    assert len(after) >= 3, "snapshots did not continue after the restart"
    assert len(slots) == len(set(slots)), f"two snapshots in one interval: {slots}"
    assert [row.slot for row in found] == slots
    assert len(found) <= span
