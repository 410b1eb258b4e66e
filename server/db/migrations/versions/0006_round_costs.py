"""Round costs: the strategy's aggregation time and the training traffic of each round.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, and no backfill: rounds recorded before this revision did not measure them.
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("aggregate_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("bytes_in", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("bytes_out", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("bytes_out")
        batch.drop_column("bytes_in")
        batch.drop_column("aggregate_s")
