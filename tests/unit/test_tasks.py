"""The render loop and its resume rule, in-process on SQLite and fakeredis.

The Celery plumbing (delivery, ack, redelivery) is tested with real workers in
tests/integration/test_worker.py; here the loop is called as a plain function.
"""

from __future__ import annotations

import logging

import pytest
from celery.exceptions import Reject
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from shared import jobs
from shared.cache import get_job_with_cache, update_job_progress_with_cache
from shared.jobs import ConcurrentUpdateError
from shared.models import CacheStatsSnapshot
from shared.queue import RENDER_VIDEO, SNAPSHOT_CACHE_STATS
from shared.runtime import Runtime
from shared.schemas import Stage
from tests.renderers import SECRET
from worker import app as worker_app
from worker import process as worker_process
from worker.renderer import RESULT_URL_TEMPLATE, RenderError, SimulatedRenderer
from worker.tasks import (
    ERROR_MESSAGE_CHARS,
    MISSING,
    RETRY_BACKOFF_MAX_SECONDS,
    SUPERSEDED,
    RenderFailed,
    ResumePoint,
    Step,
    _job_id,
    is_transient,
    plan,
    redact_text,
    render_job,
    render_video,
    resume_point,
    retry_countdown,
    safe_error,
    snapshot_cache_stats,
)

R = Stage.RENDERING


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so the loop cannot catch it."""


class Recorder(SimulatedRenderer):
    """Records the work done; hooks let a test act in the middle of a step."""

    def __init__(self, hooks=None):
        super().__init__(0.0, sleep=lambda _: None)
        self.work: list[str] = []
        self.hooks = hooks or {}

    def _do(self, what: str) -> None:
        hook = self.hooks.get(what)
        if hook is not None:
            hook()
        self.work.append(what)

    def run_stage(self, job_id, stage):
        self._do(stage.value)

    def render_scene(self, job_id, index, total):
        self._do(f"scene {index}")

    def result_url(self, job_id):
        self._do("result_url")
        return super().result_url(job_id)


def full_work(scenes: int) -> list[str]:
    return [
        "scripting",
        "storyboard",
        *(f"scene {n}" for n in range(1, scenes + 1)),
        "encoding",
        "uploading",
        "result_url",
    ]


@pytest.fixture
def runtime(sqlite_url, make_settings, fake_redis):
    rt = Runtime.start(
        make_settings(database_url=sqlite_url, redis_url="redis://fake", cache_namespace="unit"),
        redis_client=fake_redis,
    )
    yield rt
    rt.close()


def new_job(runtime, scenes: int) -> int:
    with runtime.sessions() as session:
        return jobs.create_job(
            session=session, client_id="unit@test", prompt="a dog", scenes_total=scenes
        ).job_id


def db_job(runtime, job_id):
    with runtime.sessions() as session:
        return jobs.get_job(job_id, session=session)


def render(runtime, job_id, renderer):
    return render_job(job_id, sessions=runtime.sessions, renderer=renderer)


# -- the plan and the resume rule ------------------------------------------------------


def test_the_plan_lists_every_step_in_order():
    assert [str(step) for step in plan(3)] == [
        "scripting",
        "storyboard",
        "scene 1",
        "scene 2",
        "scene 3",
        "encoding",
        "uploading",
        "done",
    ]
    assert [step.key for step in plan(3)] == sorted(step.key for step in plan(3))


@pytest.mark.parametrize(
    ("stage", "scenes", "expected"),
    [
        (Stage.QUEUED, 0, ResumePoint(0, reported=False)),
        # Stages are reported before their work: a stored stage is redone, not re-reported.
        (Stage.SCRIPTING, 0, ResumePoint(0, reported=True)),
        (Stage.STORYBOARD, 0, ResumePoint(1, reported=True)),
        (R, 0, ResumePoint(2, reported=False)),
        # Scenes are reported after their work: a stored scene is done.
        (R, 1, ResumePoint(3, reported=False)),
        (R, 3, ResumePoint(5, reported=False)),
        (R, 6, ResumePoint(8, reported=False)),
        (Stage.ENCODING, 6, ResumePoint(8, reported=True)),
        (Stage.UPLOADING, 6, ResumePoint(9, reported=True)),
        (Stage.DONE, 6, ResumePoint(11, reported=True)),
    ],
)
def test_the_resume_point_follows_the_stored_progress(stage, scenes, expected):
    assert len(plan(6)) == 11
    assert resume_point(stage, scenes, 6) == expected


def test_a_resume_point_past_rendering_with_missing_scenes_still_moves_forward():
    # Not written by this worker, but possible: the stage then reports all scenes done.
    point = resume_point(Stage.ENCODING, 2, 6)
    assert point == ResumePoint(8, reported=False)
    assert plan(6)[point.index] == Step(Stage.ENCODING, 6)


# -- the render loop ------------------------------------------------------------------


def test_a_render_does_every_step_once_and_succeeds(runtime):
    job_id = new_job(runtime, 3)
    renderer = Recorder()

    assert render(runtime, job_id, renderer) == "succeeded"

    assert renderer.work == full_work(3)
    view = db_job(runtime, job_id)
    assert view.status == "succeeded"
    assert view.version == 1 + len(plan(3)), "one version per step"
    assert view.progress.percent == 100.0
    assert view.result_url == RESULT_URL_TEMPLATE.format(job_id=job_id)
    cached = get_job_with_cache(job_id)
    assert cached is not None and cached["version"] == view.version


def test_a_finished_job_is_left_alone(runtime):
    job_id = new_job(runtime, 2)
    render(runtime, job_id, Recorder())
    before = db_job(runtime, job_id)
    renderer = Recorder()

    assert render(runtime, job_id, renderer) == "succeeded"

    assert renderer.work == []
    assert db_job(runtime, job_id) == before


def test_a_missing_job_is_reported_and_nothing_runs(runtime):
    renderer = Recorder()
    assert render(runtime, 999_999, renderer) == MISSING
    assert renderer.work == []


def test_a_resumed_render_continues_after_the_stored_scene(runtime):
    job_id = new_job(runtime, 5)
    for update in [
        {"current_stage": "storyboard"},
        {"current_stage": "rendering", "scenes_completed": 2},
    ]:
        update_job_progress_with_cache(job_id, update)
    renderer = Recorder()

    assert render(runtime, job_id, renderer) == "succeeded"

    assert renderer.work == ["scene 3", "scene 4", "scene 5", "encoding", "uploading", "result_url"]
    assert db_job(runtime, job_id).version == 3 + 6


def test_a_resumed_render_redoes_the_work_of_a_stored_stage_without_reporting_it_again(runtime):
    job_id = new_job(runtime, 2)
    for stage in ["scripting", "storyboard"]:
        update_job_progress_with_cache(job_id, {"current_stage": stage})
    renderer = Recorder()

    assert render(runtime, job_id, renderer) == "succeeded"

    assert renderer.work == full_work(2)[1:]
    assert db_job(runtime, job_id).version == 1 + len(plan(2))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenes=st.integers(1, 6), crashes=st.lists(st.integers(0, 12), max_size=3))
def test_crashing_anywhere_and_resuming_never_skips_or_repeats_reported_work(
    runtime, scenes, crashes
):
    job_id = new_job(runtime, scenes)
    done: list[str] = []
    for crash_at in crashes:
        stored_before = db_job(runtime, job_id)
        renderer = Recorder()
        calls = 0

        def count(limit=crash_at):
            nonlocal calls
            calls += 1
            if calls > limit:
                raise Crash

        renderer.hooks = dict.fromkeys(full_work(scenes), count)
        try:
            render(runtime, job_id, renderer)
        except Crash:
            pass
        else:
            done += renderer.work
            break
        stored = stored_before.progress.scenes_completed
        redone = [w for w in renderer.work if w.startswith("scene ")]
        assert all(int(w.split()[1]) > stored for w in redone), "a stored scene was redone"
        done += renderer.work
    renderer = Recorder()
    render(runtime, job_id, renderer)
    done += renderer.work

    view = db_job(runtime, job_id)
    assert view.status == "succeeded"
    assert view.version == 1 + len(plan(scenes)), "a step was reported twice or skipped"
    assert set(done) == set(full_work(scenes)), "a step's work was skipped"
    for scene in range(1, scenes + 1):
        # A scene is redone only if the crash came between its work and its report.
        assert 1 <= done.count(f"scene {scene}") <= 1 + len(crashes)


def test_a_cancel_request_stops_the_render_before_the_next_scene(runtime):
    job_id = new_job(runtime, 5)

    def cancel():
        with runtime.sessions() as session:
            jobs.request_cancel(job_id, session=session)

    renderer = Recorder(hooks={"scene 2": cancel})

    assert render(runtime, job_id, renderer) == "cancelled"

    assert renderer.work == ["scripting", "storyboard", "scene 1", "scene 2"]
    view = db_job(runtime, job_id)
    assert (view.status, view.progress.current_stage, view.progress.scenes_completed) == (
        "cancelled",
        "rendering",
        2,
    )


def test_a_copy_that_falls_behind_another_stops_without_touching_the_job(runtime, caplog):
    job_id = new_job(runtime, 5)

    def other_copy_gets_ahead():
        update_job_progress_with_cache(
            job_id, {"current_stage": "rendering", "scenes_completed": 4}
        )

    renderer = Recorder(hooks={"scene 2": other_copy_gets_ahead})
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        assert render(runtime, job_id, renderer) == SUPERSEDED

    assert renderer.work == ["scripting", "storyboard", "scene 1", "scene 2"]
    view = db_job(runtime, job_id)
    assert (view.status, view.progress.scenes_completed) == ("running", 4)
    assert any("another copy" in r.message and r.levelno == logging.INFO for r in caplog.records)


def test_a_render_error_fails_the_job_with_its_message(runtime):
    job_id = new_job(runtime, 3)

    def fail():
        raise RenderError("scene 2: the prompt asks for too many cats")

    with pytest.raises(RenderFailed, match="too many cats"):
        render(runtime, job_id, Recorder(hooks={"scene 2": fail}))

    view = db_job(runtime, job_id)
    assert view.status == "failed"
    assert view.error == "scene 2: the prompt asks for too many cats"
    assert view.progress.scenes_completed == 1


def test_an_unexpected_renderer_exception_fails_the_job_and_keeps_secrets_out(runtime, caplog):
    job_id = new_job(runtime, 3)

    def crash():
        raise ConnectionError(f"redis://render:{SECRET}@10.0.0.7:6379 refused")

    with caplog.at_level(logging.INFO), pytest.raises(RenderFailed) as raised:
        render(runtime, job_id, Recorder(hooks={"encoding": crash}))

    view = db_job(runtime, job_id)
    assert view.status == "failed"
    assert view.error == "internal renderer error (ConnectionError)"
    assert SECRET not in str(raised.value) and raised.value.__cause__ is None
    assert SECRET not in caplog.text
    assert "redis://render:***@10.0.0.7" in caplog.text and "in crash" in caplog.text


def test_a_cancelled_job_is_not_failed_afterwards(runtime):
    job_id = new_job(runtime, 3)
    with runtime.sessions() as session:
        jobs.request_cancel(job_id, session=session)
    renderer = Recorder()

    assert render(runtime, job_id, renderer) == "cancelled"
    assert renderer.work == []
    assert render(runtime, job_id, renderer) == "cancelled"
    assert db_job(runtime, job_id).status == "cancelled"


# -- errors and retries ---------------------------------------------------------------


def test_render_error_messages_are_short_single_line_and_mask_url_passwords():
    message = safe_error(
        RenderError("upload to\nhttps://bob:pa55@cdn.example/x failed " + "x" * 900)
    )
    assert "pa55" not in message and "https://bob:***@cdn.example/x" in message
    assert "\n" not in message
    assert len(message) == ERROR_MESSAGE_CHARS
    assert safe_error(KeyError("secret-key-name")) == "internal renderer error (KeyError)"
    assert redact_text("'postgresql://u:p@h/db'") == "'postgresql://u:***@h/db'"


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OperationalError("SELECT 1", {}, Exception("server closed the connection")), True),
        (ConcurrentUpdateError("job 1 changed 20 times"), True),
        (DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True), True),
        (DBAPIError("SELECT 1", {}, Exception("syntax")), False),
        (IntegrityError("INSERT", {}, Exception("duplicate key")), False),
        (ValueError("bug"), False),
    ],
)
def test_only_named_transient_database_errors_are_retried(exc, transient):
    assert is_transient(exc) is transient


def test_retry_backoff_grows_exponentially_and_is_capped():
    for retries in range(10):
        ceiling = min(RETRY_BACKOFF_MAX_SECONDS, 2.0**retries)
        for _ in range(20):
            assert ceiling / 2 <= retry_countdown(retries) <= ceiling
    assert retry_countdown(30) <= RETRY_BACKOFF_MAX_SECONDS


@pytest.mark.parametrize("raw", [0, -3, "7", 2.0, True, None])
def test_a_malformed_job_id_is_rejected_without_requeue(raw):
    with pytest.raises(Reject) as rejected:
        _job_id(raw)
    assert rejected.value.requeue is False  # type: ignore[attr-defined]  # missing from the stubs


def test_the_tasks_are_registered_with_the_contract_options():
    task = worker_app.app.tasks[RENDER_VIDEO]
    assert task.name == render_video.name == RENDER_VIDEO
    assert worker_app.app.tasks[SNAPSHOT_CACHE_STATS].name == snapshot_cache_stats.name
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert not getattr(task, "autoretry_for", ())
    assert worker_app.app.conf.worker_prefetch_multiplier == 1
    assert worker_app.app.conf.task_serializer == "json"


# -- the worker process and the snapshot task ------------------------------------------


def test_a_worker_process_snapshots_once_per_interval(sqlite_url, make_settings, monkeypatch):
    settings = make_settings(
        database_url=sqlite_url, redis_url="", stats_snapshot_seconds=86_400, renderer="simulated"
    )
    monkeypatch.setattr(worker_process, "_process", None)
    process = worker_process.start_process(settings)
    try:
        assert worker_process.worker_process() is process
        assert worker_process.start_process(settings) is process, "start is idempotent"
        first, second = snapshot_cache_stats.run(), snapshot_cache_stats.run()
        with process.runtime.sessions() as session:
            rows = session.scalars(select(CacheStatsSnapshot)).all()
    finally:
        worker_process.stop_process()
    # Two calls within one day-long slot: one row (a midnight between them makes two).
    assert first is True
    assert len(rows) == 1 + (second is True)
    assert rows[0].redis_available is False
    assert worker_process._process is None


def test_a_snapshot_without_a_database_is_skipped_with_one_plain_warning(
    make_settings, monkeypatch, caplog
):
    settings = make_settings(
        database_url="postgresql+psycopg://rw:hunter2@127.0.0.1:1/nowhere",
        redis_url="",
        renderer="simulated",
    )
    monkeypatch.setattr(worker_process, "_process", None)
    worker_process.start_process(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.tasks"):
            assert snapshot_cache_stats.run() is False
    finally:
        worker_process.stop_process()
    records = [r for r in caplog.records if r.name == "worker.tasks"]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "snapshot skipped" in records[0].getMessage()
    assert records[0].exc_info is None
    assert "hunter2" not in caplog.text and "127.0.0.1" not in caplog.text


def test_the_render_reports_an_eta_once_a_scene_is_timed(runtime, monkeypatch):
    import types

    import worker.tasks

    now = [1000.0]
    monkeypatch.setattr(worker.tasks, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    job_id = new_job(runtime, 4)
    seen: dict[str, float | None] = {}

    def scene(n: int):
        def hook() -> None:
            seen[f"before scene {n}"] = db_job(runtime, job_id).progress.eta_seconds
            now[0] += 3.0  # every scene takes 3 s

        return hook

    renderer = Recorder(hooks={f"scene {n}": scene(n) for n in range(1, 5)})
    assert render(runtime, job_id, renderer) == "succeeded"
    assert seen["before scene 1"] is None  # nothing timed yet
    assert seen["before scene 2"] == pytest.approx(9.0)  # 3 scenes left x 3 s
    assert seen["before scene 4"] == pytest.approx(3.0)
    assert db_job(runtime, job_id).progress.eta_seconds is None  # finished: no estimate
