"""The database's incarnation: a UUID made when the database is created, kept in its one
`renderwatch_meta` row.

Job ids and versions start again in a recreated database, so a Redis that outlives its
database would mix two histories under the same (job id, version). The incarnation tells
them apart: the cache's default key namespace is derived from it (two databases never
share entries unless `CACHE_NAMESPACE` says so), and the cache keeps it in its entries.
A database restored from a dump keeps the incarnation of the one it was taken from: an
operator runs `renderwatch new-incarnation` after a restore (README, "The database's
incarnation"). Read once per process, at start-up.
"""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import Connection, Engine, insert, inspect, select, update
from sqlalchemy.exc import DBAPIError

from shared.db import SessionFactory
from shared.models import DatabaseMeta, utcnow

TABLE = DatabaseMeta.__tablename__
NAMESPACE_PREFIX = "rw-"


class IncarnationMissing(RuntimeError):
    """The database has no incarnation: it is not migrated (or its row was deleted)."""


def database_incarnation(source: Engine | SessionFactory) -> str:
    """This database's incarnation (one query); `IncarnationMissing` when it has none."""
    engine = source if isinstance(source, Engine) else _engine_of(source)
    with engine.connect() as conn:
        try:
            found = conn.scalar(select(DatabaseMeta.incarnation).where(DatabaseMeta.id == 1))
        except DBAPIError:
            conn.rollback()
            if not _has_table(conn):
                raise IncarnationMissing(
                    f"the database has no {TABLE} table: run `renderwatch migrate`"
                ) from None
            raise
    if not found:
        raise IncarnationMissing(
            f"the database's {TABLE} row is missing: run `renderwatch new-incarnation`"
        )
    return str(found)


def new_incarnation(source: Engine | SessionFactory) -> str:
    """Give the database a new incarnation (after a restore) and return it.

    Processes still running keep the old one until they restart: restart them all."""
    engine = source if isinstance(source, Engine) else _engine_of(source)
    fresh = str(uuid.uuid4())
    with engine.begin() as conn:
        if not _has_table(conn):
            raise IncarnationMissing(
                f"the database has no {TABLE} table: run `renderwatch migrate`"
            )
        changed = conn.execute(
            update(DatabaseMeta)
            .where(DatabaseMeta.id == 1)
            .values(incarnation=fresh, created_at=utcnow())
        )
        if not changed.rowcount:
            conn.execute(insert(DatabaseMeta).values(id=1, incarnation=fresh, created_at=utcnow()))
    return fresh


def default_namespace(incarnation: str) -> str:
    """The key namespace of a deployment that sets no `CACHE_NAMESPACE`: `rw-<8 hex>`."""
    digest = hashlib.blake2b(incarnation.encode(), digest_size=4, person=b"rw-namespace")
    return NAMESPACE_PREFIX + digest.hexdigest()


def _engine_of(sessions: SessionFactory) -> Engine:
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("the session factory is not bound to an engine")
    return bind


def _has_table(conn: Connection) -> bool:
    return inspect(conn).has_table(TABLE)
