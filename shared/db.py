"""Engine and session factory, built from settings at start-up (never at import).

An engine must not cross a fork: build it in the process that uses it (FastAPI
lifespan, Celery `worker_process_init`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

logger = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]
T = TypeVar("T")

READ_ATTEMPTS = 2


def build_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    statement_timeout_ms: int = 0,
) -> Engine:
    """An engine with pre-ping (a terminated PostgreSQL backend costs one retry, not a 500).

    `statement_timeout_ms` (PostgreSQL) bounds every query, so a cache fill lease that
    outlasts it is never lapsed by a slow DB read (README "The cache and its guarantees").
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, object] = {}
    if statement_timeout_ms > 0 and url.get_backend_name() == "postgresql":
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1_800,
        connect_args=connect_args,
    )


def _sqlite_pragmas(dbapi_connection: object, _record: ConnectionPoolEntry) -> None:
    # WAL lets API readers proceed while a worker writes; busy_timeout waits on locks.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def build_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


def run_read(sessions: SessionFactory, work: Callable[[Session], T]) -> T:
    """Run a read-only `work(session)`; once more on a fresh connection if the first died.

    Pre-ping only protects a connection at checkout: one terminated while a query runs,
    or while it sits in the read's open transaction, fails that read (the ROLLBACK at
    close fails too). A read is idempotent, so it is simply run again. Writes are not
    retried here: their callers decide (the worker's task retries and resumes).
    """
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            with sessions() as session:
                return work(session)
        except DBAPIError as exc:
            if not exc.connection_invalidated or attempt == READ_ATTEMPTS:
                raise
            # The type only: driver messages may carry connection details.
            logger.info(
                "database connection lost during a read (%s): retrying on a fresh one",
                type(exc.orig).__name__,
            )
    raise AssertionError("unreachable")  # pragma: no cover
