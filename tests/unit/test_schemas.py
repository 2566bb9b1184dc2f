"""The job's shapes and the validation of progress updates (`shared.schemas`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.schemas import (
    FINISHED_STATUSES,
    MAX_ERROR_CHARS,
    MAX_SCENES,
    STAGE_ORDER,
    InvalidProgress,
    JobStatus,
    JobView,
    ProgressInfo,
    ProgressRegression,
    ProgressUpdate,
    Stage,
    percent,
)


def view(**overrides: Any) -> JobView:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    fields: dict[str, Any] = {
        "job_id": 7,
        "client_id": "alice@example.com",
        "status": JobStatus.RUNNING,
        "progress": ProgressInfo(
            current_stage=Stage.RENDERING, scenes_completed=3, scenes_total=5, percent=58.0
        ),
        "version": 4,
        "created_at": now,
        "updated_at": now,
    }
    return JobView(**{**fields, **overrides})


def test_a_valid_update_parses() -> None:
    update = ProgressUpdate.parse({"current_stage": "rendering", "scenes_completed": 3})
    assert update.current_stage is Stage.RENDERING and update.scenes_completed == 3
    assert ProgressUpdate.parse(update) is update


@pytest.mark.parametrize(
    ("progress", "field"),
    [
        (None, "progress"),
        ([("current_stage", "rendering")], "progress"),
        ("rendering", "progress"),
        ({}, "progress"),
        ({"stage": "rendering"}, "stage"),
        ({"current_stage": "teleporting"}, "current_stage"),
        ({"status": "paused"}, "status"),
        ({"scenes_completed": -1}, "scenes_completed"),
        ({"scenes_completed": MAX_SCENES + 1}, "scenes_completed"),
        ({"scenes_total": 0}, "scenes_total"),
        ({"error": "x" * (MAX_ERROR_CHARS + 1)}, "error"),
        ({"result_url": "u" * 5_000}, "result_url"),
        ({"current_stage": "rendering", "percent": 12.5}, "percent"),
    ],
)
def test_a_bad_update_raises_a_value_error_naming_the_field(progress: Any, field: str) -> None:
    with pytest.raises(InvalidProgress) as info:
        ProgressUpdate.parse(progress)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.message


def test_a_regression_is_an_invalid_progress_and_a_value_error() -> None:
    error = ProgressRegression("current_stage", "would move backwards")
    assert isinstance(error, InvalidProgress) and isinstance(error, ValueError)
    assert (error.field, error.message) == ("current_stage", "would move backwards")


def test_the_job_object_round_trips_through_its_json() -> None:
    job = view(error=None, result_url=None)
    body = job.to_json()
    assert JobView.model_validate_json(body) == job
    data = orjson.loads(body)
    assert set(data) == {
        "job_id", "client_id", "status", "progress", "version", "error", "result_url",
        "created_at", "updated_at",
    }  # fmt: skip
    assert set(data["progress"]) == {
        "current_stage", "scenes_completed", "scenes_total", "percent", "eta_seconds",
    }  # fmt: skip
    assert data["status"] == "running" and data["progress"]["current_stage"] == "rendering"


@pytest.mark.parametrize(
    "change",
    [{"version": 0}, {"job_id": 0}, {"client_id": ""}, {"error": "e" * (MAX_ERROR_CHARS + 1)}],
)
def test_the_job_object_refuses_out_of_range_values(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        view(**change)


def test_the_job_object_refuses_unknown_keys() -> None:
    data = orjson.loads(view().to_json())
    with pytest.raises(ValidationError):
        JobView.model_validate({**data, "is_admin": True})


def test_finished_statuses() -> None:
    assert {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED} == FINISHED_STATUSES
    assert [s.finished for s in JobStatus] == [False, False, True, True, True]
    assert view(status=JobStatus.CANCELLED).finished and not view().finished
    assert [s.rank for s in JobStatus] == [0, 1, 2, 2, 2]


def test_stages_are_in_the_design_order() -> None:
    assert [s.value for s in STAGE_ORDER] == [
        "queued", "scripting", "storyboard", "rendering", "encoding", "uploading", "done",
    ]  # fmt: skip
    assert [s.rank for s in STAGE_ORDER] == list(range(7))


def test_percent_at_the_landmarks() -> None:
    assert percent(Stage.QUEUED, 0, 5) == 0.0
    assert percent(Stage.RENDERING, 0, 5) == 10.0
    assert percent(Stage.RENDERING, 5, 5) == 90.0
    assert percent(Stage.DONE, 0, 5) == 100.0


progress_points = st.integers(1, MAX_SCENES).flatmap(
    lambda total: st.tuples(
        st.just(total),
        st.tuples(st.sampled_from(STAGE_ORDER), st.integers(0, total)),
        st.tuples(st.sampled_from(STAGE_ORDER), st.integers(0, total)),
    )
)


@given(progress_points)
def test_percent_never_goes_backwards_when_progress_moves_forwards(point: Any) -> None:
    total, (stage_a, scenes_a), (stage_b, scenes_b) = point
    a, b = percent(stage_a, scenes_a, total), percent(stage_b, scenes_b, total)
    assert 0.0 <= a <= 100.0 and 0.0 <= b <= 100.0
    if (stage_a.rank, scenes_a) <= (stage_b.rank, scenes_b):
        assert a <= b


def test_an_entry_cached_before_the_eta_field_is_still_valid() -> None:
    data = orjson.loads(view(error=None, result_url=None).to_json())
    del data["progress"]["eta_seconds"]
    old = JobView.model_validate_json(orjson.dumps(data))
    assert old.progress.eta_seconds is None


def test_a_progress_update_may_carry_an_eta_but_not_a_negative_one() -> None:
    assert ProgressUpdate.parse({"current_stage": "rendering", "eta_seconds": 12.5}).eta_seconds
    with pytest.raises(InvalidProgress, match="eta_seconds"):
        ProgressUpdate.parse({"current_stage": "rendering", "eta_seconds": -1})
