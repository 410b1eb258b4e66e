"""External experiments: a ``source`` column, and one external experiment per Flower run.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Existing rows are Florist's own (``source`` defaults to 'florist'). The unique index is partial
(external rows only), which SQLite and PostgreSQL both support, so Florist's own experiments
keep their run ids unchecked, as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EXTERNAL = sa.text("source = 'external'")


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(
            sa.Column("source", sa.String(length=20), nullable=False, server_default="florist")
        )
    op.create_index(
        "uq_experiments_external_flwr_run_id",
        "experiments",
        ["flwr_run_id"],
        unique=True,
        sqlite_where=_EXTERNAL,
        postgresql_where=_EXTERNAL,
    )


def downgrade() -> None:
    op.drop_index("uq_experiments_external_flwr_run_id", table_name="experiments")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("source")
