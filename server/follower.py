"""Submits pending experiments to the SuperLink and follows their runs until they end."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from florist.server.control import ControlClient, SuperLinkUnavailable
from florist.server.db.models import Experiment, utcnow
from florist.server.db.repository import add_event, update_experiment

log = logging.getLogger(__name__)

ACTIVE = ("pending", "submitted", "running", "cancelling")
TERMINAL = ("completed", "failed", "cancelled")


def _fail(session: Session, exp: Experiment, error: str) -> None:
    update_experiment(
        session, experiment_id=exp.id, status="failed", finished_at=utcnow(), error=error
    )


class RunFollower:
    """One background thread that moves experiments through their life cycle.

    pending → submitted (StartRun) → running → completed | failed; cancelling → cancelled
    (StopRun). The ServerApp writes rounds and its own start/finish; this side owns what only
    the SuperLink knows: that a run was accepted, that it ended, and how.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        control: Callable[[], ControlClient],
        *,
        database_url: str,
        interval: float = 1.0,
        submit_timeout: timedelta = timedelta(minutes=5),
    ) -> None:
        self._sessions = sessions
        self._control_factory = control
        self._control: ControlClient | None = None
        self._database_url = database_url
        self._interval = interval
        self._submit_timeout = submit_timeout
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_logged: set[int] = set()

    @property
    def control(self) -> ControlClient:
        if self._control is None:
            self._control = self._control_factory()
        return self._control

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="florist-run-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._control is not None:
            self._control.close()

    def wake(self) -> None:
        """Act now rather than at the next tick (a new experiment, a cancel)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep following: one bad tick must not end the service
                log.exception("run follower tick failed")
            self._wake.wait(self._interval)
            self._wake.clear()

    def tick(self) -> None:
        """Advance every active experiment by one step."""
        with self._sessions() as session:
            ids = session.scalars(
                select(Experiment.id).where(Experiment.status.in_(ACTIVE)).order_by(Experiment.id)
            ).all()
        for experiment_id in ids:
            try:
                with self._sessions() as session, session.begin():
                    exp = session.get(Experiment, experiment_id)
                    if exp is None or exp.status not in ACTIVE:
                        continue
                    if exp.status == "pending":
                        self._submit(session, exp)
                    else:
                        self._follow(session, exp)
            except Exception:  # one experiment's trouble must not stall the others
                log.exception("following experiment %d failed", experiment_id)

    def _submit(self, session: Session, exp: Experiment) -> None:
        try:
            run_id = self.control.start_run(
                {"experiment-id": exp.id, "database-url": self._database_url}
            )
        except SuperLinkUnavailable as exc:
            if utcnow() - exp.created_at > self._submit_timeout:
                _fail(session, exp, f"could not submit: {exc}")
            elif exp.id not in self._unreachable_logged:
                self._unreachable_logged.add(exp.id)
                add_event(
                    session,
                    experiment_id=exp.id,
                    kind="superlink-unavailable",
                    message=f"waiting for the SuperLink: {exc}",
                )
            return
        except Exception as exc:
            _fail(session, exp, f"the SuperLink refused the run: {exc}")
            return
        update_experiment(session, experiment_id=exp.id, status="submitted", flwr_run_id=run_id)
        add_event(
            session,
            experiment_id=exp.id,
            kind="submitted",
            message=f"started Flower run {run_id}",
            data={"flwr_run_id": str(run_id)},
        )

    def _follow(self, session: Session, exp: Experiment) -> None:
        if exp.flwr_run_id is None:
            update_experiment(
                session, experiment_id=exp.id, status="cancelled", finished_at=utcnow()
            )
            return
        try:
            if exp.status == "cancelling":
                self.control.stop_run(exp.flwr_run_id)
            state = self.control.run_state(exp.flwr_run_id)
        except SuperLinkUnavailable as exc:
            log.warning("experiment %d: %s", exp.id, exc)
            return
        if state is None:
            # An in-memory SuperLink that restarted has forgotten the run.
            _fail(session, exp, "the SuperLink no longer knows this run (restarted?)")
            return
        if not state.finished:
            if state.status == "running" and exp.status == "submitted":
                update_experiment(session, experiment_id=exp.id, status="running")
            return
        finished = {"finished_at": exp.finished_at or utcnow()}
        if state.sub_status == "stopped" or exp.status == "cancelling":
            update_experiment(session, experiment_id=exp.id, status="cancelled", **finished)
        elif state.sub_status == "completed" and exp.error is None:
            update_experiment(session, experiment_id=exp.id, status="completed", **finished)
        else:
            # Keep the ServerApp's own error when it recorded one: it says more than Flower's.
            error = exp.error or state.details or f"Flower run {state.sub_status}"
            update_experiment(
                session, experiment_id=exp.id, status="failed", error=error, **finished
            )
        add_event(
            session,
            experiment_id=exp.id,
            kind="finished",
            message=f"Flower run {exp.flwr_run_id}: {state.status}:{state.sub_status}",
            data={"details": state.details},
        )
