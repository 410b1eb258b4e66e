"""Exactly-once submission against a real SuperLink: a follower that dies between StartRun and
recording the run leaves one run, which the next follower finds and adopts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from florist.server.control import ControlClient
from florist.server.db import repository as repo
from florist.server.db.engine import make_engine, make_session_factory
from florist.server.follower import SUBMISSION_KEY, RunFollower

from .conftest import start_stack

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_follower_killed_after_start_run_leaves_one_run(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions: sessionmaker[Session] = make_session_factory(make_engine(migrated_url))
    with sessions() as s:
        exp = repo.create_experiment(
            s, name="once", strategy="fedavg", dataset="digits", num_rounds=1, spec={}
        )
        s.commit()
        experiment_id = exp.id
    with start_stack(tmp_path / "flower", []) as stack:
        control = ControlClient(stack.control)

        def follower(**kw: Any) -> RunFollower:
            return RunFollower(sessions, lambda: control, database_url=migrated_url, **kw)

        def killed(*args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("API process killed")

        # Execute: the first follower starts the run and dies before recording it; a second
        # one (a restarted API) takes over once the claim is stale.
        monkeypatch.setattr("florist.server.follower.record_submission", killed)
        follower().tick()
        monkeypatch.undo()
        successor = follower(claim_timeout=timedelta(0))
        successor.tick()
        successor.tick()

        # Assert: the SuperLink has exactly one run for the experiment, and it is the tracked one.
        runs = [
            r
            for r in control.list_runs()
            if r.override_config.get("experiment-id") == experiment_id
        ]
        with sessions() as s:
            tracked = repo.get_experiment(s, experiment_id=experiment_id)
            assert tracked is not None
            kinds = [e.kind for e in repo.list_events(s, experiment_id=experiment_id)]
        assert len(runs) == 1, runs
        assert SUBMISSION_KEY in runs[0].override_config
        assert tracked.flwr_run_id == runs[0].run_id
        assert "submission-reconciled" in kinds
        control.stop_run(runs[0].run_id)
        control.close()
