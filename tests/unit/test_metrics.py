"""api.metrics: multi-process files, dead-process clean-up, the cache collector."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from api.metrics import CacheCollector, forget_dead_processes, reset_multiprocess_dir

CHILD = """
from prometheus_client import Counter, Gauge
Gauge("rw_in_progress", "h", multiprocess_mode="livesum").inc()
Counter("rw_requests", "h").inc(3)
"""


def _child(directory: Path) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True)
    assert proc.returncode == 0
    return int(next(p.stem.rsplit("_", 1)[1] for p in directory.glob("counter_*.db")))


def _collect(directory: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def test_a_dead_process_leaves_the_live_gauge_but_its_counters_stay(tmp_path: Path) -> None:
    pid = _child(tmp_path)
    assert _collect(tmp_path).get_sample_value("rw_in_progress") == 1.0

    assert forget_dead_processes(str(tmp_path)) == [pid]

    registry = _collect(tmp_path)
    assert registry.get_sample_value("rw_in_progress") in (None, 0.0)
    assert registry.get_sample_value("rw_requests_total") == 3.0
    assert forget_dead_processes(str(tmp_path)) == []


def test_a_live_process_is_not_forgotten(tmp_path: Path) -> None:
    (tmp_path / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"")
    assert forget_dead_processes(str(tmp_path)) == []
    assert (tmp_path / f"gauge_livesum_{os.getpid()}.db").exists()


def test_reset_empties_the_directory_of_a_previous_run(tmp_path: Path) -> None:
    _child(tmp_path)
    (tmp_path / "keep.txt").write_text("not ours")
    reset_multiprocess_dir(str(tmp_path / "new"))
    assert (tmp_path / "new").is_dir()
    reset_multiprocess_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "new"]


class _Cache:
    def __init__(self, statistics: dict[str, Any], enabled: bool = True) -> None:
        self._stats = {"cache_enabled": enabled, "statistics": statistics, "message": ""}

    def stats(self) -> dict[str, Any]:
        return self._stats


def _samples(collector: CacheCollector) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def test_the_cache_collector_exposes_what_the_stats_endpoint_says() -> None:
    statistics = {
        "hits": 7, "misses": 2, "errors": 1, "invalidations": 4, "fallbacks": 3,
        "hit_rate": 77.78, "redis_available": False,
    }  # fmt: skip
    samples = _samples(CacheCollector(_Cache(statistics)))  # type: ignore[arg-type]
    assert samples["renderwatch_cache_hits_total"] == 7
    assert samples["renderwatch_cache_misses_total"] == 2
    assert samples["renderwatch_cache_errors_total"] == 1
    assert samples["renderwatch_cache_invalidations_total"] == 4
    assert samples["renderwatch_cache_fallbacks_total"] == 3
    assert samples["renderwatch_cache_redis_available"] == 0.0
    assert samples["renderwatch_cache_enabled"] == 1.0


def test_a_counter_the_cache_does_not_report_is_not_invented() -> None:
    statistics = {
        "hits": 0, "misses": 0, "errors": 0, "invalidations": 0,
        "hit_rate": 0.0, "redis_available": True,
    }  # fmt: skip
    samples = _samples(CacheCollector(_Cache(statistics)))  # type: ignore[arg-type]
    assert "renderwatch_cache_fallbacks_total" not in samples
    assert samples["renderwatch_cache_redis_available"] == 1.0
