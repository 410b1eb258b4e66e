"""Indexes for the API's reads of long runs: pages of updates and rounds in their listing order,
one round's updates, and the accepted-update count of the progress summary.

Without them a page of 100 updates of a 100,000-update experiment sorted every row of it first
(EXPLAIN: "USE TEMP B-TREE FOR ORDER BY"); benchmarks/api_latency.py measures the reads.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, table, columns): the same declarations as server/db/models.py.
INDEXES = (
    (
        "ix_client_updates_listing",
        "client_updates",
        ["experiment_id", "run_id", "server_round", "id"],
    ),
    ("ix_client_updates_round", "client_updates", ["experiment_id", "server_round", "id"]),
    ("ix_client_updates_status", "client_updates", ["experiment_id", "status"]),
    ("ix_rounds_listing", "rounds", ["experiment_id", "run_id", "server_round", "id"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
