"""database incarnation: a one-row table holding a UUID made when the database is created

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 13:20:00.000000

The cache keeps (job id, version) pairs in Redis; a database that is recreated starts
its ids and versions again, so the cache tells databases apart by this UUID (its key
namespace and its entries carry it). A restored dump keeps the UUID of the database it
was taken from: `renderwatch new-incarnation` makes a new one (README, "The database's
incarnation").
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "renderwatch_meta",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("incarnation", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_renderwatch_meta_one_row"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(
        meta,
        [{"id": 1, "incarnation": str(uuid.uuid4()), "created_at": datetime.now(UTC)}],
    )


def downgrade() -> None:
    op.drop_table("renderwatch_meta")
