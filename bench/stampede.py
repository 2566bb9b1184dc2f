"""3. Stampede: N concurrent cold requests for one job → how many DB reads, what p99.

Each round drops the job's entry (`invalidate_job_cache`), opens N connections, then
releases one request on each at once. DB reads are the API's query-counter delta.
"""

from __future__ import annotations

import time
from typing import Any

from bench.config import Config
from bench.httpload import run_load
from bench.stack import Api, JobRef, Stack
from bench.stats import median, percentile
from shared.cache import invalidate_job_cache


def burst(stack: Stack, cfg: Config, api_on: Api, job: JobRef, name: str) -> dict[str, float]:
    """Drop the entry, then N requests at once; DB reads are the API's counter delta."""
    if not invalidate_job_cache(job.job_id):
        raise RuntimeError("stampede: could not invalidate the job (Redis unavailable?)")
    before = api_on.db_queries()
    result = run_load(
        {
            "mode": "burst",
            "host": "127.0.0.1",
            "port": api_on.port,
            "path": job.path,
            "headers": job.client.auth,
            "connections": cfg.stampede_requests,
        },
        stack.workdir,
        name,
        timeout=120.0,
    )
    after = api_on.db_queries()
    return {
        "db_reads": after - before,
        "requests": result.count,
        "errors": result.failures(frozenset({200})),
        "p50_ms": percentile(result.latency_ms, 50),
        "p99_ms": percentile(result.latency_ms, 99),
        "max_ms": max(result.latency_ms, default=float("nan")),
    }


def run(stack: Stack, cfg: Config, *, api_on: Api, job: JobRef) -> dict[str, Any]:
    # The first burst also opens the API's Redis connections beyond its warm pool: a
    # connection storm, not a stampede. It is reported apart, not counted in the rounds.
    first = burst(stack, cfg, api_on, job, "stampede-first")
    time.sleep(0.5)
    rounds: list[dict[str, float]] = []
    for i in range(cfg.stampede_rounds):
        rounds.append(burst(stack, cfg, api_on, job, f"stampede-{i}"))
        time.sleep(0.2)
    return {
        "first_burst": first,
        "db_reads": median([r["db_reads"] for r in rounds]),
        "db_reads_max": max(r["db_reads"] for r in rounds),
        "p99_ms": median([r["p99_ms"] for r in rounds]),
        "p50_ms": median([r["p50_ms"] for r in rounds]),
        "errors": sum(r["errors"] for r in rounds),
        "rounds": rounds,
        "params": {"requests": cfg.stampede_requests, "rounds": cfg.stampede_rounds},
    }
