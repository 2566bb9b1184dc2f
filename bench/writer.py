"""The progress writer: a separate process that plays the Celery worker's part.

`python -m bench.writer SPEC.json OUT.json`. It writes progress exactly as the worker
does, through `shared.cache.update_job_progress_with_cache` (DB transaction, then the
versioned pre-warm in Redis), on a schedule given by the parent:

- `lifecycle`: each job walks scripting → storyboard → rendering (scene by scene) →
  encoding → uploading → done, its updates spread evenly over its polling window;
- `trickle`: jobs already rendering get one more scene each, round robin, at `rate`
  updates per second.
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.procs import child_handshake
from shared.cache import update_job_progress_with_cache
from shared.runtime import Runtime
from shared.settings import Settings


def lifecycle_updates(scenes: int) -> list[dict[str, Any]]:
    """Every progress report of one render, in order."""
    updates: list[dict[str, Any]] = [
        {"current_stage": "scripting"},
        {"current_stage": "storyboard"},
        {"current_stage": "rendering", "scenes_completed": 0},
    ]
    updates += [{"current_stage": "rendering", "scenes_completed": k} for k in range(1, scenes + 1)]
    updates += [
        {"current_stage": "encoding"},
        {"current_stage": "uploading"},
        {"current_stage": "done", "result_url": "https://example.invalid/video.mp4"},
    ]
    return updates


def settings_of(spec: dict[str, Any]) -> Settings:
    return Settings(
        _env_file=None,
        database_url=spec["database_url"],
        redis_url=spec["redis_url"],
        cache_namespace=spec["cache_namespace"],
        log_level="WARNING",
    )


def run_lifecycle(spec: dict[str, Any]) -> dict[str, Any]:
    t0, window = float(spec["t0"]), float(spec["window"])
    queue: list[tuple[float, int, int, dict[str, Any]]] = []
    for job in spec["jobs"]:
        updates = lifecycle_updates(int(job["scenes"]))
        step = window / (len(updates) + 1)
        for i, update in enumerate(updates):
            when = t0 + float(job["offset"]) + (i + 1) * step
            heapq.heappush(queue, (when, int(job["job_id"]), i, update))
    return _drain(queue, deadline=t0 + float(spec["deadline"]))


def run_trickle(spec: dict[str, Any]) -> dict[str, Any]:
    t0, duration, rate = float(spec["t0"]), float(spec["duration"]), float(spec["rate"])
    job_ids = [int(j) for j in spec["job_ids"]]
    scenes = {job_id: 0 for job_id in job_ids}
    queue: list[tuple[float, int, int, dict[str, Any]]] = []
    count = int(duration * rate)
    for i in range(count):
        job_id = job_ids[i % len(job_ids)]
        scenes[job_id] += 1
        update = {"current_stage": "rendering", "scenes_completed": scenes[job_id]}
        heapq.heappush(queue, (t0 + i / rate, job_id, i, update))
    return _drain(queue, deadline=t0 + duration + 5.0)


def _drain(
    queue: list[tuple[float, int, int, dict[str, Any]]], *, deadline: float
) -> dict[str, Any]:
    done = failed = 0
    late: list[float] = []
    while queue and time.monotonic() < deadline:
        when, job_id, _, update = heapq.heappop(queue)
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late.append(-delay)
        if update_job_progress_with_cache(job_id, update):
            done += 1
        else:
            failed += 1
    return {
        "updates": done,
        "missing_jobs": failed,
        "skipped": len(queue),
        "max_late_s": max(late, default=0.0),
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    runtime = Runtime.start(settings_of(spec))
    try:
        # Connect before the start signal, so the first update pays no connection set-up.
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        if runtime.cache.backend is not None:
            runtime.cache.backend.ping()
        spec["t0"] = child_handshake(spec)
        result = run_lifecycle(spec) if spec["mode"] == "lifecycle" else run_trickle(spec)
    finally:
        runtime.close()
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
