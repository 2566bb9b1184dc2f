"""The job's public shapes and the validation of progress updates.

`JobView` is the job object of DESIGN.md, the exact bytes clients receive and the
value cached in Redis. `ProgressUpdate` is what workers report; it forbids unknown
keys and out-of-range numbers, and errors name the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_PROMPT_CHARS = 4_000
MAX_SCENES = 1_000
MAX_ERROR_CHARS = 2_000
MAX_URL_CHARS = 2_048
MAX_CLIENT_ID_CHARS = 255
MAX_ETA_SECONDS = 10_000_000.0


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES

    @property
    def rank(self) -> int:
        return 0 if self is JobStatus.QUEUED else 1 if self is JobStatus.RUNNING else 2


FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Stage(StrEnum):
    QUEUED = "queued"
    SCRIPTING = "scripting"
    STORYBOARD = "storyboard"
    RENDERING = "rendering"
    ENCODING = "encoding"
    UPLOADING = "uploading"
    DONE = "done"

    @property
    def rank(self) -> int:
        return STAGE_ORDER.index(self)


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)


class ProgressInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    current_stage: Stage
    scenes_completed: int = Field(ge=0, le=MAX_SCENES)
    scenes_total: int = Field(ge=1, le=MAX_SCENES)
    percent: float = Field(ge=0, le=100)
    # Seconds until the last scene is rendered, estimated by the worker; None until a
    # scene is done and after rendering (optional: entries cached before it stay valid).
    eta_seconds: float | None = Field(default=None, ge=0, le=MAX_ETA_SECONDS)


class JobView(BaseModel):
    """The job object served by the API and stored in the cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: int = Field(ge=1)
    client_id: str = Field(min_length=1, max_length=MAX_CLIENT_ID_CHARS)
    status: JobStatus
    progress: ProgressInfo
    version: int = Field(ge=1)
    error: str | None = Field(default=None, max_length=MAX_ERROR_CHARS)
    result_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @property
    def finished(self) -> bool:
        return self.status.finished


def percent(stage: Stage, scenes_completed: int, scenes_total: int) -> float:
    """Overall completion: the rendering share follows the scenes, the rest the stages."""
    if stage is Stage.DONE:
        return 100.0
    if stage in (Stage.QUEUED, Stage.SCRIPTING, Stage.STORYBOARD):
        return 0.0 if stage is Stage.QUEUED else 5.0 * stage.rank
    if stage is Stage.RENDERING:
        return round(10.0 + 80.0 * scenes_completed / scenes_total, 2)
    return 90.0 if stage is Stage.ENCODING else 95.0


@dataclass(frozen=True, slots=True)
class UpdateOutcome:
    """The job after an update; `changed` is False for a harmless duplicate."""

    view: JobView
    changed: bool


class InvalidProgress(ValueError):
    """A progress update that breaks the schema; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ProgressRegression(InvalidProgress):
    """An update that would move a job backwards (or change a finished job)."""


class ProgressUpdate(BaseModel):
    """One progress report from a worker. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    current_stage: Stage | None = None
    scenes_completed: Annotated[int, Field(ge=0, le=MAX_SCENES)] | None = None
    scenes_total: Annotated[int, Field(ge=1, le=MAX_SCENES)] | None = None
    status: JobStatus | None = None
    error: Annotated[str, Field(max_length=MAX_ERROR_CHARS)] | None = None
    result_url: Annotated[str, Field(max_length=MAX_URL_CHARS)] | None = None
    eta_seconds: Annotated[float, Field(ge=0, le=MAX_ETA_SECONDS, allow_inf_nan=False)] | None = (
        None
    )

    @classmethod
    def parse(cls, progress: Any) -> ProgressUpdate:
        """Validate a mapping (or an update) and raise `InvalidProgress` naming the field."""
        if isinstance(progress, ProgressUpdate):
            return progress
        if not isinstance(progress, dict):
            raise InvalidProgress("progress", f"must be a mapping, not {type(progress).__name__}")
        try:
            update = cls.model_validate(progress, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "progress"
            raise InvalidProgress(field, first["msg"]) from None
        if not progress:
            raise InvalidProgress("progress", "is empty")
        return update
