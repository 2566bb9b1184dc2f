"""1. The original table: jobs polled 40 times at 3 s (time compressed), cache off vs on.

Each round creates fresh jobs for many clients straight in the DB (so each job's first
poll is a miss), then runs two processes side by side: the poller (one keep-alive
connection per job, `polls` requests `interval` apart, jobs staggered so about
`concurrency` are polled at once) and the writer, which walks every job through its
whole render with `update_job_progress_with_cache` during its polling window. DB
queries are the API's own `renderwatch_db_queries_total` (before/after); hits and
misses come from GET /api/v2/cache/stats (before/after).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.config import Config
from bench.httpload import LoadRun, collect
from bench.procs import SpecRun, start_together
from bench.stack import Api, Stack
from bench.stats import mean, median, percentile


@dataclass
class PollRound:
    """One round on one API instance."""

    jobs: int
    requests: int
    errors: int
    db_queries: int
    hits: int
    misses: int
    latency_ms: list[float]
    writer: dict[str, Any]

    def row(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {
            "total_requests": self.requests,
            "errors": self.errors,
            "db_queries": self.db_queries,
            "db_queries_per_job": self.db_queries / self.jobs,
            "cache_hits": self.hits,
            "hit_rate": 100.0 * self.hits / total if total else 0.0,
            "mean_ms": mean(self.latency_ms),
            "p50_ms": percentile(self.latency_ms, 50),
            "p99_ms": percentile(self.latency_ms, 99),
        }


def poll_round(stack: Stack, api: Api, cfg: Config, *, tag: str) -> PollRound:
    """Run one polling round against `api`, the writer using the same cache setting."""
    refs = stack.make_jobs(cfg.poll_jobs, scenes=cfg.poll_scenes)
    window = (cfg.poll_polls - 1) * cfg.poll_interval
    stagger = (window + cfg.poll_interval) / cfg.poll_concurrency
    offsets = [i * stagger for i in range(len(refs))]
    probe = stack.clients[0]
    db_before = api.db_queries()
    counts_before = api.cache_counts(probe)
    settings = stack.settings(cache=api.cache)
    writer = SpecRun(
        "bench.writer",
        {
            "mode": "lifecycle",
            "database_url": settings.database_url,
            "redis_url": settings.redis_url,
            "cache_namespace": settings.cache_namespace,
            "window": window,
            "deadline": offsets[-1] + window + 30.0,
            "jobs": [
                {"job_id": ref.job_id, "offset": off, "scenes": cfg.poll_scenes}
                for ref, off in zip(refs, offsets, strict=True)
            ],
        },
        stack.workdir,
        f"poll-writer-{tag}",
    )
    poller = LoadRun(
        {
            "mode": "poll",
            "host": "127.0.0.1",
            "port": api.port,
            "polls": cfg.poll_polls,
            "interval": cfg.poll_interval,
            "jobs": [
                {"path": ref.path, "offset": off, "headers": ref.client.auth}
                for ref, off in zip(refs, offsets, strict=True)
            ],
        },
        stack.workdir,
        f"poll-{tag}",
    )
    budget = offsets[-1] + window + 120.0
    try:
        start_together([writer, poller])
        result = collect(poller, budget)
        written = writer.wait(budget)
    finally:
        poller.kill()
        writer.kill()
    db_after = api.db_queries()
    counts_after = api.cache_counts(probe)
    return PollRound(
        jobs=len(refs),
        requests=result.count,
        errors=result.failures(frozenset({200})),
        db_queries=db_after - db_before,
        hits=int(counts_after["hits"]) - int(counts_before["hits"]),
        misses=int(counts_after["misses"]) - int(counts_before["misses"]),
        latency_ms=result.latency_ms,
        writer=written,
    )


def run(stack: Stack, cfg: Config, *, api_off: Api, api_on: Api) -> dict[str, Any]:
    """Alternate off/on rounds; medians per row across rounds."""
    rounds: dict[str, list[PollRound]] = {"off": [], "on": []}
    for i in range(cfg.poll_rounds):
        for label, api in (("off", api_off), ("on", api_on)):
            rounds[label].append(poll_round(stack, api, cfg, tag=f"{label}-{i}"))
    table: dict[str, dict[str, float]] = {}
    for label, runs in rounds.items():
        rows = [r.row() for r in runs]
        table[label] = {key: median([row[key] for row in rows]) for key in rows[0]}
    return {
        "table": table,
        "rounds": {label: [r.row() for r in runs] for label, runs in rounds.items()},
        "writer": {label: [r.writer for r in runs] for label, runs in rounds.items()},
        "latency_ms": {
            label: [x for r in runs for x in r.latency_ms] for label, runs in rounds.items()
        },
        "params": {
            "jobs_per_round": cfg.poll_jobs,
            "clients": cfg.poll_clients,
            "polls_per_job": cfg.poll_polls,
            "interval_s": cfg.poll_interval,
            "concurrent_jobs": cfg.poll_concurrency,
            "scenes": cfg.poll_scenes,
            "rounds": cfg.poll_rounds,
        },
    }
