"""Submits pending experiments to the SuperLink and follows their runs until they end."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from florist.server.control import ControlClient, RunState, SuperLinkUnavailable, app_fab_id
from florist.server.db.engine import without_password
from florist.server.db.models import Experiment, utcnow
from florist.server.db.repository import (
    add_event,
    claim_submission,
    ensure_external_experiment,
    finish_experiment,
    get_experiment,
    known_flwr_run_ids,
    list_active_experiment_ids,
    record_submission,
    release_claim,
    requeue_lost_run,
    stale_claims,
    update_experiment,
)
from florist.server.db.status import ExperimentStatus, IllegalTransition
from florist.server.external import ExternalSpec, public_run_config
from florist.server.logs import log_context
from florist.server.simulation import simulation_submission

log = logging.getLogger(__name__)

# The run-config key carrying a submission's claim token (repository.claim_submission).
SUBMISSION_KEY = "florist-submission"


def _fail(session: Session, exp: Experiment, error: str) -> None:
    # Not finish_experiment: a lost run fails even an experiment being cancelled.
    update_experiment(
        session,
        experiment_id=exp.id,
        status=ExperimentStatus.FAILED,
        finished_at=utcnow(),
        error=error,
    )


class RunFollower:
    """One background thread that moves experiments through their life cycle.

    pending → submitted (StartRun) → running → completed | failed; cancelling → cancelled
    (StopRun). The ServerApp writes rounds and its own start/finish; this side owns what only
    the SuperLink knows: that a run was accepted, that it ended, and how. Every status it sets
    goes through the repository, which refuses an illegal transition (florist.server.db.status).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        control: Callable[[], ControlClient],
        *,
        database_url: str,
        interval: float = 1.0,
        submit_timeout: timedelta = timedelta(minutes=5),
        claim_timeout: timedelta = timedelta(seconds=15),
        auto_resume: int = 3,
    ) -> None:
        self._sessions = sessions
        self._control_factory = control
        self._control: ControlClient | None = None
        self._database_url = database_url
        self._interval = interval
        self._submit_timeout = submit_timeout
        # How long a submission may stay unrecorded before reconcile() looks for its run: more
        # than a StartRun takes, so a live follower's submission is not second-guessed.
        self._claim_timeout = claim_timeout
        self._auto_resume = auto_resume  # resubmissions of a lost run before it fails
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_logged: set[int] = set()
        # Flower runs that have an experiment row or are Florist's own: not looked up again.
        self._known_runs: set[int] = set()

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
        """Find runs Florist did not start, then advance every active experiment by one step."""
        try:
            self.discover()
        except SuperLinkUnavailable as exc:
            log.debug("run discovery: %s", exc)
        except Exception:  # discovery's trouble must not stall the experiments Florist runs
            log.exception("run discovery failed")
        try:
            self.reconcile()
        except SuperLinkUnavailable as exc:
            log.debug("submission reconciliation: %s", exc)
        except Exception:
            log.exception("submission reconciliation failed")
        with self._sessions() as session:
            ids = list_active_experiment_ids(session)
        for experiment_id in ids:
            # Every line logged while handling it names the experiment.
            with log_context(experiment_id=experiment_id):
                try:
                    self._advance(experiment_id)
                except Exception:  # one experiment's trouble must not stall the others
                    log.exception("following experiment %d failed", experiment_id)

    def _advance(self, experiment_id: int) -> None:
        """Submit a pending experiment, or follow a submitted one's run by one step."""
        with self._sessions() as session, session.begin():
            exp = get_experiment(session, experiment_id=experiment_id)
            if exp is None or exp.status.terminal:
                return
            if exp.status != ExperimentStatus.PENDING:
                self._follow(session, exp)
                return
        # Outside any transaction: the claim is committed before StartRun.
        self._submit(experiment_id)

    def discover(self) -> None:
        """Give each SuperLink run that Florist did not start and has no row for an external
        experiment, in the status the run has; from then on it is followed like any other.

        A run of Florist's own app is never external: its experiment may just not know its run
        id yet (``flwr run server/flwr_app`` before its ServerApp starts).
        """
        runs = [
            run
            for run in self.control.list_runs()
            if run.run_id not in self._known_runs and run.fab_id != app_fab_id()
        ]
        if not runs:
            return
        with self._sessions() as session:
            known = known_flwr_run_ids(session, flwr_run_ids=[run.run_id for run in runs])
        for run in runs:
            if run.run_id not in known:
                experiment, created = ensure_external_experiment(
                    self._sessions, **discovered_experiment(run)
                )
                if created:
                    log.info("Flower run %d is external experiment %d", run.run_id, experiment.id)
            self._known_runs.add(run.run_id)

    def _submit(self, experiment_id: int) -> None:
        """Claim the experiment, start its run, record the run: exactly once.

        The claim is committed first, and the run carries the claim's token in its run config
        (``florist-submission``). A crash after StartRun leaves a claim that :meth:`reconcile`
        later matches to the run on the SuperLink instead of starting another; a StartRun whose
        outcome is unknown (the SuperLink unreachable, a timeout) is settled the same way.
        """
        token = uuid.uuid4().hex
        with self._sessions() as session, session.begin():
            if not claim_submission(
                session, experiment_id=experiment_id, token=token, now=utcnow()
            ):
                return  # another follower holds it, or it is no longer pending
            exp = get_experiment(session, experiment_id=experiment_id)
            spec = exp.spec if exp is not None else {}
        run_config: dict[str, int | float | str | bool] = {
            "experiment-id": experiment_id,
            # No password: the ServerApp adds its own (with_own_password).
            "database-url": without_password(self._database_url),
            SUBMISSION_KEY: token,
        }
        try:
            # A simulation-mode experiment goes to the simulation SuperLink (RoutedControl).
            simulation = simulation_submission(spec)
            if simulation is None:
                run_id = self.control.start_run(run_config)
            else:
                run_id = self.control.start_run(run_config | simulation[0], simulation[1])
        except SuperLinkUnavailable as exc:
            # The run may exist all the same: the claim stays until reconcile() has looked.
            with self._sessions() as session, session.begin():
                if experiment_id not in self._unreachable_logged:
                    self._unreachable_logged.add(experiment_id)
                    add_event(
                        session,
                        experiment_id=experiment_id,
                        kind="superlink-unavailable",
                        message=f"waiting for the SuperLink: {exc}",
                    )
            return
        except Exception as exc:
            with self._sessions() as session, session.begin():
                exp = get_experiment(session, experiment_id=experiment_id)
                if exp is not None and exp.status == ExperimentStatus.PENDING:
                    _fail(session, exp, f"the SuperLink refused the run: {exc}")
            return
        self._record_submission(experiment_id, token, run_id)

    def _record_submission(self, experiment_id: int, token: str, run_id: int) -> None:
        with self._sessions() as session, session.begin():
            if record_submission(
                session, experiment_id=experiment_id, token=token, flwr_run_id=run_id
            ):
                add_event(
                    session,
                    experiment_id=experiment_id,
                    kind="submitted",
                    message=f"started Flower run {run_id}",
                    data={"flwr_run_id": str(run_id)},
                )
                log.info("experiment %d submitted: Flower run %d", experiment_id, run_id)
                return
            exp = get_experiment(session, experiment_id=experiment_id)
        # Not ours to record. A ServerApp that started already marked it running with this run
        # id, or reconcile() adopted this run: nothing to do. Otherwise (cancelled meanwhile,
        # or another run is the experiment's) this run has nobody to follow it: stop it.
        if exp is not None and exp.flwr_run_id == run_id:
            return
        log.warning(
            "experiment %d: not recording Flower run %d; stopping it", experiment_id, run_id
        )
        self.control.stop_run(run_id)

    def reconcile(self) -> None:
        """Settle claims older than ``claim_timeout``: a run on the SuperLink that carries the
        claim's token becomes the experiment's run; with none, the claim is released and the
        experiment submitted again (or failed, once it waited past ``submit_timeout``)."""
        now = utcnow()
        with self._sessions() as session:
            stale = stale_claims(session, claimed_before=now - self._claim_timeout)
        if not stale:
            return
        try:
            runs = self.control.list_runs()
        except SuperLinkUnavailable as exc:
            # Nothing can be settled; those that have waited too long fail. If their run did
            # start, its ServerApp finds the experiment ended and stops at once.
            for experiment_id, _ in stale:
                with self._sessions() as session, session.begin():
                    exp = get_experiment(session, experiment_id=experiment_id)
                    if exp is not None and now - exp.created_at > self._submit_timeout:
                        _fail(session, exp, f"could not submit: {exc}")
            raise
        by_token = {
            str(run.override_config.get(SUBMISSION_KEY)): run.run_id
            for run in runs
            if SUBMISSION_KEY in run.override_config
        }
        for experiment_id, token in stale:
            with self._sessions() as session, session.begin():
                run_id = by_token.get(token)
                if run_id is not None:
                    if record_submission(
                        session, experiment_id=experiment_id, token=token, flwr_run_id=run_id
                    ):
                        add_event(
                            session,
                            experiment_id=experiment_id,
                            kind="submission-reconciled",
                            message=f"Flower run {run_id} was started for it but not recorded; "
                            "adopted it instead of starting another",
                            data={"flwr_run_id": str(run_id)},
                        )
                    continue
                if not release_claim(session, experiment_id=experiment_id, token=token):
                    continue
                exp = get_experiment(session, experiment_id=experiment_id)
                if exp is not None and now - exp.created_at > self._submit_timeout:
                    _fail(session, exp, "could not submit: the SuperLink never took the run")

    def _follow(self, session: Session, exp: Experiment) -> None:
        if exp.flwr_run_id is None:
            finish_experiment(
                session,
                experiment_id=exp.id,
                status=ExperimentStatus.CANCELLED,
                finished_at=utcnow(),
            )
            return
        try:
            if exp.status == ExperimentStatus.CANCELLING:
                self.control.stop_run(exp.flwr_run_id)
            state = self.control.run_state(exp.flwr_run_id)
        except SuperLinkUnavailable as exc:
            log.warning("experiment %d: %s", exp.id, exc)
            return
        if state is None:
            # An in-memory SuperLink that restarted has forgotten the run.
            self._lost(session, exp, "the SuperLink no longer knows it (restarted?)")
            return
        if not state.finished:
            if state.status == "running" and exp.status == ExperimentStatus.SUBMITTED:
                try:
                    update_experiment(
                        session, experiment_id=exp.id, status=ExperimentStatus.RUNNING
                    )
                except IllegalTransition as exc:  # a cancel came in since this tick read it
                    log.info("experiment %d: %s", exp.id, exc)
            return
        finished_at = exp.finished_at or utcnow()
        error = None
        # A cancel that arrives after this read still wins: finish_experiment sees to that.
        if state.sub_status == "stopped" or exp.status == ExperimentStatus.CANCELLING:
            outcome = ExperimentStatus.CANCELLED
        elif state.sub_status == "completed" and exp.error is None:
            outcome = ExperimentStatus.COMPLETED
        elif exp.error is None and exp.status in (
            ExperimentStatus.SUBMITTED,
            ExperimentStatus.RUNNING,
        ):
            # Flower ended the run, its ServerApp never did (it records every end it lives to
            # see): it died, or never started.
            self._lost(session, exp, state.details or f"it ended {state.sub_status}")
            return
        else:
            outcome = ExperimentStatus.FAILED
            # Keep the ServerApp's own error when it recorded one: it says more than Flower's.
            error = exp.error or state.details or f"Flower run {state.sub_status}"
        try:
            finish_experiment(
                session,
                experiment_id=exp.id,
                status=outcome,
                finished_at=finished_at,
                error=error,
            )
        except IllegalTransition as exc:
            # The ServerApp finished it differently since this tick read it: its word stands.
            log.info("experiment %d: %s", exp.id, exc)
            return
        add_event(
            session,
            experiment_id=exp.id,
            kind="finished",
            message=f"Flower run {exp.flwr_run_id}: {state.status}:{state.sub_status}",
            data={"details": state.details},
        )
        log.info("experiment %d %s (Flower run %d)", exp.id, outcome, exp.flwr_run_id)

    def _lost(self, session: Session, exp: Experiment, why: str) -> None:
        """The experiment's run is gone without its ServerApp finishing it: submit it again, to
        resume from its last committed round, up to ``auto_resume`` times; then it fails."""
        assert exp.flwr_run_id is not None
        lost = f"Flower run {exp.flwr_run_id} was lost: {why}"
        if exp.source != "florist":
            _fail(session, exp, lost)  # another app's run: Florist cannot start it again
            return
        if exp.resumes >= self._auto_resume:
            tried = f"resumed {exp.resumes} times already" if exp.resumes else "auto-resume is off"
            _fail(session, exp, f"{lost} ({tried}; POST /api/v1/experiments/{exp.id}/resume)")
            return
        if requeue_lost_run(session, experiment_id=exp.id, flwr_run_id=exp.flwr_run_id):
            add_event(
                session,
                experiment_id=exp.id,
                kind="run-lost",
                message=f"{lost}; submitted again to resume from its last committed round "
                f"(attempt {exp.resumes + 1} of {self._auto_resume})",
                data={"flwr_run_id": str(exp.flwr_run_id), "details": why},
            )
            self.wake()


def discovered_experiment(run: RunState) -> dict[str, Any]:
    """The columns of the external experiment of a run found on the SuperLink: what Flower says
    of it (its app, run config, times and status); its strategy and rounds are unknown."""
    spec = ExternalSpec(
        app=run.fab_id,
        app_version=run.fab_version,
        run_config=public_run_config(run.override_config),
    )
    status, error = ExperimentStatus.SUBMITTED, None
    if run.status == "running":
        status = ExperimentStatus.RUNNING
    elif run.finished:
        status = _FINISHED.get(run.sub_status, ExperimentStatus.FAILED)
        if status == ExperimentStatus.FAILED:
            error = run.details or f"Flower run {run.sub_status}"
    return {
        "flwr_run_id": run.run_id,
        "name": run.fab_id or "flower-app",
        "strategy": "",
        "num_rounds": 0,
        "spec": spec.model_dump(mode="json"),
        "status": status,
        "created_at": run.pending_at,
        "started_at": run.running_at,
        "finished_at": run.finished_at if run.finished else None,
        "error": error,
    }


_FINISHED = {"completed": ExperimentStatus.COMPLETED, "stopped": ExperimentStatus.CANCELLED}
