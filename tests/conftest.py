"""Shared database fixtures: every test gets its own SQLite file or PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from florist.server.db.engine import (
    make_engine,
    make_session_factory,
    normalize_url,
    upgrade_database,
)

# The server's maintenance database; tests only create and drop their own databases on it.
_POSTGRES_ADMIN_URL = os.environ.get(
    "FLORIST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty, unmigrated database that exists for this test only."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'florist.db'}"
        return

    admin_url = normalize_url(_POSTGRES_ADMIN_URL)
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"florist_test_{uuid.uuid4().hex}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        admin.dispose()
        reason = f"PostgreSQL at {admin_url.render_as_string()} is unreachable: {error.orig}"
        if os.environ.get("FLORIST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason} (FLORIST_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """URL of a database for this test only, migrated to the newest revision."""
    upgrade_database(database_url)
    return database_url


@pytest.fixture
def session_factory(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    """Session factory bound to the migrated test database."""
    engine = make_engine(migrated_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture(autouse=True, scope="session")
def _testclient_host() -> Iterator[None]:
    """Starlette's TestClient sends ``Host: testserver``: the tests' settings answer to it, as a
    deployment's FLORIST_ALLOWED_HOSTS would to its own name (server/api/auth.py). Session-wide,
    so module-scoped apps see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLORIST_ALLOWED_HOSTS", "testserver")
        yield
