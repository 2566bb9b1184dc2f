"""Request and response shapes of the HTTP API (the job object itself is `shared.schemas.JobView`).

Several endpoints send bytes they already hold (cached JSON, the statistics object);
their models here describe the answer in OpenAPI without re-serializing it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.schemas import MAX_PROMPT_CHARS, MAX_SCENES, JobStatus, JobView

MAX_JOB_ID = 2**63 - 1
MAX_PAGE_SIZE = 100
MAX_OFFSET = 100_000
MAX_HISTORY = 1_000


class JobCreate(BaseModel):
    """Body of `POST /api/v2/jobs`: unknown keys are refused, numbers must be JSON integers."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    scenes_total: int = Field(ge=1, le=MAX_SCENES)

    @field_validator("prompt")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # PostgreSQL text cannot hold NUL: refuse it here instead of failing at INSERT.
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class JobCreated(BaseModel):
    """Answer of `POST /api/v2/jobs` (202): where to poll."""

    job_id: int
    status: Literal["queued"] = "queued"
    status_url: str


class JobList(BaseModel):
    """One page of the caller's jobs, newest first; `next_offset` is null on the last page."""

    items: list[JobView]
    limit: int
    offset: int
    next_offset: int | None


class CancelAccepted(BaseModel):
    """Answer of `POST /api/v2/jobs/{job_id}/cancel` (202)."""

    job_id: int
    status: JobStatus
    cancel_requested: Literal[True] = True


class CacheStatistics(BaseModel):
    """The counters of the statistics object (global across processes)."""

    model_config = ConfigDict(extra="allow")

    hits: int
    misses: int
    errors: int
    invalidations: int
    hit_rate: float
    total_requests: int
    redis_enabled: bool
    redis_available: bool
    ttl_seconds: int


class CacheStats(BaseModel):
    """The statistics object of DESIGN.md (more keys may appear, none disappear)."""

    model_config = ConfigDict(extra="allow")

    cache_enabled: bool
    statistics: CacheStatistics
    message: str


class StatsSnapshot(BaseModel):
    """One snapshot taken by the beat task."""

    taken_at: datetime
    hits: int
    misses: int
    errors: int
    invalidations: int
    total_requests: int
    hit_rate: float
    redis_available: bool


class StatsHistory(BaseModel):
    """The beat task's snapshots, newest first."""

    items: list[StatsSnapshot]


class Health(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Readiness: the database must answer; Redis is reported, not required."""

    status: Literal["ready", "unavailable"]
    database: Literal["ok", "unavailable"]
    redis: Literal["available", "unavailable", "disabled"]


class ErrorMessage(BaseModel):
    """An error with a plain message."""

    detail: str


class FieldError(BaseModel):
    """One invalid field: where (`loc`), why (`msg`) and the error kind (`type`)."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    """A 422: every invalid field of the request."""

    detail: list[FieldError]
