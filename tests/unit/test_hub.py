"""The ordering core of a stream (`api.hub.Slot`) and the checks on channel messages.

A stream's slot sees versions in any order and repeated (push, the fallback poll, the
catch-up read after a reconnect, `Last-Event-ID`); whatever arrives, what it hands out
must be strictly increasing, newer than what the client had, and the newest offered.
"""

from __future__ import annotations

import asyncio

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from api.hub import Slot, Update, parse_update
from shared.schemas import JobStatus, JobView, ProgressInfo, Stage


class SlotMachine(RuleBasedStateMachine):
    """A model: the slot must hold exactly the newest version above everything sent."""

    @initialize(resume=st.integers(min_value=0, max_value=5))
    def start(self, resume: int) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.slot = Slot(last_sent=resume)
        self.resume = resume
        self.sent: list[int] = []
        self.newest_offered = 0

    @rule(version=st.integers(min_value=1, max_value=30))
    def offer(self, version: int) -> None:
        self.slot.offer(Update(version, b"%d" % version, False))
        self.newest_offered = max(self.newest_offered, version)

    @rule()
    def take(self) -> None:
        update = self.slot.take()
        if update is not None:
            self.sent.append(update.version)

    @invariant()
    def sent_in_order_each_once_after_the_resume_point(self) -> None:
        if not hasattr(self, "slot"):
            return
        assert all(a < b for a, b in zip(self.sent, self.sent[1:], strict=False)), self.sent
        assert all(version > self.resume for version in self.sent)

    @invariant()
    def the_newest_is_never_lost(self) -> None:
        if not hasattr(self, "slot"):
            return
        floor = max([self.resume, *self.sent])
        waiting = self.slot.pending.version if self.slot.pending is not None else None
        expected = self.newest_offered if self.newest_offered > floor else None
        assert waiting == expected
        if waiting is not None:
            assert self.slot.wake.is_set()

    def teardown(self) -> None:
        asyncio.get_event_loop_policy().get_event_loop().close()
        asyncio.set_event_loop(None)


TestSlot = SlotMachine.TestCase
TestSlot.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def _view(**overrides: object) -> JobView:
    fields: dict[str, object] = {
        "job_id": 7,
        "client_id": "alice@example.com",
        "status": JobStatus.RUNNING,
        "progress": ProgressInfo(
            current_stage=Stage.RENDERING, scenes_completed=1, scenes_total=3, percent=36.67
        ),
        "version": 4,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:01Z",
    }
    fields.update(overrides)
    return JobView.model_validate(fields)


def test_a_valid_message_becomes_an_update():
    body = _view().to_json()
    update = parse_update(body, job_id=7, client_id="alice@example.com")
    assert update == Update(4, body, False)
    done = _view(status=JobStatus.CANCELLED).to_json()
    finished = parse_update(done, job_id=7, client_id="alice@example.com")
    assert finished is not None and finished.finished


def test_messages_for_another_job_or_owner_or_garbage_are_dropped():
    body = _view().to_json()
    assert parse_update(body, job_id=8, client_id="alice@example.com") is None
    assert parse_update(body, job_id=7, client_id="bob@example.com") is None
    assert parse_update(b"not json", job_id=7, client_id="alice@example.com") is None
    assert parse_update(b'{"version": 99}', job_id=7, client_id="alice@example.com") is None
