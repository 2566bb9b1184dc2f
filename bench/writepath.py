"""4. Write path: `update_job_progress_with_cache` against the bare DB update, same run.

Both sides validate the same update and run the same DB transaction on PostgreSQL
(`shared.jobs.update_job_progress`); the cached side adds the versioned pre-warm, the
list invalidation and the publish. Blocks of updates alternate; the ratio is taken per
round. Redis round trips are counted on the bench runtime's connections (one
`send_packed_command` per command or pipeline), those the updating thread sent apart
from the statistics flusher thread's (in the background, once a second, whatever the
rate of updates) and from a new connection's set-up (HELLO, CLIENT SETINFO: the pool's,
not the update's); `INFO commandstats` gives the commands.
"""

from __future__ import annotations

import time
from itertools import cycle
from typing import Any

from bench.config import Config
from bench.stack import CountingConnection, Stack
from bench.stats import median, ratio
from shared import jobs
from shared.cache import update_job_progress_with_cache
from shared.schemas import ProgressUpdate

JOBS = 12
WARMUP = 10


def _commandstats(stack: Stack) -> dict[str, int]:
    info = stack.redis.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    runtime = stack.runtime
    assert runtime is not None
    total = cfg.write_rounds * cfg.write_updates * 2 + 2 * WARMUP
    refs = stack.make_jobs(JOBS, scenes=min(1_000, total // JOBS + 2))
    scenes = {ref.job_id: 0 for ref in refs}
    order = cycle([ref.job_id for ref in refs])

    def next_update() -> tuple[int, dict[str, Any]]:
        job_id = next(order)
        scenes[job_id] += 1
        return job_id, {"current_stage": "rendering", "scenes_completed": scenes[job_id]}

    def bare(job_id: int, progress: dict[str, Any]) -> None:
        with runtime.sessions() as session:
            if (
                jobs.update_job_progress(job_id, ProgressUpdate.parse(progress), session=session)
                is None
            ):
                raise RuntimeError(f"write path: job {job_id} vanished")

    def cached(job_id: int, progress: dict[str, Any]) -> None:
        if not update_job_progress_with_cache(job_id, progress):
            raise RuntimeError(f"write path: job {job_id} vanished")

    def block(write: Any) -> float:
        times: list[float] = []
        for _ in range(cfg.write_updates):
            job_id, progress = next_update()
            start = time.perf_counter()
            write(job_id, progress)
            times.append(time.perf_counter() - start)
        return median(times) * 1000.0

    # Warm both paths (connections, scripts loaded, statements compiled).
    for _ in range(WARMUP):
        bare(*next_update())
        cached(*next_update())
    rounds: list[dict[str, float]] = []
    trips = background = handshakes = 0
    calls_before = _commandstats(stack)
    for _ in range(cfg.write_rounds):
        bare_ms = block(bare)
        handshakes_before = CountingConnection.handshakes
        sent_before, here_before = CountingConnection.sent, CountingConnection.sent_here()
        cached_ms = block(cached)
        here = CountingConnection.sent_here() - here_before
        trips += here
        background += CountingConnection.sent - sent_before - here
        handshakes += CountingConnection.handshakes - handshakes_before
        rounds.append(
            {"bare_ms": bare_ms, "cached_ms": cached_ms, "ratio": ratio(cached_ms, bare_ms)}
        )
    calls_after = _commandstats(stack)
    updates = cfg.write_rounds * cfg.write_updates
    commands = {
        name: (calls_after.get(name, 0) - calls_before.get(name, 0)) / updates
        for name in calls_after
        if name not in ("info",) and calls_after.get(name, 0) != calls_before.get(name, 0)
    }
    return {
        "bare_ms": median([r["bare_ms"] for r in rounds]),
        "cached_ms": median([r["cached_ms"] for r in rounds]),
        "ratio": median([r["ratio"] for r in rounds]),
        "redis_round_trips": trips / updates,
        "background_round_trips": background,
        "connection_handshake_commands": handshakes,
        "redis_commands_per_update": commands,
        "rounds": rounds,
        "params": {"rounds": cfg.write_rounds, "updates_per_block": cfg.write_updates},
    }
