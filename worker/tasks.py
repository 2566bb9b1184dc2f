"""The Celery tasks: thin shells (decode the id, call the render loop, decide on retry).

`render_job` is the render loop. It is resumable: it reads where the job stands in
the database and continues from there, so a redelivered task (worker lost, visibility
timeout) never restarts from zero and a redelivery after completion does nothing.
Every step reports through `update_job_progress_with_cache`, which refuses to move a
job backwards: a `ProgressRegression` means another copy of this task is ahead, and
this copy stops without touching the job.

Step order and what a reported state means (the resume rule follows from it):

    scripting, storyboard       reported, then worked: the stage may be unfinished
    rendering scene 1..N        worked, then reported: scenes_completed are done
    encoding, uploading         reported, then worked
    done                        result URL fetched, then reported (status succeeded)
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

from shared import jobs
from shared.cache import get_cache_stats, update_job_progress_with_cache
from shared.db import SessionFactory
from shared.jobs import ConcurrentUpdateError
from shared.queue import RENDER_VIDEO, SNAPSHOT_CACHE_STATS
from shared.schemas import MAX_ERROR_CHARS, JobStatus, ProgressRegression, Stage
from shared.snapshots import save_snapshot
from worker.eta import SceneEta
from worker.process import worker_process
from worker.renderer import Renderer, RenderError

logger = logging.getLogger(__name__)

MAX_RETRIES = 6
RETRY_BACKOFF_SECONDS = 1.0
RETRY_BACKOFF_MAX_SECONDS = 60.0
ERROR_MESSAGE_CHARS = 500

# Outcomes of `render_job` besides the final job statuses.
SUPERSEDED = "superseded"
MISSING = "missing"

# Stages whose update is written before their work (so a resume re-runs their work).
_REPORT_FIRST = frozenset({Stage.SCRIPTING, Stage.STORYBOARD, Stage.ENCODING, Stage.UPLOADING})


@dataclass(frozen=True, slots=True)
class Step:
    """One unit of work and the progress it reports."""

    stage: Stage
    scenes_completed: int

    @property
    def reports_first(self) -> bool:
        return self.stage in _REPORT_FIRST

    @property
    def key(self) -> tuple[int, int]:
        return (self.stage.rank, self.scenes_completed)

    def __str__(self) -> str:
        if self.stage is Stage.RENDERING:
            return f"scene {self.scenes_completed}"
        return self.stage.value


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where to continue: `index` into the plan; `reported` when that step's update is in."""

    index: int
    reported: bool


def plan(scenes_total: int) -> tuple[Step, ...]:
    """Every step of a render of `scenes_total` scenes, in order."""
    return (
        Step(Stage.SCRIPTING, 0),
        Step(Stage.STORYBOARD, 0),
        *(Step(Stage.RENDERING, scene) for scene in range(1, scenes_total + 1)),
        Step(Stage.ENCODING, scenes_total),
        Step(Stage.UPLOADING, scenes_total),
        Step(Stage.DONE, scenes_total),
    )


def resume_point(stage: Stage, scenes_completed: int, scenes_total: int) -> ResumePoint:
    """The first step not known to be complete, given the progress stored in the DB.

    A work-then-report step (a scene, done) is complete once its state is stored; a
    report-then-work stage is complete only once a later state is stored.
    """
    current = (stage.rank, scenes_completed)
    steps = plan(scenes_total)
    for index, step in enumerate(steps):
        if step.key > current:
            return ResumePoint(index, reported=False)
        if step.key == current and step.reports_first:
            return ResumePoint(index, reported=True)
    return ResumePoint(len(steps), reported=True)


_URL_PASSWORD = re.compile(r"(://[^\s/:@]*:)[^\s/@]+@")


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it masked."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def safe_error(exc: BaseException) -> str:
    """The job's `error` for a renderer failure: short, and free of secrets."""
    if isinstance(exc, RenderError):
        # Renderers promise RenderError messages are user-safe; still mask URL passwords.
        message = redact_text(" ".join(str(exc).split())) or "render failed"
    else:
        # Arbitrary exceptions may quote connection strings or internals: type only.
        message = f"internal renderer error ({type(exc).__name__})"
    return message[: min(ERROR_MESSAGE_CHARS, MAX_ERROR_CHARS)]


class _Stop(Exception):
    """Ends the render loop early with an outcome."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class RenderFailed(Exception):
    """The renderer failed; the job is marked failed. The message is the job's error."""


class _Render:
    """One run of the render loop for one job."""

    def __init__(self, job_id: int, sessions: SessionFactory, renderer: Renderer) -> None:
        self.job_id = job_id
        self.sessions = sessions
        self.renderer = renderer

    def report(self, progress: dict[str, Any]) -> None:
        try:
            found = update_job_progress_with_cache(self.job_id, progress)
        except ProgressRegression as exc:
            logger.info(
                "job %s: another copy of the task is ahead (%s); this copy stops",
                self.job_id,
                exc.message,
            )
            raise _Stop(SUPERSEDED) from None
        if not found:
            logger.warning("job %s vanished during its render; stopping", self.job_id)
            raise _Stop(MISSING)

    def cancel_requested(self) -> bool:
        with self.sessions() as session:
            return jobs.is_cancel_requested(self.job_id, session=session)

    def work(self, step: Step, total: int) -> str | None:
        """Run the renderer for a step; returns the result URL for the done step."""
        try:
            if step.stage is Stage.RENDERING:
                self.renderer.render_scene(self.job_id, step.scenes_completed, total)
            elif step.stage is Stage.DONE:
                return self.renderer.result_url(self.job_id)
            else:
                self.renderer.run_stage(self.job_id, step.stage)
        # The renderer is pluggable: any failure of it fails the job (translated, re-raised).
        except Exception as exc:  # noqa: BLE001
            message = safe_error(exc)
            # The stack without exc_info: an arbitrary exception's text may hold secrets.
            logger.error(
                "job %s: renderer failed at %s: %s: %s\n%s",
                self.job_id,
                step,
                type(exc).__name__,
                redact_text(str(exc))[:ERROR_MESSAGE_CHARS],
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )
            self.report({"status": JobStatus.FAILED.value, "error": message})
            raise RenderFailed(message) from None
        return None

    def run(self) -> str:
        with self.sessions() as session:
            job = jobs.get_job(self.job_id, session=session)
        if job is None:
            logger.warning("job %s does not exist; nothing to render", self.job_id)
            return MISSING
        if job.finished:
            logger.info("job %s is already %s; nothing to do", self.job_id, job.status.value)
            return job.status.value
        progress = job.progress
        total = progress.scenes_total
        steps = plan(total)
        start = resume_point(progress.current_stage, progress.scenes_completed, total)
        if start.index or start.reported:
            logger.info(
                "job %s: resuming at %s (stored: %s, %d/%d scenes)",
                self.job_id,
                steps[start.index] if start.index < len(steps) else "the end",
                progress.current_stage.value,
                progress.scenes_completed,
                total,
            )
        # Scene durations since this run started (a resumed run times its own scenes).
        eta = SceneEta()
        for index in range(start.index, len(steps)):
            step = steps[index]
            if self.cancel_requested():
                logger.info("job %s: cancelled at %s", self.job_id, step)
                self.report({"status": JobStatus.CANCELLED.value})
                return JobStatus.CANCELLED.value
            update: dict[str, Any] = {
                "current_stage": step.stage.value,
                "scenes_completed": step.scenes_completed,
            }
            if step.reports_first and not (index == start.index and start.reported):
                self.report(update)
            if step.stage is Stage.RENDERING:
                eta.begin(time.monotonic())
            result_url = self.work(step, total)
            if step.stage is Stage.RENDERING:
                eta.scene_done(time.monotonic())
                update["eta_seconds"] = eta.eta(total - step.scenes_completed)
            if step.stage is Stage.DONE:
                assert result_url is not None
                update |= {"status": JobStatus.SUCCEEDED.value, "result_url": result_url}
            if not step.reports_first:
                self.report(update)
        return JobStatus.SUCCEEDED.value


def render_job(job_id: int, *, sessions: SessionFactory, renderer: Renderer) -> str:
    """Render the job from where the DB says it stands; returns the outcome.

    Outcomes: the job's final status, `superseded` (another copy is ahead) or
    `missing`. Raises `RenderFailed` after marking the job failed.
    """
    try:
        return _Render(job_id, sessions, renderer).run()
    except _Stop as stop:
        return stop.outcome


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: lost connection, server going away, write race."""
    if isinstance(exc, OperationalError | DisconnectionError | ConcurrentUpdateError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def retry_countdown(retries: int) -> float:
    """Exponential backoff with full jitter, capped."""
    ceiling = min(RETRY_BACKOFF_MAX_SECONDS, RETRY_BACKOFF_SECONDS * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


def _job_id(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        # A malformed message will never succeed: drop it rather than redeliver it forever.
        raise Reject(f"render_video needs a positive integer job id, got {raw!r}", requeue=False)
    return raw


@shared_task(
    name=RENDER_VIDEO,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MAX_RETRIES,
    ignore_result=True,
)
def render_video(self: Task[Any, Any], job_id: int) -> str:
    """Render one job, resuming from its stored progress; retried on transient DB errors."""
    job_id = _job_id(job_id)
    process = worker_process()
    try:
        return render_job(job_id, sessions=process.runtime.sessions, renderer=process.renderer)
    except (DBAPIError, DisconnectionError, ConcurrentUpdateError) as exc:
        if not is_transient(exc):
            raise
        # Whole seconds: RabbitMQ's delayed delivery for quorum queues (README "Choosing a
        # broker") truncates a countdown to seconds and rejects the task, for good, when
        # that leaves 0 -- which every first retry (0.5-1 s) would.
        countdown = math.ceil(retry_countdown(self.request.retries))
        logger.warning(
            "job %s: transient database error (%s); retry %d/%d in %.1fs",
            job_id,
            type(exc).__name__,
            self.request.retries + 1,
            MAX_RETRIES,
            countdown,
        )
        raise self.retry(exc=exc, countdown=countdown) from None


@shared_task(name=SNAPSHOT_CACHE_STATS, ignore_result=True)
def snapshot_cache_stats() -> bool:
    """Store this interval's cache statistics; False when the interval already has them."""
    process = worker_process()
    settings = process.runtime.settings
    try:
        with process.runtime.sessions() as session:
            saved = save_snapshot(
                get_cache_stats(),
                session=session,
                interval_seconds=settings.stats_snapshot_seconds,
                retention=settings.stats_retention,
            )
    except (OperationalError, DisconnectionError) as exc:
        # The next beat tick is the retry (the entry expires within its interval): one
        # plain line per skipped interval, the type only (driver text names the host).
        logger.warning(
            "cache statistics snapshot skipped: the database is unavailable (%s)",
            type(exc).__name__,
        )
        return False
    logger.debug("cache statistics snapshot %s", "saved" if saved else "already taken")
    return saved
