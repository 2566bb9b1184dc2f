"""Data access for jobs: plain functions taking a keyword-only `session`.

`update_job_progress` is the only writer of progress. It runs one transaction,
bumps `version` by one and refuses any update that would move a job backwards;
a duplicate (a redelivered task repeating itself) changes nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.models import Job, utcnow
from shared.schemas import (
    MAX_PROMPT_CHARS,
    MAX_SCENES,
    InvalidProgress,
    JobStatus,
    JobView,
    ProgressInfo,
    ProgressRegression,
    ProgressUpdate,
    Stage,
    UpdateOutcome,
    percent,
)

MAX_UPDATE_ATTEMPTS = 20


class ConcurrentUpdateError(RuntimeError):
    """The row kept changing under us; the caller may retry the whole update."""


def job_view(row: Job) -> JobView:
    """The public job object for a row."""
    stage = Stage(row.stage)
    return JobView(
        job_id=row.id,
        client_id=row.client_id,
        status=JobStatus(row.status),
        progress=ProgressInfo(
            current_stage=stage,
            scenes_completed=row.scenes_completed,
            scenes_total=row.scenes_total,
            percent=percent(stage, row.scenes_completed, row.scenes_total),
            eta_seconds=row.eta_seconds,
        ),
        version=row.version,
        error=row.error,
        result_url=row.result_url,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def get_job(job_id: int, *, session: Session) -> JobView | None:
    """The job, or None when there is no such job."""
    row = session.get(Job, job_id, populate_existing=True)
    return job_view(row) if row is not None else None


def get_job_row(job_id: int, *, session: Session) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def create_job(*, session: Session, client_id: str, prompt: str, scenes_total: int) -> JobView:
    """Insert a queued job and commit, so the row exists before any task is enqueued."""
    if not prompt or len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidProgress("prompt", f"must hold 1 to {MAX_PROMPT_CHARS} characters")
    if not 1 <= scenes_total <= MAX_SCENES:
        raise InvalidProgress("scenes_total", f"must be between 1 and {MAX_SCENES}")
    now = utcnow()
    row = Job(
        client_id=client_id,
        prompt=prompt,
        status=JobStatus.QUEUED.value,
        stage=Stage.QUEUED.value,
        scenes_completed=0,
        scenes_total=scenes_total,
        version=1,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.commit()
    return job_view(row)


def set_task_id(job_id: int, task_id: str, *, session: Session) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=task_id))
    session.commit()


def list_jobs(client_id: str, *, session: Session, limit: int, offset: int) -> list[JobView]:
    """The client's jobs, newest first."""
    rows = session.scalars(
        select(Job)
        .where(Job.client_id == client_id)
        .order_by(Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [job_view(row) for row in rows]


def jobs_updated_since(since: datetime, *, session: Session) -> list[tuple[int, str]]:
    """(job_id, client_id) of every job changed at or after `since` (for the cache's repair)."""
    rows = session.execute(select(Job.id, Job.client_id).where(Job.updated_at >= since))
    return [(job_id, client_id) for job_id, client_id in rows]


def request_cancel(job_id: int, *, session: Session) -> bool:
    """Flag a job for cancellation; the worker stops at the next scene. False if unknown."""
    result = session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def is_cancel_requested(job_id: int, *, session: Session) -> bool:
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.rollback()
    return bool(flag)


def _next_state(row: Job, upd: ProgressUpdate) -> dict[str, object] | None:
    """The columns to write, None for a duplicate; raises on invalid or regressing updates."""
    total = row.scenes_total
    if upd.scenes_total is not None and upd.scenes_total != total:
        raise InvalidProgress("scenes_total", f"is fixed at {total} for job {row.id}")
    cur_status, cur_stage = JobStatus(row.status), Stage(row.stage)
    stage = upd.current_stage or cur_stage
    scenes = upd.scenes_completed if upd.scenes_completed is not None else row.scenes_completed
    if scenes > total:
        raise InvalidProgress("scenes_completed", f"must be <= scenes_total ({total})")
    if upd.status is not None:
        status = upd.status
    elif stage is Stage.DONE:
        status = JobStatus.SUCCEEDED
    elif stage is Stage.QUEUED:
        status = cur_status
    else:
        status = JobStatus.RUNNING
    error = upd.error if upd.error is not None else row.error
    result_url = upd.result_url if upd.result_url is not None else row.result_url
    new: dict[str, object] = {
        "status": status.value,
        "stage": stage.value,
        "scenes_completed": scenes,
        "error": error,
        "result_url": result_url,
    }
    old = {
        "status": row.status,
        "stage": row.stage,
        "scenes_completed": row.scenes_completed,
        "error": row.error,
        "result_url": row.result_url,
    }
    if new == old:
        return None
    # A finished job refuses every change as a regression, before any consistency check
    # could misreport it (a duplicate of its last report was let through just above).
    if cur_status.finished:
        raise ProgressRegression("status", f"job {row.id} is already {cur_status.value}")
    if (status is JobStatus.SUCCEEDED) != (stage is Stage.DONE):
        raise InvalidProgress("status", "succeeded goes with current_stage 'done' and only with it")
    if status is JobStatus.QUEUED and stage is not Stage.QUEUED:
        raise InvalidProgress("status", "a queued job cannot be past the queued stage")
    # Each of status, stage and scenes completed only ever moves forward, on its own:
    # a later status never carries an earlier stage, nor a later stage fewer scenes.
    new_rank = (status.rank, stage.rank, scenes)
    old_rank = (cur_status.rank, cur_stage.rank, row.scenes_completed)
    behind = next((f for f, n, o in zip(_COLUMN, new_rank, old_rank, strict=True) if n < o), None)
    if behind is not None:
        raise ProgressRegression(
            behind, f"would move job {row.id} backwards from {old[_COLUMN[behind]]!r}"
        )
    if new_rank == old_rank:
        # Same progress, other details: error and result_url travel with a progress step.
        changed = next(key for key in ("error", "result_url") if new[key] != old[key])
        raise ProgressRegression(
            changed, f"can only change together with progress (job {row.id} did not advance)"
        )
    # The estimate travels with a progress step and is replaced by each one.
    new["eta_seconds"] = None if status.finished else upd.eta_seconds
    return new


# The progress fields in rank order, and the column each is stored in.
_COLUMN = {"status": "status", "current_stage": "stage", "scenes_completed": "scenes_completed"}


def update_job_progress(
    job_id: int, progress: ProgressUpdate, *, session: Session
) -> UpdateOutcome | None:
    """Apply one progress update in one transaction; None when there is no such job.

    Optimistic concurrency: the UPDATE matches the version read, so two writers
    racing on one job serialize without locks on SQLite and PostgreSQL alike.
    """
    for _ in range(MAX_UPDATE_ATTEMPTS):
        with session.begin():
            row = session.get(Job, job_id, populate_existing=True)
            if row is None:
                return None
            new = _next_state(row, progress)
            if new is None:
                return UpdateOutcome(view=job_view(row), changed=False)
            new["version"] = row.version + 1
            new["updated_at"] = utcnow()
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.version == row.version)
                .values(**new)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                for column, value in new.items():
                    setattr(row, column, value)
                view = job_view(row)
            else:
                view = None
        if view is not None:
            return UpdateOutcome(view=view, changed=True)
    raise ConcurrentUpdateError(
        f"job {job_id} changed {MAX_UPDATE_ATTEMPTS} times under one update"
    )
