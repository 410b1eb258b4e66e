"""Alembic environment: migrates the database named by ``sqlalchemy.url`` to the models' schema."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from florist.server.db.engine import make_engine
from florist.server.db.models import Base

# Any constant shared by every Florist process; it names the PostgreSQL advisory lock.
_MIGRATION_LOCK_KEY = 0x466C6F7269737401


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url in the Alembic config (upgrade_database does)")
    return url


def _lock_for_migration(connection: Connection) -> None:
    # Two processes starting together (API and ServerApp) must not both create the tables:
    # take a database-wide write lock first, so the second one waits and then sees the new
    # alembic_version row.
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            is_sqlite = connection.dialect.name == "sqlite"
            if is_sqlite:
                # Batch migrations copy and drop tables; with foreign keys on, the drop would
                # cascade into child rows. The pragma only takes effect outside a transaction.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            with connection.begin():
                _lock_for_migration(connection)
                # The transaction is ours, so Alembic runs inside it and commits nothing itself.
                context.configure(
                    connection=connection,
                    target_metadata=Base.metadata,
                    render_as_batch=is_sqlite,
                )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
