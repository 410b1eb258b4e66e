"""Engine and session factories, and schema migration to the newest revision."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

_MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_SQLITE_BUSY_TIMEOUT_MS = 10_000


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL, routing plain ``postgresql://`` to psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _no_password(url: URL) -> URL:
    # URL.set(password=None) keeps the password (None there means "unchanged").
    return URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )


def without_password(url: str | URL) -> str:
    """The URL with no password in it: what may travel to the SuperLink as run config."""
    return _no_password(make_url(url)).render_as_string(hide_password=False)


def masked(url: str | URL) -> str:
    """The URL as it may be printed or stored in an error: its password as ``***``."""
    return make_url(url).render_as_string(hide_password=True)


def with_own_password(run_url: str, own_url: str) -> str:
    """The database a run names (``run_url``, passwordless), with the password this process
    knows from its own settings (``own_url``) when both name the same database as the same
    user; otherwise ``run_url`` as it is (a database that needs no password, e.g. a file)."""
    run, own = normalize_url(run_url), normalize_url(own_url)
    if run.password is None and run == _no_password(own):
        return own.render_as_string(hide_password=False)
    return run_url


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _json_serializer(value: Any) -> str:
    # PostgreSQL's json type refuses NaN and Infinity, and a diverged loss must not lose the
    # round, so non-finite floats are stored as null on every backend alike.
    return json.dumps(_finite_or_none(value), allow_nan=False)


_decode_json = json.JSONDecoder().decode


def _json_deserializer(value: str | bytes) -> Any:
    # psycopg hands JSON columns over as bytes, whose encoding json.loads would first sniff:
    # half the cost of a small document, two a row in a page of updates.
    return _decode_json(value if isinstance(value, str) else value.decode())


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        # Switching a new file to WAL (or joining one mid-switch) can report "database is
        # locked" without waiting for the busy timeout, e.g. when two processes open a fresh
        # database together, so retry for as long as the timeout would have waited.
        deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def make_engine(url: str | URL) -> Engine:
    """Build an engine for a SQLite file or a PostgreSQL server."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # pysqlite's default transaction control issues BEGIN at the first write, so a writer
        # never upgrades a stale read snapshot (which would fail at once with "database is
        # locked"); waiting for another writer is then covered by busy_timeout.
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False},
            json_serializer=_json_serializer,
            json_deserializer=_json_deserializer,
        )
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    engine = create_engine(
        parsed,
        pool_pre_ping=True,
        json_serializer=_json_serializer,
        json_deserializer=_json_deserializer,
    )
    event.listen(engine, "connect", _set_postgres_utc, insert=True)
    return engine


def _set_postgres_utc(dbapi_connection: Any, connection_record: Any) -> None:
    # Sessions in UTC: psycopg then reads every timestamptz with the very ``datetime.UTC``, so
    # UtcDateTime keeps it as it comes, where converting from the server's zone cost 3 µs a
    # row (a 1,000-row page of updates holds 3,000). Stored instants do not change.
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET TIME ZONE 'UTC'")
    finally:
        cursor.close()
        dbapi_connection.autocommit = autocommit


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Build a session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def upgrade_database(url: str | URL) -> None:
    """Migrate the database to the newest revision; safe to repeat and to race.

    The migration environment serialises concurrent upgrades with a database-side lock
    (SQLite ``BEGIN IMMEDIATE``, PostgreSQL advisory lock), so a second caller waits and
    then finds the schema current.
    """
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    # Config values go through configparser interpolation: escape '%' from URL-encoding.
    rendered = normalize_url(url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    command.upgrade(config, "head")
