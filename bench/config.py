"""The sizes of a run: `FULL` for `make bench`, `QUICK` for the CI smoke test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Counts and durations of every section (quick: small and short, same shape)."""

    name: str
    # 1. the original table: jobs of `polls` polls, `interval` apart (3 s compressed)
    poll_rounds: int
    poll_jobs: int
    poll_clients: int
    poll_concurrency: int
    poll_polls: int
    poll_interval: float
    poll_scenes: int
    # 2. hot path (wrk)
    hot_rounds: int
    hot_seconds: float
    hot_warmup_seconds: float
    wrk_connections: int
    wrk_threads: int
    # 3. stampede
    stampede_rounds: int
    stampede_requests: int
    # 4. write path
    write_rounds: int
    write_updates: int
    # 5. Redis outage
    outage_connections: int
    outage_interval: float
    outage_before: float
    outage_pause: float
    outage_after: float
    hung_seconds: float
    # 6. scale
    scale_workers: tuple[int, ...]
    scale_rounds: int
    scale_pollers: tuple[int, ...]
    scale_interval: float
    scale_polls: int
    scale_write_rate: float
    # 7. live progress (SSE) against polling at 1 s, on one API process
    sse_streams: tuple[int, ...] = (500, 1_000, 2_000)
    sse_poll_clients: int = 500  # one of sse_streams: the clients compared
    sse_seconds: float = 10.0
    sse_write_rate: float = 10.0  # versions/s in total, over 100 jobs
    # 5. Redis outage, rounds (each: cache off, paused, hung; medians of the rounds)
    outage_rounds: int = 3
    # 8. slow database (every DB read of its API delayed this long)
    slowdb_rounds: int = 5
    slowdb_requests: int = 200
    slowdb_delay_ms: int = 600


FULL = Config(
    name="full",
    poll_rounds=3,
    poll_jobs=100,
    poll_clients=20,
    poll_concurrency=20,
    poll_polls=40,
    poll_interval=0.1,
    poll_scenes=5,
    hot_rounds=3,
    hot_seconds=8.0,
    hot_warmup_seconds=2.0,
    wrk_connections=64,
    wrk_threads=2,
    stampede_rounds=5,
    stampede_requests=200,
    write_rounds=5,
    write_updates=200,
    outage_connections=8,
    outage_interval=0.04,
    outage_before=3.0,
    outage_pause=4.0,
    outage_after=6.0,
    hung_seconds=8.0,
    scale_workers=(1, 2, 4),
    scale_rounds=2,
    scale_pollers=(10, 100, 1000),
    scale_interval=1.0,
    scale_polls=8,
    scale_write_rate=20.0,
)

QUICK = Config(
    name="quick",
    poll_rounds=1,
    poll_jobs=12,
    poll_clients=4,
    poll_concurrency=6,
    poll_polls=40,
    poll_interval=0.02,
    poll_scenes=3,
    hot_rounds=1,
    hot_seconds=1.0,
    hot_warmup_seconds=0.0,
    wrk_connections=32,
    wrk_threads=2,
    stampede_rounds=2,
    stampede_requests=200,
    write_rounds=2,
    write_updates=30,
    outage_connections=4,
    outage_interval=0.04,
    outage_before=0.5,
    outage_pause=1.5,
    outage_after=2.0,
    hung_seconds=2.0,
    scale_workers=(1, 2),
    scale_rounds=1,
    scale_pollers=(10, 40),
    scale_interval=0.5,
    scale_polls=5,
    scale_write_rate=10.0,
    sse_streams=(50, 100),
    sse_poll_clients=50,
    sse_seconds=2.0,
    slowdb_rounds=1,
    outage_rounds=1,
)
