"""The HTTP endpoints: jobs and cache statistics under `/api/v2` (API key), plus ops endpoints.

Routes translate domain outcomes into HTTP (no job → 404, finished → 409, queue down →
503). They never guard the cache with try/except: a Redis failure degrades to the
database inside `shared.cache` and is never a 5xx.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, status
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import (
    CacheDep,
    ClientId,
    EnqueueDep,
    JobCreateBody,
    ReaderDep,
    RuntimeDep,
    Services,
    ServicesDep,
    SessionDep,
    current_client,
)
from api.errors import QueueUnavailable, job_not_found
from api.metrics import CONTENT_TYPE
from api.models import (
    MAX_HISTORY,
    MAX_JOB_ID,
    MAX_OFFSET,
    MAX_PAGE_SIZE,
    CacheStats,
    CancelAccepted,
    ErrorMessage,
    Health,
    JobCreate,
    JobCreated,
    JobList,
    Readiness,
    StatsHistory,
    ValidationErrors,
)
from shared import jobs, snapshots
from shared.cache import CachedJob, JobCache
from shared.db import run_read
from shared.schemas import JobStatus, JobView, ProgressRegression

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v2"
JSON = "application/json"
QUEUE_DOWN_ERROR = "could not enqueue: job queue unavailable"
INTERNAL_ENQUEUE_ERROR = "could not enqueue: internal error"
POLL_INTERVAL_HEADER = "X-Poll-Interval"

JobId = Annotated[
    int, Path(ge=1, le=MAX_JOB_ID, description="the job id returned by POST /api/v2/jobs")
]

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "missing or invalid API key"},
    422: {"model": ValidationErrors, "description": "invalid request: each field says why"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorMessage, "description": "no such job, or not yours (same answer)"}
}

# Every /api/v2 endpoint needs a key; the router checks it before anything else
# (before the body is read), and routes that need the client id get the same answer.
router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(current_client)])
ops = APIRouter()


def job_url(job_id: int) -> str:
    return f"{API_PREFIX}/jobs/{job_id}"


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison, as If-None-Match requires: `W/` is ignored, `*` matches."""
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


# -- jobs -----------------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobCreated,
    summary="Create a render job",
    responses={
        **_AUTH_ERRORS,
        413: {"model": ErrorMessage, "description": "request body too large"},
        415: {"model": ErrorMessage, "description": "Content-Type is not application/json"},
        503: {"model": ErrorMessage, "description": "job queue unavailable; job marked failed"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": JobCreate.model_json_schema()}},
        }
    },
)
def create_job(
    client: ClientId,
    body: JobCreateBody,
    cache: CacheDep,
    session: SessionDep,
    enqueue: EnqueueDep,
    services: ServicesDep,
) -> Response:
    """Store the job (committed) first, then enqueue its render; poll `status_url`."""
    view = jobs.create_job(
        session=session, client_id=client, prompt=body.prompt, scenes_total=body.scenes_total
    )
    logger.info("created job %s for client %s", view.job_id, client)
    # Pre-warm the entry and drop the client's cached lists: the first poll is a hit,
    # and the new job shows in the list at once.
    cache.publish(view)
    try:
        task_id = enqueue(view.job_id)
    except (QueueUnavailable, OSError) as exc:
        _mark_unqueued(cache, view.job_id, QUEUE_DOWN_ERROR)
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=(
                f"job queue unavailable: job {view.job_id} could not be queued and was "
                "marked failed; please retry later"
            ),
            headers={"Retry-After": "5"},
        ) from exc
    except Exception:
        # Clean up, then re-raise: a job without a task must not look queued forever.
        _mark_unqueued(cache, view.job_id, INTERNAL_ENQUEUE_ERROR)
        raise
    jobs.set_task_id(view.job_id, task_id, session=session)
    url = job_url(view.job_id)
    return JSONResponse(
        status_code=status.HTTP_202_ACCEPTED,
        content={"job_id": view.job_id, "status": JobStatus.QUEUED.value, "status_url": url},
        headers={"Location": url, POLL_INTERVAL_HEADER: poll_interval(services)},
    )


def _mark_unqueued(cache: JobCache, job_id: int, error: str) -> None:
    logger.error("job %s could not be enqueued: marking it failed (%s)", job_id, error)
    try:
        cache.update_progress(job_id, {"status": JobStatus.FAILED.value, "error": error})
    except ProgressRegression:
        # The task did reach a worker (an ambiguous broker error) and finished already.
        logger.warning("job %s finished despite the enqueue error; left as it is", job_id)


@router.get(
    "/jobs/{job_id}",
    response_model=JobView,
    summary="A job's status and progress",
    responses={
        **_AUTH_ERRORS,
        **_NOT_FOUND,
        304: {"description": "not modified: If-None-Match matched the ETag"},
    },
)
async def get_job(
    job_id: JobId,
    client: ClientId,
    reader: ReaderDep,
    services: ServicesDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The job object; `ETag` is its version, so `If-None-Match` polls cost no body."""
    # `async def`, decided by measurement (wrk, 1 worker, this machine): a hit is one
    # EVALSHA on redis.asyncio, ~1.9x the req/s of a sync handler doing the same read
    # with redis-py in the thread pool. Misses and DB fallbacks go to a worker thread
    # inside the reader, so the event loop never blocks (bench/ measures it).
    job = await reader.get(job_id, client_id=client)
    if job is None:
        raise job_not_found()
    return job_response(job, if_none_match, poll_interval(services))


def poll_interval(services: Services) -> str:
    """`X-Poll-Interval`: how many seconds a polling client should wait (a setting)."""
    return f"{services.runtime.settings.poll_interval_seconds:g}"


def job_response(job: CachedJob, if_none_match: str | None, poll_hint: str) -> Response:
    """200 with the cached bytes, or 304 when If-None-Match matches (shared with
    `api.fastpoll`, so both paths answer byte for byte alike). A job still moving
    carries `X-Poll-Interval`, the pace the server asks of clients that poll."""
    etag = f'"{job.version}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if not job.finished:
        headers[POLL_INTERVAL_HEADER] = poll_hint
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    # The cached bytes go out as they are: never parsed and re-serialized here.
    return Response(content=job.body, media_type=JSON, headers=headers)


@router.get(
    "/jobs",
    response_model=JobList,
    summary="The caller's jobs, newest first",
    responses=_AUTH_ERRORS,
)
def list_jobs(
    client: ClientId,
    cache: CacheDep,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    """A page of the caller's jobs; follow `next_offset` until it is null."""

    def load() -> bytes:
        # One row more than asked tells whether another page exists.
        page = run_read(
            runtime.sessions,
            lambda session: jobs.list_jobs(client, session=session, limit=limit + 1, offset=offset),
        )
        more = len(page) > limit
        return orjson.dumps(
            {
                "items": [view.model_dump(mode="json") for view in page[:limit]],
                "limit": limit,
                "offset": offset,
                "next_offset": offset + limit if more else None,
            }
        )

    body = cache.get_list(client, f"{limit}:{offset}", load)
    return Response(content=body, media_type=JSON, headers={"Cache-Control": "no-cache"})


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CancelAccepted,
    summary="Cancel a job",
    responses={
        **_AUTH_ERRORS,
        **_NOT_FOUND,
        409: {"model": ErrorMessage, "description": "the job has already finished"},
    },
)
def cancel_job(job_id: JobId, client: ClientId, cache: CacheDep, session: SessionDep) -> Response:
    """A queued job is cancelled at once; a running one stops at its next scene."""
    row = jobs.get_job_row(job_id, session=session)
    if row is None or row.client_id != client:
        raise job_not_found()
    current = JobStatus(row.status)
    # End the read transaction before the writes below (they use their own sessions).
    session.rollback()
    if current.finished:
        raise _already_finished(job_id, current)
    if current is JobStatus.QUEUED:
        try:
            cache.update_progress(job_id, {"status": JobStatus.CANCELLED.value})
        except ProgressRegression:
            raise _already_finished(job_id, _status_now(cache, job_id, current)) from None
        answer = JobStatus.CANCELLED
    else:
        answer = current
    # Also for a queued job: a worker that already holds its task checks this flag.
    jobs.request_cancel(job_id, session=session)
    logger.info("cancel requested for job %s (was %s)", job_id, current.value)
    return JSONResponse(
        status_code=status.HTTP_202_ACCEPTED,
        content={"job_id": job_id, "status": answer.value, "cancel_requested": True},
    )


def _already_finished(job_id: int, current: JobStatus) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_409_CONFLICT,
        detail=f"job {job_id} is already {current.value}: it cannot be cancelled",
    )


def _status_now(cache: JobCache, job_id: int, fallback: JobStatus) -> JobStatus:
    job = cache.get(job_id)
    return job.view.status if job is not None else fallback


# -- cache statistics ---------------------------------------------------------------------


@router.get(
    "/cache/stats",
    response_model=CacheStats,
    summary="Cache statistics (global across processes)",
    responses=_AUTH_ERRORS,
)
def cache_stats(cache: CacheDep) -> Response:
    """Exactly the statistics object of the cache (extra keys pass through)."""
    return Response(content=orjson.dumps(cache.stats()), media_type=JSON)


@router.get(
    "/cache/stats/history",
    response_model=StatsHistory,
    summary="Snapshots of the cache statistics, newest first",
    responses=_AUTH_ERRORS,
)
def cache_stats_history(
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    """The beat task's snapshots, newest first."""
    items = run_read(
        runtime.sessions,
        lambda session: snapshots.list_snapshots(session=session, limit=limit, offset=offset),
    )
    return Response(content=orjson.dumps({"items": items}), media_type=JSON)


# -- operations -----------------------------------------------------------------------------


@ops.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@ops.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the database answers; Redis state is reported",
    responses={503: {"model": Readiness, "description": "the database does not answer"}},
)
def readyz(runtime: RuntimeDep) -> Response:
    """200 when the database answers `SELECT 1`; Redis is reported, not required."""
    cache = runtime.cache
    # Breaker state, no round trip: Redis being down does not make the API unready.
    redis = "disabled" if not cache.enabled else "available" if cache.available() else "unavailable"
    try:
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        # The type only: driver messages may carry connection details.
        logger.warning("not ready: the database does not answer (%s)", type(exc).__name__)
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"status": "unavailable", "database": "unavailable", "redis": redis},
        )
    return JSONResponse(content={"status": "ready", "database": "ok", "redis": redis})


@ops.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "text exposition format"}},
)
def metrics(services: ServicesDep) -> Response:
    """HTTP requests, DB queries at the engine and the global cache statistics."""
    return Response(content=services.metrics.render(), media_type=CONTENT_TYPE)


__all__ = ["API_PREFIX", "etag_matches", "job_url", "ops", "router"]
