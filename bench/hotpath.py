"""2. Hot-path throughput, 1 API worker, wrk in its own process, all endpoints side by side.

(a) bare FastAPI, constant bytes · (b) bare FastAPI, one redis.asyncio GET ·
(c) GET /api/v2/jobs/{id}, auth + ownership + ETag + statistics, cached ·
(d) the same with caching off, on PostgreSQL · (e) conditional polls answered 304 ·
(r) raw ASGI (no framework), one redis.asyncio EVALSHA: the floor of one script call.
Then (b), (c) and (r) at 1, 8, 64 and 256 concurrent clients (p50/p99), and the sizes of
the cache's batched reads (README "Performance") over the section, from /metrics.
The endpoints take turns within each round, so drift hits them all alike; the bench
reports medians over rounds and the ratios of each round's figures.

Placement: with BENCH_PIN=1 (issue 12's method), the server under load runs alone on
CPU 0 while wrk (one thread) and Redis share CPU 1; by default nothing is pinned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from math import nan
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.config import Config
from bench.procs import Child, can_pin, group_cpu_seconds, pin_group
from bench.stack import Api, Client, JobRef, Stack
from bench.stats import median, ratio
from bench.wrk import Throughput, throughput

LABELS = {
    "const": "(a) FastAPI, constant bytes",
    "redis_passthrough": "(b) FastAPI, one redis.asyncio GET",
    "cached_poll": "(c) GET /api/v2/jobs/{id}, cached",
    "uncached_poll": "(d) GET /api/v2/jobs/{id}, cache off (PostgreSQL)",
    "conditional_304": "(e) GET /api/v2/jobs/{id}, If-None-Match → 304",
    "raw_asgi_evalsha": "(r) raw ASGI, one redis.asyncio EVALSHA",
}
CONCURRENCY = (1, 8, 64, 256)
SERVER_CPU, LOAD_CPU = 0, 1  # with can_pin(): the server alone; wrk and Redis together
SWEPT = ("redis_passthrough", "cached_poll", "raw_asgi_evalsha")


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    expect: int
    server: int  # the serving process group, whose CPU time is read around each run


def prepare(
    stack: Stack,
    *,
    api_on: Api,
    api_off: Api,
    ref_const: Child,
    ref_redis: Child,
    ref_evalsha: Child,
    key: str,
) -> tuple[JobRef, dict[str, Target]]:
    """One hot job, cached; the reference key holds the same bytes; every target checked once."""
    client: Client = stack.clients[0]
    (job,) = stack.make_jobs(1, scenes=5)
    first = api_on.get(job.path, client)
    first.raise_for_status()
    etag = first.headers["etag"]
    stack.redis.client().set(key, first.content)
    auth = client.auth
    targets = {
        "const": Target(f"http://127.0.0.1:{ref_const.port}/const", {}, 200, ref_const.proc.pid),
        "redis_passthrough": Target(
            f"http://127.0.0.1:{ref_redis.port}/redis", {}, 200, ref_redis.proc.pid
        ),
        "cached_poll": Target(api_on.url(job.path), auth, 200, api_on.child.proc.pid),
        "uncached_poll": Target(api_off.url(job.path), auth, 200, api_off.child.proc.pid),
        "conditional_304": Target(
            api_on.url(job.path), {**auth, "If-None-Match": etag}, 304, api_on.child.proc.pid
        ),
        "raw_asgi_evalsha": Target(
            f"http://127.0.0.1:{ref_evalsha.port}/", {}, 200, ref_evalsha.proc.pid
        ),
    }
    for name, target in targets.items():
        status = stack.http.get(target.url, headers=target.headers).status_code
        if status != target.expect:
            raise RuntimeError(f"hot path {name}: expected {target.expect}, got {status}")
    return job, targets


def measure(
    stack: Stack,
    cfg: Config,
    target: Target,
    *,
    seconds: float,
    name: str,
    connections: int | None = None,
) -> Throughput:
    """One load run, with the server's CPU time per request (steadier than req/s here)."""
    connections = connections or cfg.wrk_connections
    pinned = can_pin()
    everywhere = os.sched_getaffinity(0) if pinned else set()
    if pinned:
        pin_group(target.server, {SERVER_CPU})
    cpu_before = group_cpu_seconds(target.server)
    try:
        result = throughput(
            target.url,
            headers=target.headers,
            duration=seconds,
            workdir=stack.workdir / "wrk",
            name=name,
            connections=connections,
            threads=1 if pinned else min(cfg.wrk_threads, connections),
            cpus={LOAD_CPU} if pinned else None,
        )
        cpu = group_cpu_seconds(target.server) - cpu_before
    finally:
        if pinned:
            pin_group(target.server, everywhere)
    return replace(result, server_cpu_us=1e6 * cpu / result.requests if result.requests else nan)


def batch_counts(stack: Stack, target: Target) -> dict[str, float]:
    """The API's batched-read counters (`renderwatch_cache_read_batches`, by size bucket,
    and `renderwatch_cache_batched_reads`) and DB statements (`db_queries`) from /metrics."""
    base = target.url.split("/api/", 1)[0]
    text = stack.http.get(base + "/metrics").text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "renderwatch_cache_read_batches_total":
                counts[sample.labels["size"]] = sample.value
            elif sample.name == "renderwatch_cache_batched_reads_total":
                counts["reads"] = sample.value
            elif sample.name == "renderwatch_db_queries_total":
                counts["db_queries"] = sample.value
    return counts


def run(stack: Stack, cfg: Config, targets: dict[str, Target]) -> dict[str, Any]:
    pinned = can_pin()
    if pinned:
        everywhere = os.sched_getaffinity(0)
        pin_group(stack.redis.child.proc.pid, {LOAD_CPU})
    try:
        return _run(stack, cfg, targets) | {
            "placement": (
                f"server on CPU {SERVER_CPU}; wrk (1 thread) and Redis on CPU {LOAD_CPU}"
                if pinned
                else "unpinned"
            )
        }
    finally:
        if pinned:
            pin_group(stack.redis.child.proc.pid, everywhere)


def _run(stack: Stack, cfg: Config, targets: dict[str, Target]) -> dict[str, Any]:
    batches_before = batch_counts(stack, targets["cached_poll"])
    if cfg.hot_warmup_seconds > 0:
        for name, target in targets.items():
            measure(stack, cfg, target, seconds=cfg.hot_warmup_seconds, name=f"warm-{name}")
    rounds: list[dict[str, Throughput]] = []
    for i in range(cfg.hot_rounds):
        rounds.append(
            {
                name: measure(stack, cfg, target, seconds=cfg.hot_seconds, name=f"{name}-{i}")
                for name, target in targets.items()
            }
        )
    sweep: dict[str, dict[str, dict[str, float]]] = {name: {} for name in SWEPT}
    for clients in CONCURRENCY:
        for name in SWEPT:
            result = measure(
                stack,
                cfg,
                targets[name],
                seconds=cfg.hot_seconds,
                name=f"{name}-c{clients}",
                connections=clients,
            )
            sweep[name][str(clients)] = {
                "rps": result.rps,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "server_cpu_us": result.server_cpu_us,
            }
    batches_after = batch_counts(stack, targets["cached_poll"])
    batches = {k: batches_after.get(k, 0.0) - batches_before.get(k, 0.0) for k in batches_after}
    # The hot job stays cached: a DB statement of (c)'s API during the section is a read
    # that went to the database anyway (a hedge, a failed call).
    db_queries = batches.pop("db_queries", nan)
    calls = sum(v for k, v in batches.items() if k != "reads")
    table = {
        name: {
            "rps": median([r[name].rps for r in rounds]),
            "p50_ms": median([r[name].p50_ms for r in rounds]),
            "p99_ms": median([r[name].p99_ms for r in rounds]),
            "server_cpu_us": median([r[name].server_cpu_us for r in rounds]),
            "errors": sum(r[name].errors for r in rounds),
        }
        for name in targets
    }
    ratios = {
        "cached_vs_redis_passthrough": median(
            [ratio(r["cached_poll"].rps, r["redis_passthrough"].rps) for r in rounds]
        ),
        "cached_vs_uncached": median(
            [ratio(r["cached_poll"].rps, r["uncached_poll"].rps) for r in rounds]
        ),
        "p99_cached_vs_redis_passthrough": median(
            [ratio(r["cached_poll"].p99_ms, r["redis_passthrough"].p99_ms) for r in rounds]
        ),
        "redis_passthrough_vs_const": median(
            [ratio(r["redis_passthrough"].rps, r["const"].rps) for r in rounds]
        ),
        "cpu_cached_vs_redis_passthrough": median(
            [
                ratio(r["cached_poll"].server_cpu_us, r["redis_passthrough"].server_cpu_us)
                for r in rounds
            ]
        ),
        "cached_vs_raw_asgi_evalsha": median(
            [ratio(r["cached_poll"].rps, r["raw_asgi_evalsha"].rps) for r in rounds]
        ),
        "cpu_cached_vs_raw_asgi_evalsha": median(
            [
                ratio(r["cached_poll"].server_cpu_us, r["raw_asgi_evalsha"].server_cpu_us)
                for r in rounds
            ]
        ),
        "304_vs_cached": median(
            [ratio(r["conditional_304"].rps, r["cached_poll"].rps) for r in rounds]
        ),
    }
    return {
        "table": table,
        "ratios": ratios,
        "concurrency": sweep,
        "batches": {
            "calls_by_size": {k: v for k, v in batches.items() if k != "reads"},
            "reads": batches.get("reads", 0.0),
            "mean": batches.get("reads", 0.0) / calls if calls else nan,
        },
        "db_queries_cached_api": db_queries,
        "rounds": [{name: t.as_dict() for name, t in r.items()} for r in rounds],
        "tool": rounds[0]["const"].tool if rounds else "none",
        "params": {
            "rounds": cfg.hot_rounds,
            "seconds": cfg.hot_seconds,
            "connections": cfg.wrk_connections,
            "threads": cfg.wrk_threads,
            "api_workers": 1,
        },
    }
