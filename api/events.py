"""`GET /api/v2/jobs/{job_id}/events`: a job's progress as Server-Sent Events.

The first event is the job's current state, read through the cache path; then every
newer version, in order, each once (`id:` is the version); the stream ends after the
terminal state. `Last-Event-ID` resumes: only versions newer than it are sent. Updates
come from the process's `Hub` (one Redis subscription for all streams); while it is not
live the stream reads the job through the cache path every
`EVENTS_FALLBACK_POLL_SECONDS`, and one read catches up when push is back.

sse-starlette serves the stream rather than `fastapi.sse`: it cuts a client that stops
reading after a send timeout (`SSE_SEND_TIMEOUT_SECONDS`; fastapi.sse has none, a stuck
client holds its stream for ever), it listens for the disconnect and cancels the stream
at once (fastapi.sse notices only at its next write, up to a keep-alive later, under
ASGI 2.4 servers), its keep-alive interval is a parameter (fixed at 15 s in fastapi.sse),
it ends open streams when uvicorn shuts down, and it refuses compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Request, status
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from api.deps import ClientId, ReaderDep, current_client
from api.errors import job_not_found
from api.hub import Follower, Hub, Update
from api.routes import _AUTH_ERRORS, _NOT_FOUND, API_PREFIX, JobId
from shared.cache.aio import AsyncJobReader

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
# The browser's EventSource waits this long before reconnecting (our page and CLI
# have their own backoff).
RECONNECT_MS = 2_000

router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(current_client)])


def last_event_id(raw: str | None) -> int:
    """The version a client already has; anything but a plain number means none."""
    if raw is None:
        return 0
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else 0


@router.get(
    "/jobs/{job_id}/events",
    summary="Follow a job: Server-Sent Events, one per new version",
    response_class=EventSourceResponse,
    responses={
        **_AUTH_ERRORS,
        **_NOT_FOUND,
        200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
        503: {"description": "too many open streams on this process; see Retry-After"},
    },
)
async def job_events(
    job_id: JobId,
    client: ClientId,
    reader: ReaderDep,
    request: Request,
    last_event: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """`curl -N -H "Authorization: Bearer $KEY" .../events`: current state first, then
    every newer version; ends after the terminal state."""
    services = request.app.state.services
    hub: Hub = services.hub
    settings = services.runtime.settings
    # Ownership before any stream starts: a foreign or missing job is the poll's 404.
    job = await reader.get(job_id, client_id=client)
    if job is None:
        raise job_not_found()
    if not hub.reserve():
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="too many open event streams on this server: retry later or poll",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    follower = Follower(job_id=job_id, client_id=client)
    follower.slot.last_sent = last_event_id(last_event)
    follower.slot.offer(Update(job.view.version, job.body, job.view.finished))
    events = stream_events(
        follower, hub, reader, fallback_seconds=settings.events_fallback_poll_seconds
    )
    return JobEventStream(
        events,
        hub=hub,
        ping=settings.sse_keepalive_seconds,
        send_timeout=settings.sse_send_timeout_seconds,
        headers={"Cache-Control": "no-cache"},
    )


class JobEventStream(EventSourceResponse):
    """The stream; whatever ends it (the last event, a disconnect, a send timeout, the
    server shutting down) closes the generator and gives its place back to the hub."""

    def __init__(self, events: AsyncIterator[ServerSentEvent], *, hub: Hub, **kwargs: Any):
        super().__init__(events, **kwargs)
        self._events = events
        self._hub = hub
        self._released = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = completed = False

        async def tracked(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        try:
            await super().__call__(scope, receive, tracked)
            if started and not completed:
                # Ended by the server shutting down: close the body properly, so the
                # server does not report an incomplete response as an error.
                with anyio.move_on_after(1), contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except SendTimeoutError:
            # Expected, not an error of the app: the connection is dropped, the
            # client may reconnect with Last-Event-ID.
            logger.info(
                "event stream cut: the client read nothing for %ss (SSE_SEND_TIMEOUT_SECONDS)",
                self.send_timeout,
            )
        finally:
            if not self._released:
                self._released = True
                self._hub.release()
            close = getattr(self._events, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(close())


async def stream_events(
    follower: Follower, hub: Hub, reader: AsyncJobReader, *, fallback_seconds: float
) -> AsyncIterator[ServerSentEvent]:
    """The events of one stream (the slot already holds the state read by the route)."""
    slot = follower.slot
    first = True
    try:
        pushed = await hub.follow(follower)
        generation = hub.generation
        # Anything written between the route's read and the subscription.
        if not await _catch_up(follower, reader):
            return
        while True:
            update = slot.take()
            if update is not None:
                event = ServerSentEvent(data=update.body.decode(), id=str(update.version))
                if first:
                    event.retry = RECONNECT_MS
                    first = False
                yield event
                if update.finished:
                    return
                continue
            slot.wake.clear()
            if hub.live and hub.generation != generation:
                # Push is back (or reconnected): one read covers what it missed.
                generation = hub.generation
                pushed = True
                if not await _catch_up(follower, reader):
                    return
                continue
            if pushed and hub.live:
                await slot.wake.wait()
                continue
            try:
                await asyncio.wait_for(slot.wake.wait(), fallback_seconds)
            except TimeoutError:
                # A subscription confirmed late: push from now on. Asked before the read,
                # so the read covers whatever was published before the confirmation.
                confirmed = hub.subscribed(follower.job_id)
                if not await _catch_up(follower, reader):
                    return
                pushed = confirmed
    finally:
        hub.unfollow(follower)


async def _catch_up(follower: Follower, reader: AsyncJobReader) -> bool:
    """Offer the job's current state to the slot; False when the stream has nothing more
    to say: the job is gone, or it has finished and the client already has that version."""
    job = await reader.get(follower.job_id, client_id=follower.client_id)
    if job is None:
        return False
    slot = follower.slot
    slot.offer(Update(job.view.version, job.body, job.view.finished))
    return not (job.view.finished and slot.pending is None)
