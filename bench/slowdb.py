"""8. Slow database: cold polls of one job while every DB read takes `slowdb_delay_ms`.

An API instance (`bench.slowapi`: the real API, every SELECT delayed in PostgreSQL with
`pg_sleep`) on the run's Redis and database. Each round drops the job's entry, sends N
cold polls at once (wave 1), then N more polls at once as soon as wave 1 is answered
(wave 2). Wave 1's DB reads are the API's query-counter delta; wave 2's hit rate is the
delta of the cache's global `hits` / (`hits` + `misses`) (`GET /api/v2/cache/stats`).
The fill lease outlasts the DB statement timeout (README "The cache and its guarantees"),
so the one reader that reads the DB fills, and the others wait for its fill.
"""

from __future__ import annotations

import time
from typing import Any

from bench.config import Config
from bench.httpload import run_load
from bench.procs import wait_http
from bench.stack import Api, JobRef, Stack
from bench.stats import median, percentile
from shared.cache import invalidate_job_cache

MODULE = "bench.slowapi"


def launch(stack: Stack, cfg: Config) -> Api:
    """Start the slow-DB API instance (readiness: `ready`)."""
    return stack.launch_api(
        "api-slow-db",
        cache=True,
        module=MODULE,
        extra_env={"BENCH_DB_DELAY_MS": str(cfg.slowdb_delay_ms)},
    )


def ready(api: Api, job: JobRef) -> None:
    # Only the job's client's key is resolved (each key lookup is a slow read too).
    wait_http(api.child, api.url("/healthz"), timeout=60.0)
    api.cache_counts(job.client)


def wave(stack: Stack, cfg: Config, api: Api, job: JobRef, name: str) -> dict[str, float]:
    """N polls at once; DB reads and cache hits/misses are the deltas around them."""
    counts = api.cache_counts(job.client)
    before = api.db_queries()
    result = run_load(
        {
            "mode": "burst",
            "host": "127.0.0.1",
            "port": api.port,
            "path": job.path,
            "headers": job.client.auth,
            "connections": cfg.slowdb_requests,
        },
        stack.workdir,
        name,
        timeout=120.0,
    )
    db_reads = api.db_queries() - before
    after = api.cache_counts(job.client)
    hits = int(after["hits"]) - int(counts["hits"])
    misses = int(after["misses"]) - int(counts["misses"])
    return {
        "db_reads": db_reads,
        "requests": result.count,
        "errors": result.failures(frozenset({200})),
        "hits": hits,
        "misses": misses,
        "hit_rate": round(100.0 * hits / (hits + misses), 2) if hits + misses else float("nan"),
        "p50_ms": percentile(result.latency_ms, 50),
        "p99_ms": percentile(result.latency_ms, 99),
    }


def round_trip(stack: Stack, cfg: Config, api: Api, job: JobRef, i: int) -> dict[str, Any]:
    if not invalidate_job_cache(job.job_id):
        raise RuntimeError("slow DB: could not invalidate the job (Redis unavailable?)")
    first = wave(stack, cfg, api, job, f"slowdb-{i}-cold")
    second = wave(stack, cfg, api, job, f"slowdb-{i}-next")
    return {"cold": first, "next": second}


def run(stack: Stack, cfg: Config, *, api: Api, job: JobRef) -> dict[str, Any]:
    # A first burst of hits opens the API's Redis and HTTP connections (a connection
    # storm, measured in section 3), so the rounds measure the slow DB alone.
    api.get(job.path, job.client).raise_for_status()
    run_load(
        {
            "mode": "burst",
            "host": "127.0.0.1",
            "port": api.port,
            "path": job.path,
            "headers": job.client.auth,
            "connections": cfg.slowdb_requests,
        },
        stack.workdir,
        "slowdb-warmup",
        timeout=120.0,
    )
    time.sleep(0.5)
    rounds = []
    for i in range(cfg.slowdb_rounds):
        rounds.append(round_trip(stack, cfg, api, job, i))
        time.sleep(0.2)
    cold = [r["cold"] for r in rounds]
    nxt = [r["next"] for r in rounds]
    return {
        "db_reads": median([r["db_reads"] for r in cold]),
        "db_reads_max": max(r["db_reads"] for r in cold),
        "next_wave_hit_rate": median([r["hit_rate"] for r in nxt]),
        "next_wave_hit_rate_min": min(r["hit_rate"] for r in nxt),
        "next_wave_db_reads_max": max(r["db_reads"] for r in nxt),
        "p50_ms": median([r["p50_ms"] for r in cold]),
        "p99_ms": median([r["p99_ms"] for r in cold]),
        "errors": sum(r["errors"] for r in cold) + sum(r["errors"] for r in nxt),
        "rounds": rounds,
        "params": {
            "requests": cfg.slowdb_requests,
            "rounds": cfg.slowdb_rounds,
            "delay_ms": cfg.slowdb_delay_ms,
        },
    }
