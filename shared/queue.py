"""The Celery application's configuration, shared by the worker (runs tasks) and the API
(only sends them, by name, so `api` never imports `worker`).
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery

from shared.settings import Settings

RENDER_VIDEO = "renderwatch.render_video"
SNAPSHOT_CACHE_STATS = "renderwatch.snapshot_cache_stats"


def create_celery(settings: Settings) -> Celery:
    """A Celery app from settings: JSON only, late acks, one reserved task per process."""
    app = Celery("renderwatch", set_as_current=False)
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=settings.celery_queue,
        worker_hijack_root_logger=False,
        timezone="UTC",
        beat_schedule={
            "snapshot-cache-stats": {
                "task": SNAPSHOT_CACHE_STATS,
                "schedule": timedelta(seconds=settings.stats_snapshot_seconds),
                # A snapshot older than its interval is worthless: let it expire.
                "options": {"expires": max(1.0, settings.stats_snapshot_seconds * 0.9)},
            }
        },
    )
    return app


def _transport_options(settings: Settings) -> dict[str, object]:
    # The SQL fallback broker (sqla+...) hands its options to create_engine, which refuses
    # visibility_timeout; that transport has no visibility timeout to set anyway.
    if settings.broker_url.startswith("sqla+"):
        return {}
    timeout = settings.task_visibility_timeout
    return {
        "visibility_timeout": timeout,
        # kombu's Redis transport looks for tasks whose visibility timeout has lapsed (their
        # worker died) every `interval` s, but scans only on every `throttle`-th look: by
        # default 10 x 10 = 100 s, which would add up to 100 s to any timeout (20x a short
        # one). Scan on every look, often enough that a lost task comes back within about
        # the timeout; a scan is one ZRANGE under a short mutex.
        "unacked_restore_interval": max(1, min(10, timeout // 5)),
        "unacked_restore_throttle": 1,
    }


def enqueue_render(app: Celery, job_id: int) -> str:
    """Send `render_video(job_id)`; returns the Celery task id."""
    result = app.send_task(RENDER_VIDEO, args=[job_id])
    return str(result.id)
