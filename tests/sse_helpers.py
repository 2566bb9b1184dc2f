"""Drive an ASGI app's SSE stream by hand: read events one by one, stall, disconnect.

Test clients buffer whole responses; these tests need to stop reading (a slow client),
hang up at a chosen moment, and see each chunk as it is sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Event:
    id: int | None
    data: dict[str, Any] | None
    retry: int | None = None

    @property
    def version(self) -> int:
        assert self.data is not None
        return int(self.data["version"])


def parse_events(text: str) -> tuple[list[Event], str]:
    """Complete events in `text` (comments skipped) and the unparsed rest."""
    text = text.replace("\r\n", "\n")
    events: list[Event] = []
    while "\n\n" in text:
        block, text = text.split("\n\n", 1)
        ident: int | None = None
        data: list[str] = []
        retry: int | None = None
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                ident = int(value)
            elif name == "data":
                data.append(value)
            elif name == "retry":
                retry = int(value)
        if data or ident is not None:
            events.append(Event(ident, orjson.loads("\n".join(data)) if data else None, retry))
    return events, text


@dataclass
class Stream:
    """One request to the app, answered into queues."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    _chunks: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    _disconnect: asyncio.Event = field(default_factory=asyncio.Event)
    _started: asyncio.Event = field(default_factory=asyncio.Event)
    # Cleared: `send` blocks (a client that stopped reading).
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _pending_text: str = ""
    _events: list[Event] = field(default_factory=list)

    async def receive(self) -> dict[str, Any]:
        if not getattr(self, "_sent_request", False):
            self._sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            self._started.set()
        elif message["type"] == "http.response.body":
            await self.reading.wait()
            chunk = message.get("body", b"")
            self.body += chunk
            await self._chunks.put(chunk)
            if not message.get("more_body", False):
                self.ended = True
                await self._chunks.put(None)

    async def started(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self._started.wait(), timeout)

    async def next_event(self, timeout: float = 10) -> Event | None:
        """The next event, or None when the stream ended."""
        while not self._events:
            chunk = await asyncio.wait_for(self._chunks.get(), timeout)
            if chunk is None:
                return None
            events, self._pending_text = parse_events(self._pending_text + chunk.decode())
            self._events.extend(events)
        return self._events.pop(0)

    async def all_events(self, timeout: float = 10) -> list[Event]:
        events = []
        while (event := await self.next_event(timeout)) is not None:
            events.append(event)
        return events

    async def disconnect(self) -> None:
        self._disconnect.set()
        self.reading.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)

    async def finished(self, timeout: float = 10) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout)


def open_stream(app: Any, path: str, headers: dict[str, str], *, reading: bool = True) -> Stream:
    """Start a GET of `path` on `app` (lifespan already running); returns at once."""
    stream = Stream()
    if reading:
        stream.reading.set()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    stream.task = asyncio.create_task(app(scope, stream.receive, stream.send))
    return stream
