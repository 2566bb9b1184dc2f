"""SQLAlchemy tables: jobs, api_keys, cache_stats_snapshots, renderwatch_meta (migrations in
`renderwatch/migrations/`)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(255), nullable=False)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    stage: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    scenes_completed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    scenes_total: Mapped[int] = mapped_column(Integer, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    celery_task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (
        Index("ix_jobs_client_id_id", "client_id", "id"),
        Index("ix_jobs_updated_at", "updated_at"),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class CacheStatsSnapshot(Base):
    __tablename__ = "cache_stats_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # One row per beat interval: the slot is unique, so a re-run or a second beat is a no-op.
    slot: Mapped[int] = mapped_column(BigInteger, nullable=False, unique=True)
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    hits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    misses: Mapped[int] = mapped_column(BigInteger, nullable=False)
    errors: Mapped[int] = mapped_column(BigInteger, nullable=False)
    invalidations: Mapped[int] = mapped_column(BigInteger, nullable=False)
    total_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    hit_rate: Mapped[float] = mapped_column(Float, nullable=False)
    redis_available: Mapped[bool] = mapped_column(Boolean, nullable=False)


class DatabaseMeta(Base):
    """One row: this database's incarnation, a UUID made when it was created (`shared.meta`)."""

    __tablename__ = "renderwatch_meta"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    incarnation: Mapped[str] = mapped_column(String(36), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (CheckConstraint("id = 1", name="ck_renderwatch_meta_one_row"),)


__all__ = ["ApiKey", "Base", "CacheStatsSnapshot", "DatabaseMeta", "Job", "utcnow"]
