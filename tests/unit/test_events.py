"""The SSE stream (`api.events`, `api.hub`) on SQLite and fakeredis, driven over ASGI.

fakeredis shares one server between the cache's sync client and the hub's asyncio
subscription, so a write's PUBLISH reaches the hub as it would on a real Redis;
`server.connected = False` is Redis going down for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from api.app import create_app
from shared import jobs
from shared.apikeys import create_api_key
from tests.sse_helpers import Stream, open_stream

ALICE = "alice@example.com"
BOB = "bob@example.com"


@dataclass
class Env:
    app: Any
    server: fakeredis.FakeServer
    alice: str
    bob: str
    streams: list[Stream] = field(default_factory=list)

    @property
    def services(self) -> Any:
        return self.app.state.services

    @property
    def hub(self) -> Any:
        return self.services.hub

    def create(self, scenes: int = 3) -> int:
        runtime = self.services.runtime
        with runtime.sessions() as session:
            view = jobs.create_job(
                session=session, client_id=ALICE, prompt="a cat", scenes_total=scenes
            )
        runtime.cache.publish(view)
        return view.job_id

    def update(self, job_id: int, **progress: Any) -> None:
        assert self.services.runtime.cache.update_progress(job_id, progress)

    def stream(self, job_id: int, key: str | None = None, **kwargs: Any) -> Stream:
        headers = {"Authorization": f"Bearer {key or self.alice}"}
        headers.update(kwargs.pop("headers", {}))
        stream = open_stream(self.app, f"/api/v2/jobs/{job_id}/events", headers, **kwargs)
        self.streams.append(stream)
        del self.streams[:-20]  # the cycles test opens a thousand
        return stream

    async def wait_live(self, live: bool = True, timeout: float = 10) -> None:
        await until(lambda: self.hub.live is live, timeout)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def environment(
    make_settings: Any, sqlite_url: str, *, push: bool = True, **overrides: Any
) -> AsyncIterator[Env]:
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    settings = make_settings(
        database_url=sqlite_url,
        redis_url="redis://fake.invalid:6379/0",
        events_fallback_poll_seconds=overrides.pop("events_fallback_poll_seconds", 0.1),
        breaker_reset_seconds=0.2,
        **overrides,
    )

    def subscriber() -> Any:
        return fakeredis.aioredis.FakeRedis(server=server)

    app = create_app(
        settings,
        enqueue=lambda job_id: f"task-{job_id}",
        redis_client=sync,
        subscriber=subscriber if push else None,
    )
    async with app.router.lifespan_context(app):
        runtime = app.state.services.runtime
        with runtime.sessions() as session:
            alice = create_api_key(ALICE, session=session)
            bob = create_api_key(BOB, session=session)
        env = Env(app, server, alice, bob)
        try:
            if push:
                await env.wait_live()
            yield env
        finally:
            # A failed test leaves streams open: end them, or the loop waits on them.
            for stream in env.streams:
                if stream.task is not None and not stream.task.done():
                    stream.task.cancel()
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(stream.task, 5)


def run(
    make_settings: Any,
    sqlite_url: str,
    body: Callable[[Env], Awaitable[None]],
    **kwargs: Any,
) -> None:
    async def main() -> None:
        async with environment(make_settings, sqlite_url, **kwargs) as env:
            await body(env)

    asyncio.run(main())


def test_current_state_first_then_each_newer_version_then_the_end(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create(scenes=2)
        stream = env.stream(job)
        first = await stream.next_event()
        assert first is not None and first.id == 1 and first.version == 1
        assert first.data is not None and first.data["status"] == "queued"
        assert first.retry is not None  # the reconnect delay comes with the first event
        await until(lambda: env.hub.channels == 1)
        env.update(job, current_stage="scripting")
        env.update(job, current_stage="rendering", scenes_completed=1)
        env.update(job, current_stage="rendering", scenes_completed=2)
        env.update(job, current_stage="done", status="succeeded", result_url="https://x/1")
        rest = await stream.all_events()
        ids = [event.version for event in rest]
        assert ids == sorted(set(ids)) and ids[-1] == 5, ids
        assert all(event.id == event.version for event in rest)
        assert rest[-1].data is not None and rest[-1].data["status"] == "succeeded"
        await stream.finished()
        assert stream.ended
        assert env.hub.open_streams == 0 and env.hub.channels == 0

    run(make_settings, sqlite_url, body)


def test_the_headers_of_a_stream(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        stream = env.stream(job, headers={"Accept-Encoding": "gzip"})
        await stream.started()
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in stream.headers
        await stream.disconnect()

    run(make_settings, sqlite_url, body)


def test_a_foreign_or_missing_job_is_a_404_before_any_stream(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        foreign = env.stream(job, key=env.bob)
        await foreign.finished()
        missing = env.stream(job + 1000)
        await missing.finished()
        assert foreign.status == missing.status == 404
        assert foreign.body == missing.body
        unknown_key = env.stream(job, key="not-a-key")
        await unknown_key.finished()
        assert unknown_key.status == 401
        assert env.hub.open_streams == 0 and env.hub.channels == 0

    run(make_settings, sqlite_url, body)


def test_last_event_id_resumes_without_repeating(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        env.update(job, current_stage="scripting")  # version 2
        stream = env.stream(job, headers={"Last-Event-ID": "2"})
        await until(lambda: env.hub.channels == 1)
        await asyncio.sleep(0.3)  # a fallback read would have offered version 2 again
        env.update(job, current_stage="storyboard")  # version 3
        event = await stream.next_event()
        assert event is not None and event.id == 3
        await stream.disconnect()

    run(make_settings, sqlite_url, body)


def test_a_finished_job_the_client_has_ends_at_once(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        env.update(job, status="cancelled")  # version 2, terminal
        stream = env.stream(job, headers={"Last-Event-ID": "2"})
        assert await stream.all_events() == []
        again = env.stream(job)
        events = await again.all_events()
        assert [event.id for event in events] == [2]

    run(make_settings, sqlite_url, body)


def test_a_slow_client_gets_the_newest_version_not_a_backlog(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create(scenes=5)
        stream = env.stream(job, reading=False)  # sends block until it reads
        await until(lambda: env.hub.channels == 1)
        await asyncio.sleep(0.2)
        for scene in range(1, 5):
            env.update(job, current_stage="rendering", scenes_completed=scene)
        await asyncio.sleep(0.3)
        stream.reading.set()
        first = await stream.next_event()
        second = await stream.next_event()
        assert first is not None and second is not None
        assert (first.id, second.id) == (1, 5)  # versions 2-4 were overtaken, never queued
        await stream.disconnect()

    run(make_settings, sqlite_url, body)


def test_a_client_that_stops_reading_is_cut_after_the_send_timeout(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        stream = env.stream(job, reading=False)
        await stream.started()
        await stream.finished()  # ended by the server, not by the client
        assert env.hub.open_streams == 0 and env.hub.channels == 0

    run(make_settings, sqlite_url, body, sse_send_timeout_seconds=0.3)


def test_keep_alive_comments_flow_while_nothing_changes(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        stream = env.stream(job)
        await stream.next_event()
        await asyncio.sleep(0.7)
        assert stream.body.count(b": ping") >= 2
        await stream.disconnect()

    run(make_settings, sqlite_url, body, sse_keepalive_seconds=0.2)


def test_above_the_cap_a_stream_is_refused_with_retry_after(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create()
        first = env.stream(job)
        await first.next_event()
        refused = env.stream(job)
        await refused.finished()
        assert refused.status == 503
        assert refused.headers["retry-after"].isdigit()
        await first.disconnect()
        again = env.stream(job)
        assert (await again.next_event()) is not None
        await again.disconnect()

    run(make_settings, sqlite_url, body, sse_max_streams=1)


def test_one_subscription_per_job_whatever_the_number_of_streams(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job, other = env.create(), env.create()
        streams = [env.stream(job) for _ in range(5)] + [env.stream(other)]
        for stream in streams:
            await stream.next_event()
        await until(lambda: env.hub.channels == 2)
        # Redis sees one subscriber per job channel: the process's one connection.
        channels = [env.services.runtime.cache.keys.channel(j) for j in (job, other)]
        numsub = fakeredis.FakeRedis(server=env.server).pubsub_numsub(*channels)
        assert [count for _, count in numsub] == [1, 1]
        env.update(job, current_stage="scripting")
        for stream in streams[:5]:
            event = await stream.next_event()
            assert event is not None and event.id == 2
        for stream in streams:
            await stream.disconnect()
        await until(lambda: env.hub.channels == 0)

    run(make_settings, sqlite_url, body)


def test_without_push_the_stream_polls_the_cache_path(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        assert not env.hub.live
        job = env.create()
        stream = env.stream(job)
        assert (await stream.next_event()) is not None
        env.update(job, current_stage="scripting")
        event = await stream.next_event(timeout=5)
        assert event is not None and event.id == 2
        env.update(job, status="cancelled")
        last = await stream.next_event(timeout=5)
        assert last is not None and last.id == 3
        assert await stream.next_event() is None

    run(make_settings, sqlite_url, body, push=False)


def test_redis_down_then_back_no_duplicate_no_backward_event(make_settings, sqlite_url):
    async def body(env: Env) -> None:
        job = env.create(scenes=8)
        stream = env.stream(job)
        seen = [await stream.next_event()]
        await until(lambda: env.hub.channels == 1)
        env.update(job, current_stage="rendering", scenes_completed=1)
        seen.append(await stream.next_event())
        env.server.connected = False  # Redis goes away: cache and subscription alike
        await env.wait_live(False)
        env.update(job, current_stage="rendering", scenes_completed=2)
        seen.append(await stream.next_event(timeout=5))  # from the fallback poll
        env.update(job, current_stage="rendering", scenes_completed=3)
        env.server.connected = True
        await env.wait_live(True)
        for scene in range(4, 9):
            env.update(job, current_stage="rendering", scenes_completed=scene)
            await asyncio.sleep(0.05)
        env.update(job, current_stage="done", status="succeeded", result_url="https://x/1")
        seen.extend(await stream.all_events())
        ids = [event.version for event in seen if event is not None]
        assert ids == sorted(set(ids)), ids  # each once, never backwards
        assert ids[-1] == 10
        assert 3 in ids  # written while Redis was down: delivered by the fallback poll
        assert env.hub.lost >= 1

    run(make_settings, sqlite_url, body)


def test_server_shutdown_ends_open_streams(make_settings, sqlite_url):
    from sse_starlette.sse import AppStatus

    async def body(env: Env) -> None:
        job = env.create()
        stream = env.stream(job)
        await stream.next_event()
        # What uvicorn's signal handler sets (sse-starlette hooks it): the server exits.
        AppStatus.should_exit = True
        try:
            await stream.finished(timeout=5)
        finally:
            AppStatus.should_exit = False
        assert env.hub.open_streams == 0 and env.hub.channels == 0

    run(make_settings, sqlite_url, body)


def test_a_thousand_connect_disconnect_cycles_leave_nothing_behind(make_settings, sqlite_url):
    async def cycles(env: Env, job: int, count: int) -> None:
        for _ in range(count):
            stream = env.stream(job)
            assert (await stream.next_event()) is not None
            await stream.disconnect()

    async def body(env: Env) -> None:
        job = env.create()
        await cycles(env, job, 100)  # warm up caches, pools, lazily built objects
        await asyncio.sleep(0.3)
        gc.collect()
        tasks_before = len(asyncio.all_tasks())
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await cycles(env, job, 1000)
            await asyncio.sleep(0.3)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert len(asyncio.all_tasks()) <= tasks_before
        assert env.hub.open_streams == 0 and env.hub.channels == 0
        assert not env.hub._confirming
        # 1,000 leaked streams would be megabytes (a slot, a follower, a generator each).
        assert grown < 256 * 1024, f"memory grew by {grown} bytes over 1,000 cycles"

    run(make_settings, sqlite_url, body)


@pytest.mark.parametrize("raw", ["", "abc", "-1", "1e3", "9" * 40])
def test_a_malformed_last_event_id_means_none(raw):
    from api.events import last_event_id

    assert last_event_id(raw) == 0
