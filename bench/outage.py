"""5. Redis outage: steady polls while Redis is paused, and against a hung Redis.

Paused: the run's PRIVATE redis-server gets `CLIENT PAUSE <ms> ALL` mid-run (the pause
ends by itself, so no command of ours has to get through it). Hung: an API instance
whose REDIS_URL points at a TCP server that accepts and never answers. Both are
compared with the cache-off API under the same load, in `outage_rounds` rounds (cache off,
paused, hung in turn): a p99 of a few hundred requests on this machine moves by tens of
ms from run to run, so the figures are medians of the rounds. Recovery: after the pause ends,
the end of the first 200 ms window in which the global hits counter grows by at least
half the requests answered in it (commands queued during the pause cannot fake that:
at most one per connection was in flight).
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

import redis

from bench.config import Config
from bench.httpload import LoadResult, LoadRun, collect
from bench.procs import start_together
from bench.stack import Api, JobRef, Stack
from bench.stats import median, percentile

SLOW_MS = 100.0  # a request this slow waited on Redis (the socket timeout is 250 ms)
WINDOW = 0.2
SAMPLE_EVERY = 0.02


def steady_spec(api: Api, refs: list[JobRef], cfg: Config, *, duration: float) -> dict[str, Any]:
    # One client's key for every request: ownership holds because its jobs are used only.
    client = refs[0].client
    return {
        "mode": "steady",
        "host": "127.0.0.1",
        "port": api.port,
        "paths": [ref.path for ref in refs if ref.client == client],
        "headers": client.auth,
        "connections": cfg.outage_connections,
        "interval": cfg.outage_interval,
        "duration": duration,
    }


def steady(
    stack: Stack, api: Api, refs: list[JobRef], cfg: Config, *, duration: float, name: str
) -> LoadResult:
    run = LoadRun(steady_spec(api, refs, cfg, duration=duration), stack.workdir, name)
    try:
        start_together([run])
        return collect(run, duration + 60.0)
    finally:
        run.kill()


class HitSampler(threading.Thread):
    """Samples the global hits counter from `start` on (a fresh connection, short timeout)."""

    def __init__(self, stack: Stack, *, start: float, stop: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.start_at, self.stop_at = stack, start, stop
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        key = f"{self.stack.namespace}:cache:stats"
        delay = self.start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client = self.stack.redis.client(timeout=0.5)
        try:
            while time.monotonic() < self.stop_at:
                try:
                    hits = int(client.hget(key, "hits") or 0)
                except (redis.RedisError, OSError):
                    hits = -1
                if hits >= 0:
                    self.samples.append((time.monotonic(), hits))
                time.sleep(SAMPLE_EVERY)
        finally:
            client.close()


def recovery_seconds(result: LoadResult, samples: list[tuple[float, int]], resumed: float) -> float:
    """Seconds from `resumed` to the end of the first window where hits cover half the answers.

    The window's end, not its start: caching certainly works by then (an upper bound).
    """
    ends = sorted(t + lat / 1000.0 for t, lat in zip(result.start, result.latency_ms, strict=True))
    for i, (t_i, hits_i) in enumerate(samples):
        later = [(t, h) for t, h in samples[i + 1 :] if t >= t_i + WINDOW]
        if not later:
            break
        t_j, hits_j = later[0]
        answered = bisect.bisect_left(ends, t_j) - bisect.bisect_left(ends, t_i)
        if answered > 0 and hits_j - hits_i >= 0.5 * answered:
            return max(0.0, t_j - resumed)
    return float("nan")


def _slow(latencies: list[float]) -> int:
    return sum(1 for lat in latencies if lat >= SLOW_MS)


def _paused(
    stack: Stack, api_on: Api, refs: list[JobRef], cfg: Config, *, name: str
) -> tuple[LoadResult, list[float], float]:
    """One run with Redis paused mid-way: (the run, latencies sent during the pause,
    seconds until caching resumed)."""
    total = cfg.outage_before + cfg.outage_pause + cfg.outage_after
    run_paused = LoadRun(steady_spec(api_on, refs, cfg, duration=total), stack.workdir, name)
    try:
        t0 = start_together([run_paused])
        pause_at = t0 + cfg.outage_before
        resumed = pause_at + cfg.outage_pause
        sampler = HitSampler(stack, start=resumed, stop=t0 + total + 0.5)
        sampler.start()
        time.sleep(max(0.0, pause_at - time.monotonic()))
        admin = stack.redis.client()
        # The pause ends by itself: nothing of ours has to get through it to lift it.
        admin.execute_command("CLIENT", "PAUSE", str(int(cfg.outage_pause * 1000)), "ALL")
        admin.close()
        paused = collect(run_paused, total + 60.0)
        sampler.join(timeout=total + 5.0)
    finally:
        run_paused.kill()
    return (
        paused,
        paused.window(pause_at, resumed),
        recovery_seconds(paused, sampler.samples, resumed),
    )


def run(
    stack: Stack, cfg: Config, *, api_on: Api, api_off: Api, api_hung: Api, refs: list[JobRef]
) -> dict[str, Any]:
    for ref in refs:  # warm every entry, and the keys and DB connections of every instance
        for api in (api_on, api_off, api_hung):
            api.get(ref.path, ref.client).raise_for_status()
    total = cfg.outage_before + cfg.outage_pause + cfg.outage_after
    ok = frozenset({200})
    rounds: list[dict[str, Any]] = []
    for i in range(cfg.outage_rounds):
        baseline = steady(stack, api_off, refs, cfg, duration=total, name=f"outage-off-{i}")
        paused, during, recovery = _paused(stack, api_on, refs, cfg, name=f"outage-paused-{i}")
        hung = steady(stack, api_hung, refs, cfg, duration=cfg.hung_seconds, name=f"hung-{i}")
        off_p99 = percentile(baseline.latency_ms, 99)
        rounds.append(
            {
                "cache_off": {
                    "requests": baseline.count,
                    "errors": baseline.failures(ok),
                    "slow": _slow(baseline.latency_ms),
                    "p50_ms": percentile(baseline.latency_ms, 50),
                    "p99_ms": off_p99,
                },
                "paused": {
                    "requests": paused.count,
                    "requests_during_pause": len(during),
                    "errors": paused.failures(ok),
                    "slow": _slow(during),
                    "p50_ms_during_pause": percentile(during, 50),
                    "p99_ms_during_pause": percentile(during, 99),
                    "p99_ms_whole_run": percentile(paused.latency_ms, 99),
                    "max_ms_during_pause": max(during, default=float("nan")),
                    "error_samples": paused.errors[:5],
                },
                "hung": {
                    "requests": hung.count,
                    "errors": hung.failures(ok),
                    "slow": _slow(hung.latency_ms),
                    "p50_ms": percentile(hung.latency_ms, 50),
                    "p99_ms": percentile(hung.latency_ms, 99),
                    "max_ms": max(hung.latency_ms, default=float("nan")),
                    "error_samples": hung.errors[:5],
                },
                "p99_delta_ms_paused": percentile(during, 99) - off_p99,
                "p99_delta_ms_hung": percentile(hung.latency_ms, 99) - off_p99,
                "recovery_seconds": recovery,
            }
        )
    delta_paused = median([r["p99_delta_ms_paused"] for r in rounds])
    delta_hung = median([r["p99_delta_ms_hung"] for r in rounds])
    return {
        "errors": sum(r["paused"]["errors"] + r["hung"]["errors"] for r in rounds),
        "paused": _merge([r["paused"] for r in rounds]),
        "hung": _merge([r["hung"] for r in rounds]),
        "cache_off": _merge([r["cache_off"] for r in rounds]),
        "p99_delta_ms_paused": delta_paused,
        "p99_delta_ms_hung": delta_hung,
        "p99_delta_ms": max(delta_paused, delta_hung),
        "recovery_seconds": median([r["recovery_seconds"] for r in rounds]),
        "rounds": rounds,
        "params": {
            "rounds": cfg.outage_rounds,
            "connections": cfg.outage_connections,
            "interval_s": cfg.outage_interval,
            "pause_s": cfg.outage_pause,
            "hung_s": cfg.hung_seconds,
            "slow_ms": SLOW_MS,
        },
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed over the rounds, latencies their medians (max: the worst)."""
    merged: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if key == "error_samples":
            merged[key] = [sample for run in runs for sample in run[key]][:5]
        elif key.startswith("max_"):
            merged[key] = max(values)
        elif key.endswith("_ms") or "_ms_" in key:
            merged[key] = median(values)
        else:
            merged[key] = sum(values)
    return merged
