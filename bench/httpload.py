"""A small HTTP/1.1 load generator that runs in its own process and records every request.

`python -m bench.httpload SPEC.json OUT.json`. wrk measures raw throughput; this one
drives the scenarios wrk cannot express (a job's 40 paced polls, a burst of cold
requests released at once, steady polling across a Redis outage) and keeps each
request's start time, latency and status so the bench can cut them into windows.
It is also the fallback throughput generator when wrk is not installed.

Modes (`spec["mode"]`):
- `poll`: one connection per job, `polls` requests `interval` apart, from `t0 + offset`.
- `steady`: `connections` connections, each sending a request every `interval` seconds
  (0 = back to back) over `paths`, from `t0` for `duration` seconds.
- `burst`: `connections` connections opened first, then one request each, all at once.

Times are `time.monotonic()`, which is system-wide on Linux, so the parent can line up
its own samples with the records; the start time `t0` comes from the parent once every
process of the scenario is ready. Every loop is bounded in count and in time. h11
parses the answers (status line, headers, Content-Length or chunked bodies,
keep-alive); this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from bench.procs import SpecRun, child_handshake, start_together

REQUEST_TIMEOUT = 10.0
READ_SIZE = 65_536


class HttpError(Exception):
    """A malformed answer or a dropped connection."""


def build_request(path: str, headers: dict[str, str]) -> h11.Request:
    return h11.Request(method="GET", target=path, headers=[("Host", "127.0.0.1"), *headers.items()])


class Connection:
    """One keep-alive HTTP/1.1 connection; h11 does the protocol, this class the I/O."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._http = h11.Connection(our_role=h11.CLIENT)

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self._http = h11.Connection(our_role=h11.CLIENT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, request: h11.Request) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return status, lower-cased headers and body."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        http = self._http
        try:
            self.writer.write(http.send(request) or b"")
            self.writer.write(http.send(h11.EndOfMessage()) or b"")
            status, headers, body = 0, {}, bytearray()
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await self.reader.read(READ_SIZE))  # b"": the peer closed
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {
                        name.decode("latin-1"): value.decode("latin-1")
                        for name, value in event.headers
                    }
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpError("the server closed the connection before answering")
                # h11.InformationalResponse (1xx): wait for the final answer.
        except h11.ProtocolError as exc:
            raise HttpError(f"malformed HTTP: {exc}") from exc
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()  # keep-alive: the same connection serves the next one
        else:
            self.close()  # `Connection: close`, or HTTP/1.0: a new connection next time
        return status, headers, bytes(body)


@dataclass
class Records:
    """Per request: start time (monotonic), latency in ms, status (0 = transport error)."""

    start: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, start: float, end: float, status: int) -> None:
        self.start.append(start)
        self.latency_ms.append((end - start) * 1000.0)
        self.status.append(status)

    def as_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "errors": self.errors[:20],
        }


async def _one(conn: Connection, raw: h11.Request, records: Records) -> int:
    start = time.monotonic()
    try:
        status, _, _ = await asyncio.wait_for(conn.request(raw), REQUEST_TIMEOUT)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, HttpError) as exc:
        conn.close()
        records.add(start, time.monotonic(), 0)
        records.errors.append(f"{type(exc).__name__}: {exc}")
        return 0
    records.add(start, time.monotonic(), status)
    return status


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_poll(spec: dict[str, Any], records: Records) -> None:
    t0, polls, interval = float(spec["t0"]), int(spec["polls"]), float(spec["interval"])
    headers = spec.get("headers", {})

    async def poll_job(job: dict[str, Any]) -> None:
        start = t0 + float(job["offset"])
        await _sleep_until(start)
        conn = Connection(spec["host"], int(spec["port"]))
        raw = build_request(job["path"], {**headers, **job.get("headers", {})})
        try:
            for i in range(polls):
                await _sleep_until(start + i * interval)
                await _one(conn, raw, records)
        finally:
            conn.close()

    await asyncio.gather(*(poll_job(job) for job in spec["jobs"]))


async def run_steady(spec: dict[str, Any], records: Records) -> None:
    t0, duration = float(spec["t0"]), float(spec["duration"])
    interval = float(spec.get("interval", 0.0))
    end = t0 + duration
    requests = [build_request(path, spec.get("headers", {})) for path in spec["paths"]]
    max_requests = int(spec.get("max_requests", 2_000_000))

    async def worker(index: int) -> None:
        conn = Connection(spec["host"], int(spec["port"]))
        cycle = itertools.cycle(
            requests[index % len(requests) :] + requests[: index % len(requests)]
        )
        # Stagger the connections so paced requests do not arrive in lockstep.
        nxt = t0 + (interval * index / max(1, int(spec["connections"])))
        try:
            while time.monotonic() < end and len(records.start) < max_requests:
                if interval:
                    await _sleep_until(nxt)
                    nxt += interval
                    if time.monotonic() >= end:
                        break
                await _one(conn, next(cycle), records)
        finally:
            conn.close()

    await _sleep_until(t0)
    await asyncio.gather(*(worker(i) for i in range(int(spec["connections"]))))


async def run_burst(spec: dict[str, Any], records: Records) -> None:
    raw = build_request(spec["path"], spec.get("headers", {}))
    conns = [Connection(spec["host"], int(spec["port"])) for _ in range(int(spec["connections"]))]
    await asyncio.gather(*(conn.open() for conn in conns))
    gate = asyncio.Event()

    async def fire(conn: Connection) -> None:
        await gate.wait()
        await _one(conn, raw, records)

    tasks = [asyncio.ensure_future(fire(conn)) for conn in conns]
    await asyncio.sleep(0.05)  # every task is parked on the gate before it opens
    gate.set()
    try:
        await asyncio.gather(*tasks)
    finally:
        for conn in conns:
            conn.close()


MODES = {"poll": run_poll, "steady": run_steady, "burst": run_burst}


# -- the parent's side ----------------------------------------------------------------------


@dataclass
class LoadResult:
    """The records of one load run, with the summaries the bench reports."""

    start: list[float]
    latency_ms: list[float]
    status: list[int]
    errors: list[str]

    @property
    def count(self) -> int:
        return len(self.status)

    def failures(self, ok: frozenset[int] = frozenset({200, 304})) -> int:
        """Requests that did not get an expected answer (transport errors included)."""
        return sum(1 for code in self.status if code not in ok)

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of the requests that started in [start, end)."""
        return [lat for t, lat in zip(self.start, self.latency_ms, strict=True) if start <= t < end]


def run_load(spec: dict[str, Any], workdir: Path, name: str, *, timeout: float) -> LoadResult:
    """Run a load generator to completion."""
    run = LoadRun(spec, workdir, name)
    try:
        start_together([run])
        return collect(run, timeout)
    finally:
        run.kill()


class LoadRun(SpecRun):
    """A load generator process started now; `collect(run, timeout)` returns its records."""

    def __init__(self, spec: dict[str, Any], workdir: Path, name: str) -> None:
        super().__init__("bench.httpload", spec, workdir, name)


def collect(run: SpecRun, timeout: float) -> LoadResult:
    data = run.wait(timeout)
    return LoadResult(
        start=data["start"],
        latency_ms=data["latency_ms"],
        status=data["status"],
        errors=data["errors"],
    )


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    spec["t0"] = child_handshake(spec)
    records = Records()
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(MODES[spec["mode"]](spec, records))
    Path(argv[1]).write_text(json.dumps(records.as_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
