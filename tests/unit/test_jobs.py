"""The data layer (`shared.jobs`): creation, listing, cancellation and the one writer of
progress, whose versions are monotonic under concurrent writers.

`JobsContract` runs on SQLite here and on PostgreSQL in
`tests/integration/test_jobs_postgres.py`; a subclass provides the `db_url` fixture.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from shared import jobs
from shared.db import SessionFactory
from shared.models import Job
from shared.schemas import (
    MAX_PROMPT_CHARS,
    InvalidProgress,
    JobStatus,
    ProgressRegression,
    ProgressUpdate,
    Stage,
)
from tests.cache_helpers import STEPS, open_db, run_threads


def unique_client() -> str:
    return f"client-{uuid.uuid4().hex[:10]}@example.com"


class JobsContract:
    """Data-layer behaviour every supported database must show."""

    pytestmark = [pytest.mark.timeout(120)]

    @pytest.fixture
    def sessions(self, db_url: str) -> Iterator[SessionFactory]:
        engine, factory = open_db(db_url)
        yield factory
        engine.dispose()

    @pytest.fixture
    def client(self) -> str:
        return unique_client()

    def create(self, sessions: SessionFactory, client: str, scenes: int = 5) -> int:
        with sessions() as session:
            return jobs.create_job(
                session=session, client_id=client, prompt="a storm at sea", scenes_total=scenes
            ).job_id

    def update(self, sessions: SessionFactory, job_id: int, progress: dict[str, Any]) -> Any:
        with sessions() as session:
            return jobs.update_job_progress(job_id, ProgressUpdate.parse(progress), session=session)

    def row(self, sessions: SessionFactory, job_id: int) -> dict[str, Any]:
        with sessions() as session:
            row = jobs.get_job_row(job_id, session=session)
            assert row is not None
            return {c.name: getattr(row, c.name) for c in Job.__table__.columns}

    # -- creation and reads ---------------------------------------------------------------------

    def test_a_new_job_is_queued_at_version_one(self, sessions: SessionFactory, client: str):
        job_id = self.create(sessions, client)
        with sessions() as session:
            view = jobs.get_job(job_id, session=session)
        assert view is not None
        assert (view.status, view.version, view.client_id) == (JobStatus.QUEUED, 1, client)
        assert view.progress.current_stage is Stage.QUEUED
        assert (view.progress.scenes_completed, view.progress.scenes_total) == (0, 5)
        assert view.progress.percent == 0.0
        assert view.created_at.tzinfo is not None and view.updated_at.tzinfo is not None
        assert abs(view.created_at - datetime.now(UTC)) < timedelta(minutes=5)

    @pytest.mark.parametrize(
        ("prompt", "scenes", "field"),
        [
            ("", 3, "prompt"),
            ("x" * (MAX_PROMPT_CHARS + 1), 3, "prompt"),
            ("ok", 0, "scenes_total"),
            ("ok", 1_001, "scenes_total"),
        ],
    )
    def test_an_invalid_job_is_refused_and_not_stored(
        self, sessions: SessionFactory, client: str, prompt: str, scenes: int, field: str
    ):
        with sessions() as session, pytest.raises(InvalidProgress) as info:
            jobs.create_job(session=session, client_id=client, prompt=prompt, scenes_total=scenes)
        assert info.value.field == field
        with sessions() as session:
            count = session.scalar(select(func.count()).where(Job.client_id == client))
        assert count == 0

    @pytest.mark.parametrize("field", ["error", "result_url"])
    def test_a_detail_without_progress_is_refused_naming_that_detail(
        self, sessions: SessionFactory, client: str, field: str
    ):
        job_id = self.create(sessions, client)
        self.update(sessions, job_id, {"current_stage": "rendering", "scenes_completed": 2})
        before = self.row(sessions, job_id)
        with pytest.raises(ProgressRegression) as info:
            self.update(sessions, job_id, {field: "something"})
        assert info.value.field == field
        assert self.row(sessions, job_id) == before

    def test_an_unknown_job_is_none(self, sessions: SessionFactory):
        with sessions() as session:
            assert jobs.get_job(2_000_000_000, session=session) is None
            assert jobs.get_job_row(2_000_000_000, session=session) is None
        assert self.update(sessions, 2_000_000_000, STEPS[0]) is None

    def test_a_clients_list_is_its_own_newest_first_and_paginated(
        self, sessions: SessionFactory, client: str
    ):
        mine = [self.create(sessions, client) for _ in range(5)]
        self.create(sessions, unique_client())
        with sessions() as session:
            page1 = jobs.list_jobs(client, session=session, limit=2, offset=0)
            page2 = jobs.list_jobs(client, session=session, limit=2, offset=2)
            page3 = jobs.list_jobs(client, session=session, limit=2, offset=4)
            everything = jobs.list_jobs(client, session=session, limit=100, offset=0)
        assert [v.job_id for v in everything] == sorted(mine, reverse=True)
        assert [v.job_id for v in page1 + page2 + page3] == sorted(mine, reverse=True)
        assert len(page3) == 1
        assert all(v.client_id == client for v in everything)

    def test_cancellation_is_a_flag_on_the_row(self, sessions: SessionFactory, client: str):
        job_id = self.create(sessions, client)
        with sessions() as session:
            assert jobs.is_cancel_requested(job_id, session=session) is False
            assert jobs.request_cancel(job_id, session=session) is True
            assert jobs.is_cancel_requested(job_id, session=session) is True
            assert jobs.request_cancel(2_000_000_000, session=session) is False
            assert jobs.is_cancel_requested(2_000_000_000, session=session) is False

    def test_the_task_id_is_stored(self, sessions: SessionFactory, client: str):
        job_id = self.create(sessions, client)
        with sessions() as session:
            jobs.set_task_id(job_id, "task-123", session=session)
        assert self.row(sessions, job_id)["celery_task_id"] == "task-123"

    def test_recently_updated_jobs_are_found_for_the_repair(
        self, sessions: SessionFactory, client: str
    ):
        job_id = self.create(sessions, client)
        before = datetime.now(UTC) - timedelta(seconds=5)
        self.update(sessions, job_id, STEPS[0])
        with sessions() as session:
            recent = jobs.jobs_updated_since(before, session=session)
            future = jobs.jobs_updated_since(
                datetime.now(UTC) + timedelta(hours=1), session=session
            )
        assert (job_id, client) in recent
        assert (job_id, client) not in future

    # -- progress -----------------------------------------------------------------------------

    def test_every_step_bumps_the_version_by_one(self, sessions: SessionFactory, client: str):
        job_id = self.create(sessions, client)
        last = self.row(sessions, job_id)
        percents = [0.0]
        for version, step in enumerate(STEPS, start=2):
            outcome = self.update(sessions, job_id, step)
            assert outcome.changed and outcome.view.version == version
            row = self.row(sessions, job_id)
            assert row["version"] == version
            assert row["updated_at"] >= last["updated_at"]
            percents.append(outcome.view.progress.percent)
            last = row
        assert percents == sorted(percents) and percents[-1] == 100.0
        assert last["status"] == "succeeded" and last["stage"] == "done"
        assert last["result_url"] == STEPS[-1]["result_url"]

    @pytest.mark.parametrize(
        ("setup", "regress", "field"),
        [
            (STEPS[:9], {"current_stage": "rendering", "scenes_completed": 5}, "current_stage"),
            (STEPS[:6], {"current_stage": "rendering", "scenes_completed": 2}, "scenes_completed"),
            (STEPS[:6], {"scenes_completed": 0}, "scenes_completed"),
            (STEPS[:1], {"status": "queued", "current_stage": "queued"}, "status"),
            (STEPS[:3], {"current_stage": "queued"}, "current_stage"),
            # Scenes completed never decrease: not in a later stage, not when a job stops.
            (STEPS[:8], {"current_stage": "encoding", "scenes_completed": 0}, "scenes_completed"),
            (STEPS[:8], {"current_stage": "done", "scenes_completed": 4}, "scenes_completed"),
            (STEPS[:8], {"status": "failed", "scenes_completed": 0}, "scenes_completed"),
            (STEPS[:6], {"status": "cancelled", "scenes_completed": 1}, "scenes_completed"),
            # Nor does the stage, when the status moves forward beside it.
            (STEPS[:3], {"status": "failed", "current_stage": "scripting"}, "current_stage"),
            (STEPS, {"status": "failed", "error": "late"}, "status"),
            (STEPS, {"status": "cancelled"}, "status"),
            ([{"status": "failed", "error": "boom"}], {"current_stage": "scripting"}, "status"),
            (
                [{"status": "cancelled"}],
                {"status": "running", "current_stage": "scripting"},
                "status",
            ),
        ],
    )
    def test_a_regression_is_refused_and_writes_nothing(
        self,
        sessions: SessionFactory,
        client: str,
        setup: list[dict[str, Any]],
        regress: dict[str, Any],
        field: str,
    ):
        job_id = self.create(sessions, client)
        for step in setup:
            self.update(sessions, job_id, step)
        before = self.row(sessions, job_id)
        with pytest.raises(ProgressRegression) as info:
            self.update(sessions, job_id, regress)
        assert info.value.field == field
        assert str(job_id) in info.value.message
        assert self.row(sessions, job_id) == before

    @pytest.mark.parametrize(
        ("progress", "field"),
        [
            ({"scenes_total": 6}, "scenes_total"),
            ({"current_stage": "rendering", "scenes_completed": 6}, "scenes_completed"),
            ({"status": "succeeded"}, "status"),
            ({"current_stage": "done", "status": "failed"}, "status"),
            ({"status": "queued", "current_stage": "rendering"}, "status"),
        ],
    )
    def test_an_inconsistent_update_is_refused_and_writes_nothing(
        self, sessions: SessionFactory, client: str, progress: dict[str, Any], field: str
    ):
        job_id = self.create(sessions, client)
        self.update(sessions, job_id, STEPS[0])
        before = self.row(sessions, job_id)
        with pytest.raises(InvalidProgress) as info:
            self.update(sessions, job_id, progress)
        assert info.value.field == field
        assert not isinstance(info.value, ProgressRegression)
        assert self.row(sessions, job_id) == before

    def test_a_duplicate_changes_nothing(self, sessions: SessionFactory, client: str):
        job_id = self.create(sessions, client)
        for step in STEPS[:4]:
            self.update(sessions, job_id, step)
        before = self.row(sessions, job_id)
        for step in (STEPS[3], {"scenes_completed": 1}, {"current_stage": "rendering"}):
            outcome = self.update(sessions, job_id, step)
            assert outcome.changed is False and outcome.view.version == before["version"]
        assert self.row(sessions, job_id) == before
        for step in STEPS[4:]:
            self.update(sessions, job_id, step)
        final = self.row(sessions, job_id)
        assert self.update(sessions, job_id, STEPS[-1]).changed is False  # a redelivered end
        assert self.row(sessions, job_id) == final

    def test_terminal_states_from_any_running_point(self, sessions: SessionFactory, client: str):
        failed, cancelled = self.create(sessions, client), self.create(sessions, client)
        for job_id in (failed, cancelled):
            for step in STEPS[:5]:
                self.update(sessions, job_id, step)
        out = self.update(sessions, failed, {"status": "failed", "error": "GPU melted"})
        assert (out.view.status, out.view.error) == (JobStatus.FAILED, "GPU melted")
        out = self.update(sessions, cancelled, {"status": "cancelled"})
        assert out.view.status is JobStatus.CANCELLED
        assert out.view.progress.scenes_completed == 2, "progress is kept when a job stops"

    @pytest.mark.parametrize("seed", range(2))
    def test_concurrent_writers_never_lose_or_reorder_a_version(
        self, sessions: SessionFactory, client: str, seed: int
    ):
        scenes = 60
        job_id = self.create(sessions, client, scenes=scenes)
        self.update(sessions, job_id, {"current_stage": "rendering", "scenes_completed": 0})

        def writer(i: int) -> list[tuple[int, int]]:
            rng = random.Random(seed * 10 + i)
            written = []
            for n in range(1, scenes + 1):
                if rng.random() < 0.3:
                    continue  # writers skip ahead at random, so they race on different values
                try:
                    out = self.update(
                        sessions, job_id, {"current_stage": "rendering", "scenes_completed": n}
                    )
                except ProgressRegression:
                    continue
                if out.changed:
                    written.append((out.view.version, out.view.progress.scenes_completed))
            return written

        results = run_threads(6, writer)
        written = sorted(pair for result in results for pair in result)
        versions = [version for version, _ in written]
        final = self.row(sessions, job_id)
        assert versions == list(range(3, final["version"] + 1)), "a version was lost or reused"
        scenes_in_version_order = [n for _, n in written]
        assert scenes_in_version_order == sorted(set(scenes_in_version_order))
        assert final["scenes_completed"] == max(scenes_in_version_order)


class TestJobsOnSQLite(JobsContract):
    """The data layer on a migrated SQLite file (WAL mode, several threads)."""

    @pytest.fixture
    def db_url(self, sqlite_url: str) -> str:
        return sqlite_url


# -- the transition rule alone (`_next_state`, no database) ------------------------------------

PROPERTY_SCENES = 4


def fresh_row() -> Job:
    """A queued job as `create_job` stores it, held in memory only."""
    return Job(
        id=1,
        client_id="prop@example.com",
        prompt="p",
        status=JobStatus.QUEUED.value,
        stage=Stage.QUEUED.value,
        scenes_completed=0,
        scenes_total=PROPERTY_SCENES,
        version=1,
        error=None,
        result_url=None,
    )


def progress_updates() -> st.SearchStrategy[ProgressUpdate]:
    """Any well-formed update, consistent or not, forward or backward."""
    fields = st.fixed_dictionaries(
        {},
        optional={
            "current_stage": st.sampled_from(Stage),
            "scenes_completed": st.integers(0, PROPERTY_SCENES),
            "status": st.sampled_from(JobStatus),
            "error": st.sampled_from(["boom", "late"]),
            "result_url": st.just("https://videos.example.invalid/v.mp4"),
        },
    ).filter(bool)
    return fields.map(ProgressUpdate.parse)


def progress_of(row: Job) -> tuple[int, int, int]:
    return (JobStatus(row.status).rank, Stage(row.stage).rank, row.scenes_completed)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(progress_updates(), max_size=25))
def test_no_sequence_of_updates_moves_a_job_backwards(updates: list[ProgressUpdate]) -> None:
    """Whatever arrives in whatever order: scenes completed never decrease, the stage and
    the status never go back, a finished job never changes, and an update applied twice
    changes nothing the second time."""
    row = fresh_row()
    for upd in updates:
        before = progress_of(row)
        was_finished = JobStatus(row.status).finished
        try:
            new = jobs._next_state(row, upd)
        except InvalidProgress:
            continue  # refused: `_next_state` wrote nothing (the row is untouched below)
        if new is None:
            continue
        assert not was_finished, f"a finished job changed: {upd!r}"
        for column, value in new.items():
            setattr(row, column, value)
        after = progress_of(row)
        assert after[2] >= before[2], f"scenes completed went back: {before} -> {after}"
        assert after[1] >= before[1], f"the stage went back: {before} -> {after}"
        assert after[0] >= before[0], f"the status went back: {before} -> {after}"
        assert after > before, f"an accepted update did not advance: {upd!r}"
        assert jobs._next_state(row, upd) is None, f"a duplicate was not a no-op: {upd!r}"
