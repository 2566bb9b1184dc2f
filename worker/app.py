"""The worker's Celery app: `celery -A worker.app worker|beat|flower`.

Nothing connects at import. Each process that runs tasks builds its own `Runtime`
(engine, sessions, cache) and renderer at start-up: every prefork child in
`worker_process_init` (an engine must not cross a fork), the main process in
`worker_init` for the pools that run tasks in it (solo, threads, ...). Shutdown
closes them, which flushes this process's pending cache statistics.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from shared.queue import create_celery
from shared.settings import get_settings
from worker import process as worker_state
from worker.process import log_ready, start_process, stop_process

logger = logging.getLogger(__name__)

# Loggers of our own code; Celery configures its own and the root handler.
APP_LOGGERS = ("worker", "shared")

# The tasks are found by module name (`include`), so `worker.tasks` need not import this
# module and this module need not import the tasks.
app = create_celery(get_settings())
app.conf.include = ["worker.tasks"]


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
    process = worker_state.current()
    if process is not None:
        log_ready(process)


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    log_ready(start_process())


@signals.worker_process_shutdown.connect
def _on_worker_process_shutdown(**_: Any) -> None:
    stop_process()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop_process()
