"""The database password stays where it is configured: never in run config, printed or stored
errors; the ServerApp adds its own to the passwordless URL a run names."""

from __future__ import annotations

import pytest

from florist.server.db.engine import masked, with_own_password, without_password
from florist.server.external import run_database_url

SECRET = "pa55-w0rd"
OWN = f"postgresql://florist:{SECRET}@db.internal:5432/florist"


def test_a_url_loses_its_password_for_the_run_and_masks_it_when_shown() -> None:
    assert without_password(OWN) == "postgresql://florist@db.internal:5432/florist"
    assert SECRET not in masked(OWN) and "***" in masked(OWN)
    assert without_password("sqlite:////tmp/florist.db") == "sqlite:////tmp/florist.db"


@pytest.mark.parametrize(
    ("named", "expected"),
    [
        # The same database as the same user: the process's own password is added.
        ("postgresql://florist@db.internal:5432/florist", OWN),
        # Spelled with psycopg's driver: still the same database.
        ("postgresql+psycopg://florist@db.internal:5432/florist", OWN),
        # Another database, user or host: no password of this one is lent to it.
        ("postgresql://florist@db.internal:5432/other", None),
        ("postgresql://mallory@db.internal:5432/florist", None),
        ("postgresql://florist@evil.example:5432/florist", None),
        ("sqlite:////tmp/florist.db", None),
    ],
)
def test_the_serverapp_adds_its_own_password_only_to_its_own_database(
    monkeypatch: pytest.MonkeyPatch, named: str, expected: str | None
) -> None:
    monkeypatch.setenv("FLORIST_DATABASE_URL", OWN)
    resolved = run_database_url({"database-url": named})
    if expected is None:
        assert resolved == named and SECRET not in resolved
    else:
        assert resolved.replace("+psycopg", "") == expected


def test_without_a_named_database_the_run_uses_the_processs_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLORIST_DATABASE_URL", OWN)
    assert run_database_url({"experiment-id": 1}) == OWN
    assert with_own_password(without_password(OWN), OWN).endswith(
        f":{SECRET}@db.internal:5432/florist"
    )
