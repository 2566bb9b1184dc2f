"""This worker process's state: its `Runtime` (engine, sessions, cache) and renderer.

Built after any fork (an engine must not cross one) by the start-up signals in
`worker.app`, or on first use by a task; closed at shutdown, which flushes this
process's pending cache statistics.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from shared.runtime import Runtime
from shared.settings import Settings, get_settings
from worker.renderer import Renderer, load_renderer

logger = logging.getLogger(__name__)


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


def log_ready(process: WorkerProcess) -> None:
    """Say which renderer this process runs and whether it caches."""
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
    return current() or start_process()


def current() -> WorkerProcess | None:
    """This process's state if it was built in this process, else None (never builds)."""
    process = _process
    if process is not None and process.pid == os.getpid():
        return process
    return None
