"""The benchmark's quick variant runs end to end and writes every figure (no thresholds).

It starts its own redis-server, PostgreSQL database, API instances and load
generators, and must stop them all; the figures themselves are not judged here
(they depend on the machine): only that each section ran and reported.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]

KEYS = (
    "poll_db_reads_per_job",
    "poll_hit_rate",
    "rps_const",
    "rps_redis_passthrough",
    "rps_cached_poll",
    "rps_uncached_poll",
    "rps_304",
    "p99_ms_redis_passthrough",
    "p99_ms_cached_poll",
    "stampede_db_reads",
    "write_ratio_vs_db",
    "write_redis_round_trips",
    "outage_errors",
    "outage_p99_delta_ms",
    "recovery_seconds",
    "sse_max_streams",
    "sse_p99_ms_at_2000",
    "sse_kib_per_stream",
    "sse_cpu_ratio_vs_poll",
    "slowdb_db_reads",
    "slowdb_next_wave_hit_rate",
    "rps_raw_asgi_evalsha",
    "poll_batch_mean",
    "p50_ms_cached_poll_1client",
    "cpu_us_cached_poll",
)


def _processes_marked(marker: bytes) -> list[int]:
    """Pids whose environment carries the bench run's marker."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _databases_like(admin_url: str, prefix: str) -> list[str]:
    import psycopg

    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_quick_bench_runs_and_writes_every_key(pg_admin_url: str, tmp_path: Path) -> None:
    require("redis-server binary", shutil.which("redis-server") is not None)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(out), "--pg-url", pg_admin_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]

    document = json.loads((out / "latest.json").read_text())
    missing = [key for key in KEYS if key not in document]
    assert not missing, f"latest.json lacks {missing}"
    # A figure may be null only when it could not be measured; these always can.
    for key in ("poll_db_reads_per_job", "rps_cached_poll", "rps_uncached_poll", "outage_errors"):
        value = document[key]
        assert isinstance(value, int | float) and not math.isnan(value), (key, value)
    assert document["rps_cached_poll"] > 0 and document["rps_const"] > 0
    assert document["config"] == "quick"
    assert {"nproc", "cpu", "python", "redis_server", "postgres", "fastapi", "uvicorn"} <= set(
        document["machine"]
    )

    markdown = (out / "latest.md").read_text()
    assert document["sse_max_streams"] > 0  # the quick run's streams all connected
    assert document["sse_kib_per_stream"] >= 0
    for heading in (
        "## 1.",
        "## 2.",
        "## 3.",
        "## 4.",
        "## 5.",
        "## 6.",
        "## 7.",
        "## 8.",
        "## Machine",
    ):
        assert heading in markdown
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Everything the run started is stopped, and its private database is dropped.
    match = re.search(r"\] run (rw-bench-\S+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    assert _processes_marked(b"RW_BENCH_RUN=" + match.group(1).encode()) == []
    database = re.search(r"private database (rw_bench_\w+)", proc.stderr)
    assert database, proc.stderr[-2000:]
    assert _databases_like(pg_admin_url, database.group(1)) == []
