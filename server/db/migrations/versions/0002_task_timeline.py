"""Task timeline: model versions, local steps, dispatch/arrival times and durations per update.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

All columns are nullable: synchronous rounds recorded before this revision keep their rows.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("client_updates") as batch:
        batch.add_column(sa.Column("model_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("arrival_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("local_steps", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("arrived_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("wall_duration_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("virtual_duration_s", sa.Float(), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("virtual_time_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("virtual_time_s")
    with op.batch_alter_table("client_updates") as batch:
        for name in (
            "virtual_duration_s",
            "wall_duration_s",
            "arrived_at",
            "dispatched_at",
            "local_steps",
            "arrival_version",
            "model_version",
        ):
            batch.drop_column(name)
