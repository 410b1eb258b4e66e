"""server/superlink.py: the SuperLink's SQLite transactions queue on one lock in its process."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flwr.supercore import sql_mixin
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from sqlalchemy import text

from florist.server import superlink
from florist.server.processes import superlink_command


@pytest.fixture
def restore_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own ``session`` is put back after the test (the patch is process-wide)."""
    monkeypatch.setattr(sql_mixin.SqlMixin, "session", sql_mixin.SqlMixin.session)


def _store(path: Path) -> SqlObjectStore:
    store = SqlObjectStore(str(path))
    store.initialize()
    return store


@pytest.mark.usefixtures("restore_session")
def test_a_second_transaction_waits_for_the_first_and_nesting_does_not(tmp_path: Path) -> None:
    # Prepare: two states on one file, as the SuperLink's link state and object store are.
    assert superlink.serialize_sqlite_sessions()
    first, second = _store(tmp_path / "state.db"), _store(tmp_path / "state.db")
    inside, release, entered = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with first.session() as session:
            session.execute(text("SELECT 1"))
            inside.set()
            release.wait(10)

    def follow() -> None:
        with second.session() as session:
            session.execute(text("SELECT 1"))
            entered.set()

    # Execute: a transaction is open when another thread asks for one.
    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    follower = threading.Thread(target=follow)
    follower.start()

    # Assert: the follower queues until the holder commits, then gets in.
    assert not entered.wait(0.5)
    release.set()
    assert entered.wait(10)
    holder.join(10)
    follower.join(10)
    # A session opened inside another one on the same thread does not wait for itself.
    with first.session(), second.session() as nested:
        assert nested.execute(text("SELECT 1")).scalar() == 1


@pytest.mark.usefixtures("restore_session")
def test_applied_once_and_never_to_another_flwr_version() -> None:
    flowers = sql_mixin.SqlMixin.session
    assert not superlink.serialize_sqlite_sessions(version="1.38.0")
    assert sql_mixin.SqlMixin.session is flowers
    assert superlink.serialize_sqlite_sessions()
    patched = sql_mixin.SqlMixin.session
    assert superlink.serialize_sqlite_sessions()
    assert sql_mixin.SqlMixin.session is patched


def test_a_state_file_runs_flowers_superlink_behind_the_launcher(tmp_path: Path) -> None:
    cmd = superlink_command(database=tmp_path / "s.db")
    assert cmd[1:3] == ["-m", "florist.server.superlink"]
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "s.db")
    # Without a file Flower's in-memory state has no SQLite to queue for: its own command.
    assert Path(superlink_command()[0]).name == "flower-superlink"


def test_the_end_to_end_variants_change_settings_that_are_read() -> None:
    # A renamed variable would turn a variant into a second copy of the default side.
    from benchmarks.end_to_end import VARIANTS
    from florist.client.executor import THREADS_ENV
    from florist.server.settings import Settings

    read = {superlink.QUEUE_ENV, THREADS_ENV} | {
        f"FLORIST_{name.upper()}" for name in Settings.model_fields
    }
    for name, env in VARIANTS.items():
        assert env and set(env) <= read, name


def test_queue_env_turns_the_launcher_off(
    monkeypatch: pytest.MonkeyPatch, restore_session: None
) -> None:
    flowers = sql_mixin.SqlMixin.session
    monkeypatch.setenv(superlink.QUEUE_ENV, "0")
    monkeypatch.setattr("flwr.superlink.cli.flower_superlink", lambda: None)
    superlink.main()
    assert sql_mixin.SqlMixin.session is flowers
    monkeypatch.setenv(superlink.QUEUE_ENV, "1")
    superlink.main()
    assert sql_mixin.SqlMixin.session is not flowers
