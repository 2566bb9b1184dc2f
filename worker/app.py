"""The worker's Celery app: `celery -A worker.app worker|beat|flower`.

Nothing connects at import. Each process that runs tasks builds its own `Runtime`
(engine, sessions, cache) and renderer at start-up: every prefork child in
`worker_process_init` (an engine must not cross a fork), the main process in
`worker_init` for the pools that run tasks in it (solo, threads, ...). Shutdown
closes them, which flushes this process's pending cache statistics.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from celery import signals

from shared.queue import create_celery
from shared.runtime import Runtime
from shared.settings import Settings, get_settings
from worker.renderer import Renderer, load_renderer

logger = logging.getLogger(__name__)

# Loggers of our own code; Celery configures its own and the root handler.
APP_LOGGERS = ("worker", "shared")

app = create_celery(get_settings())


@dataclass(frozen=True, slots=True)
class WorkerProcess:
    """What tasks in this process use; built after any fork."""

    runtime: Runtime
    renderer: Renderer
    pid: int


_lock = threading.Lock()
_process: WorkerProcess | None = None


def start_process(settings: Settings | None = None) -> WorkerProcess:
    """Build this process's runtime and renderer (idempotent within one process)."""
    global _process
    with _lock:
        if _process is not None and _process.pid == os.getpid():
            return _process
        # A state inherited through fork belongs to the parent: drop it, never close it
        # here (closing would act on the parent's sockets).
        settings = settings or get_settings()
        renderer = load_renderer(settings)
        runtime = Runtime.start(settings)
        _process = WorkerProcess(runtime=runtime, renderer=renderer, pid=os.getpid())
        return _process


def _log_ready(process: WorkerProcess) -> None:
    logger.info(
        "worker process %d ready (renderer %s, caching %s)",
        process.pid,
        type(process.renderer).__name__,
        "on" if process.runtime.cache.enabled else "off",
    )


def stop_process() -> None:
    """Release this process's runtime (flushes pending cache statistics)."""
    global _process
    with _lock:
        process, _process = _process, None
    if process is not None and process.pid == os.getpid():
        process.runtime.close()
        logger.info("worker process %d closed its runtime", process.pid)


def worker_process() -> WorkerProcess:
    """This process's state; built on first use when no start-up signal did it."""
    process = _process
    if process is not None and process.pid == os.getpid():
        return process
    return start_process()


def _runs_tasks_in_main_process(pool_cls: Any) -> bool:
    # Only prefork runs tasks in children; the others run them in this process.
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool = get_implementation(pool_cls)
    return not (isinstance(pool, type) and issubclass(pool, PreforkPool))


@signals.after_setup_logger.connect
def _configure_loggers(**_: Any) -> None:
    level = get_settings().log_level.upper()
    for name in APP_LOGGERS:
        logging.getLogger(name).setLevel(level)


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Celery's banner already shows the broker with its password masked.
    if sender is not None and _runs_tasks_in_main_process(sender.pool_cls):
        start_process()


@signals.worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    # Logging is set up only after worker_init: report the main process's state here.
    process = _process
    if process is not None and process.pid == os.getpid():
        _log_ready(process)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    _log_ready(start_process())


@signals.worker_process_shutdown.connect
def _on_worker_process_shutdown(**_: Any) -> None:
    stop_process()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop_process()


# Registers the tasks on `app` (worker.tasks imports `app` from here).
import worker.tasks  # noqa: E402, F401
