"""/metrics of `python -m api` with two uvicorn workers: every scrape tells the whole story.

Without PROMETHEUS_MULTIPROC_DIR each worker would expose its own counters, so the
count would depend on which process answered the scrape.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared.settings import Settings
from tests import procs

ROUTE = (("method", "GET"), ("route", "/api/v2/jobs/{job_id}"), ("status", "401"))


def _scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # A new connection per request, so the kernel may hand it to either worker.
    with httpx.Client(base_url=base_url, timeout=10, trust_env=False) as client:
        text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _worker_pids(api: procs.ServiceProcess) -> list[int]:
    """The uvicorn workers that have started serving, in order (from the log)."""
    return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", api.log())]


def _unauthorised_polls(base_url: str, count: int) -> None:
    for _ in range(count):
        with httpx.Client(base_url=base_url, timeout=10, trust_env=False) as client:
            assert client.get("/api/v2/jobs/1").status_code == 401


def test_two_workers_are_counted_together_and_a_dead_one_is_forgotten(
    tmp_path: Path, sqlite_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=sqlite_url, redis_url="")
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    (multiproc / "counter_1.db").write_bytes(b"stale file of a previous run")
    env = procs.settings_env(settings, prometheus_multiproc_dir=multiproc)
    polls = 30
    with procs.api_server(env, tmp_path, workers=2) as api:
        workers = procs.wait_until(
            lambda: len(_worker_pids(api)) >= 2 and _worker_pids(api), timeout=60, what="2 workers"
        )
        assert not (multiproc / "counter_1.db").exists(), "python -m api empties the dir"
        _unauthorised_polls(api.base_url, polls)
        for _ in range(6):
            samples = _scrape(api.base_url)
            assert samples[("renderwatch_http_requests_total", ROUTE)] == polls
            latency = (("method", "GET"), ("route", "/api/v2/jobs/{job_id}"))
            assert samples[("renderwatch_http_request_duration_seconds_count", latency)] == polls
            # The scrape itself is in progress, in exactly one process.
            assert samples[("renderwatch_http_requests_in_progress", ())] == 1.0

        # A worker that dies: uvicorn starts another; its counts stay, its gauge goes.
        os.kill(workers[0], signal.SIGKILL)
        procs.wait_until(
            lambda: len(set(_worker_pids(api)) - {workers[0]}) >= 2,
            timeout=60,
            what="uvicorn to replace the killed worker",
        )
        _unauthorised_polls(api.base_url, 2)
        for _ in range(4):
            samples = _scrape(api.base_url)
            assert samples[("renderwatch_http_requests_total", ROUTE)] == polls + 2
            assert samples[("renderwatch_http_requests_in_progress", ())] == 1.0
