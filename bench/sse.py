"""Section 7: live progress over SSE against polling, on one API process.

N concurrent streams (`cfg.sse_streams`, e.g. 500 / 1,000 / 2,000) follow 100 jobs
while the bench process writes 10 versions/s in total (`cfg.sse_write_rate`) through
the real write path (DB, pre-warm, publish). Measured per N:

- write-to-client latency: from the version's `updated_at` (set by the writer just
  before its commit) to the moment a client reads the event, p50 / p99;
- RSS per open stream: the API's resident memory with N streams open minus before,
  divided by N (KiB);
- API CPU per delivered event (the API's process group, user + system).

Then the same clients poll instead, once a second each (`GET /jobs/{id}`, a cached
hit), for the same window: DB reads/s and API CPU. The ratio of CPU (push / polling)
at equal clients is `sse_cpu_ratio_vs_poll`; polling at 1 s is also the less fresh of
the two (0.5 s mean staleness against the push latency above).

The clients run in a separate process (`python -m bench.sse SPEC OUT`): plain asyncio
sockets, one connection per stream, so the client side stays cheap at 2,000 streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.config import Config
from bench.procs import SpecRun, child_handshake, group_cpu_seconds, start_together
from bench.stack import API_PREFIX, Api, Stack

JOBS = 100
SCENES = 1_000  # enough versions for every window
_PAGE = os.sysconf("SC_PAGE_SIZE")


def group_rss_kib(pgid: int) -> float:
    """Resident memory (KiB) of every live process of a process group."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[21])
    return total * _PAGE / 1024


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# -- the section (bench process) ------------------------------------------------------------


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    """The section on a fresh API process (its memory not yet grown by other sections,
    so the RSS per stream is not hidden in memory the allocator already holds)."""
    api = stack.launch_api("api-sse", cache=True)
    try:
        stack.wait_ready(api)
        return _run(stack, cfg, api)
    finally:
        stack.stop_api(api)


def _run(stack: Stack, cfg: Config, api: Api) -> dict[str, Any]:
    assert stack.runtime is not None
    client = stack.clients[0]
    refs = stack.make_jobs(JOBS, scenes=SCENES, clients=[client])
    cache = stack.runtime.cache
    # Move every job to rendering (and warm its entry), so each later write is a scene.
    for ref in refs:
        cache.update_progress(ref.job_id, {"current_stage": "rendering", "scenes_completed": 0})
    scenes = dict.fromkeys((ref.job_id for ref in refs), 0)
    workdir = stack.workdir / "sse"
    pgid = api.child.proc.pid
    base = {"host": "127.0.0.1", "port": api.port, "key": client.key,
            "jobs": [ref.job_id for ref in refs], "seconds": cfg.sse_seconds}  # fmt: skip
    rows: dict[str, Any] = {}
    for n in cfg.sse_streams:
        rows[str(n)] = _measure(stack, api, pgid, workdir, {**base, "mode": "sse", "n": n},
                                scenes, cfg)  # fmt: skip
    n_poll = cfg.sse_poll_clients
    polling = _measure(stack, api, pgid, workdir, {**base, "mode": "poll", "n": n_poll,
                                                    "interval": 1.0}, scenes, cfg)  # fmt: skip
    held = [int(n) for n, row in rows.items() if row["connected"] == int(n)]
    push = rows[str(n_poll)]
    ratio = push["api_cpu_s"] / polling["api_cpu_s"] if polling["api_cpu_s"] > 0 else float("nan")
    at_2000 = rows.get("2000")
    return {
        "streams": rows,
        "polling": polling,
        "compare_clients": n_poll,
        "max_streams": max(held) if held else 0,
        "p99_ms_at_2000": at_2000["p99_ms"] if at_2000 else float("nan"),
        "largest": max(int(n) for n in rows),
        "kib_per_stream": rows[str(max(int(n) for n in rows))]["kib_per_stream"],
        "cpu_ratio_vs_poll": ratio,
        "write_rate": cfg.sse_write_rate,
        "seconds": cfg.sse_seconds,
    }


def _measure(
    stack: Stack,
    api: Api,
    pgid: int,
    workdir: Path,
    spec: dict[str, Any],
    scenes: dict[int, int],
    cfg: Config,
) -> dict[str, Any]:
    assert stack.runtime is not None
    cache = stack.runtime.cache
    time.sleep(1.0)  # let the previous clients' connections close
    rss_before = group_rss_kib(pgid)
    clients = SpecRun("bench.sse", spec, workdir, f"{spec['mode']}-{spec['n']}")
    t0 = start_together([clients], lead=0.5, timeout=120.0)
    rss_open = group_rss_kib(pgid)
    while time.monotonic() < t0:
        time.sleep(0.01)
    cpu0, db0 = group_cpu_seconds(pgid), api.db_queries()
    period = 1.0 / cfg.sse_write_rate
    ids = list(scenes)
    writes = 0
    next_at = t0
    end = t0 + cfg.sse_seconds
    while (now := time.monotonic()) < end:
        if now < next_at:
            time.sleep(min(next_at - now, 0.01))
            continue
        job_id = ids[writes % len(ids)]
        scenes[job_id] += 1
        cache.update_progress(
            job_id, {"current_stage": "rendering", "scenes_completed": scenes[job_id]}
        )
        writes += 1
        next_at += period
    cpu = group_cpu_seconds(pgid) - cpu0
    db_reads = api.db_queries() - db0
    result = clients.wait(timeout=cfg.sse_seconds + 120.0)
    latencies = result["latencies_ms"]
    n = spec["n"]
    events = result["events"]
    return {
        "mode": spec["mode"],
        "clients": n,
        "connected": result["connected"],
        "errors": result["errors"],
        "writes": writes,
        "events": events,
        "requests": result["requests"],
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "kib_per_stream": max(rss_open - rss_before, 0.0) / n if spec["mode"] == "sse" else None,
        "api_cpu_s": cpu,
        "api_cpu_ms_per_event": 1000 * cpu / events if events else float("nan"),
        "db_reads_per_s": db_reads / cfg.sse_seconds,
    }


# -- the clients (a child process) ------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.connected = 0
        self.errors = 0
        self.events = 0
        self.requests = 0
        self.latencies: list[float] = []
        self.measuring = False


def _latency_ms(line: bytes) -> float:
    body = json.loads(line[6:])
    written = datetime.fromisoformat(body["updated_at"]).timestamp()
    return (time.time() - written) * 1000


async def _stream(spec: dict[str, Any], job_id: int, tally: Tally, ready: asyncio.Event) -> None:
    path = f"{API_PREFIX}/jobs/{job_id}/events"
    try:
        reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    except OSError:
        tally.errors += 1
        return
    request = (f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {spec['key']}\r\n"
               "Accept: text/event-stream\r\n\r\n")  # fmt: skip
    writer.write(request.encode())
    first = True
    try:
        while line := await reader.readline():
            if not line.startswith(b"data: "):
                continue
            if first:
                first = False
                tally.connected += 1
                if tally.connected == spec["n"]:
                    ready.set()
                continue
            if tally.measuring:
                tally.events += 1
                tally.latencies.append(_latency_ms(line))
    except (OSError, asyncio.IncompleteReadError):
        tally.errors += 1
    except asyncio.CancelledError:
        pass
    finally:
        writer.close()


async def _poller(spec: dict[str, Any], job_id: int, tally: Tally, offset: float) -> None:
    path = f"{API_PREFIX}/jobs/{job_id}"
    request = (f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {spec['key']}\r\n"
               "\r\n").encode()  # fmt: skip
    try:
        reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    except OSError:
        tally.errors += 1
        return
    tally.connected += 1
    await asyncio.sleep(offset)
    try:
        while True:
            started = time.monotonic()
            writer.write(request)
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if tally.measuring:
                tally.requests += 1
            await asyncio.sleep(max(0.0, spec["interval"] - (time.monotonic() - started)))
    except (OSError, asyncio.IncompleteReadError):
        tally.errors += 1
    except asyncio.CancelledError:
        pass
    finally:
        writer.close()


async def _clients(spec: dict[str, Any]) -> dict[str, Any]:
    tally = Tally()
    ready = asyncio.Event()
    jobs = spec["jobs"]
    n = spec["n"]
    tasks = []
    for i in range(n):
        job_id = jobs[i % len(jobs)]
        if spec["mode"] == "sse":
            tasks.append(asyncio.create_task(_stream(spec, job_id, tally, ready)))
        else:
            offset = spec["interval"] * i / n  # spread the polls over the interval
            tasks.append(asyncio.create_task(_poller(spec, job_id, tally, offset)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # do not flood the accept queue
    if spec["mode"] == "sse":
        with contextlib.suppress(TimeoutError):  # then report how many connected
            await asyncio.wait_for(ready.wait(), 60)
    t0 = await asyncio.to_thread(child_handshake, spec)
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    tally.measuring = True
    await asyncio.sleep(spec["seconds"])
    tally.measuring = False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "connected": tally.connected,
        "errors": tally.errors,
        "events": tally.events,
        "requests": tally.requests,
        "latencies_ms": tally.latencies,
        "median_ms": statistics.median(tally.latencies) if tally.latencies else None,
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(_clients(spec))
    Path(out_path).write_text(json.dumps(result))


def only(quick: bool) -> dict[str, Any]:
    """`python -m bench.sse --only [--quick]`: this section alone, on its own services
    (for working on it; `make bench` runs it with the others)."""
    import shutil
    import tempfile

    from bench.config import FULL, QUICK
    from bench.procs import ProcessGroup
    from bench.services import DEFAULT_PG_ADMIN_URL, private_database, start_redis

    cfg = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="rw-bench-sse-"))
    admin = os.environ.get("BENCH_PG_URL", DEFAULT_PG_ADMIN_URL)
    with private_database(admin) as database_url, ProcessGroup(workdir / "logs") as group:
        redis = start_redis(group, workdir / "redis")
        stack = Stack(group=group, workdir=workdir, database_url=database_url, redis=redis)
        try:
            stack.start_runtime()
            stack.make_clients(1)
            return run(stack, cfg)
        finally:
            stack.close()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--only"]:
        print(json.dumps(only("--quick" in sys.argv), indent=2))
    else:
        main(sys.argv[1], sys.argv[2])
