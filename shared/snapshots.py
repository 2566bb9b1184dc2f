"""Cache statistics snapshots written by the beat task, one row per interval."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import CacheStatsSnapshot, utcnow


def save_snapshot(
    stats: dict[str, object], *, session: Session, interval_seconds: int, retention: int
) -> bool:
    """Store one snapshot for the current interval; False when that interval already has one."""
    now = utcnow()
    slot = int(now.timestamp()) // interval_seconds
    stat = stats["statistics"]
    assert isinstance(stat, dict)
    session.add(
        CacheStatsSnapshot(
            slot=slot,
            taken_at=now,
            hits=int(stat["hits"]),
            misses=int(stat["misses"]),
            errors=int(stat["errors"]),
            invalidations=int(stat["invalidations"]),
            total_requests=int(stat["total_requests"]),
            hit_rate=float(stat["hit_rate"]),
            redis_available=bool(stat["redis_available"]),
        )
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    _trim(session=session, retention=retention)
    return True


def _trim(*, session: Session, retention: int) -> None:
    count = session.scalar(select(func.count()).select_from(CacheStatsSnapshot)) or 0
    if count > retention:
        cutoff = session.scalar(
            select(CacheStatsSnapshot.id)
            .order_by(CacheStatsSnapshot.id.desc())
            .offset(retention)
            .limit(1)
        )
        if cutoff is not None:
            session.execute(delete(CacheStatsSnapshot).where(CacheStatsSnapshot.id <= cutoff))
    session.commit()


def list_snapshots(*, session: Session, limit: int, offset: int = 0) -> list[dict[str, object]]:
    """Snapshots, newest first."""
    rows = session.scalars(
        select(CacheStatsSnapshot)
        .order_by(CacheStatsSnapshot.slot.desc())
        .limit(limit)
        .offset(offset)
    )
    result = [_as_dict(row) for row in rows]
    session.rollback()
    return result


def _as_dict(row: CacheStatsSnapshot) -> dict[str, object]:
    taken: datetime = row.taken_at
    return {
        "taken_at": taken.isoformat(),
        "hits": row.hits,
        "misses": row.misses,
        "errors": row.errors,
        "invalidations": row.invalidations,
        "total_requests": row.total_requests,
        "hit_rate": row.hit_rate,
        "redis_available": row.redis_available,
    }
