"""6. Scale: cached-poll req/s with 1, 2 and 4 API workers; DB reads/s as pollers grow.

The DB line: N jobs, each polled every `interval` seconds by its own connection while
the writer advances them (every write pre-warms the cache). After one interval of
warm-up, the API's DB-query counter is read over a fixed window: with the cache on it
should stay flat as N grows; with it off it follows the request rate.
"""

from __future__ import annotations

import time
from typing import Any

from bench.config import Config
from bench.hotpath import Target, measure
from bench.httpload import LoadRun, collect
from bench.procs import SpecRun, start_together
from bench.stack import Api, JobRef, Stack
from bench.stats import median


def workers_rps(stack: Stack, cfg: Config, *, apis: dict[int, Api], job: JobRef) -> dict[str, Any]:
    """Median req/s of the cached poll per worker count (instances take turns per round)."""
    targets = {
        n: Target(api.url(job.path), job.client.auth, 200, api.child.proc.pid)
        for n, api in apis.items()
    }
    if cfg.hot_warmup_seconds > 0:
        for n, target in targets.items():
            measure(stack, cfg, target, seconds=cfg.hot_warmup_seconds, name=f"scale-warm-{n}w")
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in targets}
    for i in range(cfg.scale_rounds):
        for n, target in targets.items():
            result = measure(stack, cfg, target, seconds=cfg.hot_seconds, name=f"scale-{n}w-{i}")
            runs[n].append(
                {"rps": result.rps, "p99_ms": result.p99_ms, "cpu_us": result.server_cpu_us}
            )
    return {
        str(n): {
            "rps": median([r["rps"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "server_cpu_us": median([r["cpu_us"] for r in rs]),
        }
        for n, rs in runs.items()
    }


def db_line_point(stack: Stack, cfg: Config, api: Api, *, pollers: int) -> dict[str, float]:
    refs = stack.make_jobs(pollers, scenes=1_000)
    if api.cache:
        # Each job's first read is a miss by construction; the line is about the steady state.
        for ref in refs:
            api.get(ref.path, ref.client).raise_for_status()
    interval, polls = cfg.scale_interval, cfg.scale_polls
    settings = stack.settings(cache=api.cache)
    duration = interval * polls
    writer = SpecRun(
        "bench.writer",
        {
            "mode": "trickle",
            "database_url": settings.database_url,
            "redis_url": settings.redis_url,
            "cache_namespace": settings.cache_namespace,
            "duration": duration,
            "rate": cfg.scale_write_rate,
            "job_ids": [ref.job_id for ref in refs],
        },
        stack.workdir,
        f"scale-writer-{api.name}-{pollers}",
    )
    poller = LoadRun(
        {
            "mode": "poll",
            "host": "127.0.0.1",
            "port": api.port,
            "polls": polls,
            "interval": interval,
            "jobs": [
                {"path": ref.path, "offset": interval * i / pollers, "headers": ref.client.auth}
                for i, ref in enumerate(refs)
            ],
        },
        stack.workdir,
        f"scale-poll-{api.name}-{pollers}",
    )
    try:
        t0 = start_together([writer, poller])
        # Window: from the second round of polls to just before the last one goes out.
        start, end = t0 + 1.5 * interval, t0 + (polls - 0.5) * interval
        time.sleep(max(0.0, start - time.monotonic()))
        before, t_before = api.db_queries(), time.monotonic()
        time.sleep(max(0.0, end - time.monotonic()))
        after, t_after = api.db_queries(), time.monotonic()
        result = collect(poller, duration + 300.0)
        writer.wait(duration + 60.0)
    finally:
        poller.kill()
        writer.kill()
    answered = sum(1 for t in result.start if t_before <= t < t_after)
    seconds = t_after - t_before
    return {
        "pollers": pollers,
        "rps": answered / seconds,
        "db_reads_per_s": (after - before) / seconds,
        "errors": result.failures(frozenset({200})),
    }


def db_line(stack: Stack, cfg: Config, *, api_on: Api, api_off: Api) -> list[dict[str, float]]:
    points: list[dict[str, float]] = []
    for n in cfg.scale_pollers:
        on = db_line_point(stack, cfg, api_on, pollers=n)
        off = db_line_point(stack, cfg, api_off, pollers=n)
        points.append(
            {
                "pollers": n,
                "rps_on": on["rps"],
                "db_reads_per_s_on": on["db_reads_per_s"],
                "rps_off": off["rps"],
                "db_reads_per_s_off": off["db_reads_per_s"],
                "errors": on["errors"] + off["errors"],
            }
        )
    return points
