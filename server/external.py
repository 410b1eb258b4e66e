"""Records an existing Flower app's rounds into Florist: ``strategy = recorded(FedAvg(...))``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.config import get_fused_config
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore.run import Run
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from florist.client.task import StrategyRef
from florist.server.db import repository as repo
from florist.server.db.engine import (
    make_engine,
    make_session_factory,
    upgrade_database,
    with_own_password,
)
from florist.server.db.models import utcnow
from florist.server.recording import RoundRecord, SqlRunRecorder, UpdateRecord
from florist.server.settings import get_settings
from florist.server.spec import ClientsConfig

log = logging.getLogger(__name__)

# The run-config key that names the database, as for Florist's own app; without it, Florist's
# settings (FLORIST_DATABASE_URL in the SuperLink's environment, else the default SQLite file).
DATABASE_URL_KEY = "database-url"
UNKNOWN_STRATEGY = "unknown"

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class ExternalSpec(BaseModel):
    """The ``spec`` of an external experiment: what Flower says of the run, not a Florist spec."""

    model_config = ConfigDict(extra="forbid")

    source: str = "external"
    app: str = Field(description="The FAB id, publisher/name.")
    app_version: str = ""
    run_config: dict[str, bool | int | float | str] = Field(default_factory=dict)
    # Known once the app's ServerApp records itself (recorded()); a run only discovered on the
    # SuperLink says nothing of its strategy or its clients.
    strategy: StrategyRef | None = None
    clients: ClientsConfig | None = None


def recorded(strategy: Strategy) -> RecordedStrategy:
    """Wrap a Flower message-API strategy so that ``start`` records every round into Florist.

    The rounds land under the run's external experiment (created if the API has not found the
    run yet), exactly as Florist's own runs do: aggregated train and evaluate metrics, the
    ``evaluate_fn`` results, and one update per node the strategy sent work.
    """
    return RecordedStrategy(strategy)


class RecordedStrategy(Strategy):
    """A strategy that delegates every hook to the one it wraps and records what they did.

    Flower's own ``Strategy.start`` runs the loop and calls the hooks on this object, so the
    wrapped strategy's behaviour is unchanged; anything else (``fraction_train``, ...) is read
    from the wrapped strategy as well.
    """

    def __init__(self, strategy: Strategy) -> None:
        if type(strategy).start is not Strategy.start:
            # Its own loop would call its own hooks, which this wrapper would never see.
            raise TypeError(
                f"recorded() needs a strategy that runs Flower's Strategy.start loop; "
                f"{type(strategy).__name__} overrides start()"
            )
        self.strategy = strategy
        self._recording: _Recording | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self._recording is not None:
            self._recording.sent(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if self._recording is not None:
            self._recording.trained(server_round, replies, arrays is not None, metrics)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if self._recording is not None:
            self._recording.evaluated(server_round, metrics)
        return metrics

    def summary(self) -> None:
        self.strategy.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's loop, with the run recorded: running, each round, then completed or failed."""
        recording = _Recording.open(grid, self.strategy, num_rounds)
        self._recording = recording
        try:
            result = super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                recording.evaluate_fn(evaluate_fn),
            )
            recording.close_round()
        except BaseException as exc:
            # A stop from the SuperLink arrives as an exception too; the API's follower then
            # says cancelled, which wins over this failure.
            recording.fail(exc)
            raise
        finally:
            self._recording = None
        recording.complete()
        return result


def run_config(run: Run) -> dict[str, bool | int | float | str]:
    """The run's config: the installed app's defaults with the run's overrides."""
    # Outside flwr-serverapp the app may not be installed; its overrides are all there is then.
    return dict(get_fused_config(run) or run.override_config)


def public_run_config(config: Mapping[str, bool | int | float | str]) -> dict[str, Any]:
    """``config`` without the database URL, which may hold a password: it is shown by the API."""
    return {key: value for key, value in config.items() if key != DATABASE_URL_KEY}


def run_database_url(config: Mapping[str, Any]) -> str:
    """The database a run records into: its ``database-url`` (sent without a password, which
    this process adds from its own settings, see ``with_own_password``), else Florist's
    settings (FLORIST_DATABASE_URL, else the default SQLite file)."""
    own = get_settings().resolved_database_url()
    named = str(config.get(DATABASE_URL_KEY) or "")
    return with_own_password(named, own) if named else own


def strategy_spec(strategy: Strategy) -> tuple[StrategyRef, ClientsConfig | None]:
    """The strategy by class name with its scalar settings, and the clients it samples when it
    says so as Flower's FedAvg family does."""
    settings = {
        name: value
        for name, value in vars(strategy).items()
        if not name.startswith("_") and isinstance(value, bool | int | float | str)
    }
    ref = StrategyRef(name=type(strategy).__name__, config=settings)
    try:
        clients = ClientsConfig.model_validate(
            {
                "min": settings["min_available_nodes"],
                "fraction_train": settings["fraction_train"],
                "fraction_evaluate": settings["fraction_evaluate"],
            }
        )
    except (KeyError, ValidationError):
        clients = None
    return ref, clients


def _scalars(record: MetricRecord | None) -> dict[str, float]:
    # Florist's round and update metrics are scalars; a list-valued metric is left out.
    if record is None:
        return {}
    return {
        key: float(value)
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _reply_metrics(content: RecordDict) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for record in content.metric_records.values():
        metrics.update(_scalars(record))
    return metrics


def _array_bytes(content: RecordDict) -> int:
    return sum(
        len(array.data) for arrays in content.array_records.values() for array in arrays.values()
    )


def _timestamp(seconds: float, *, low: datetime, high: datetime) -> datetime:
    # A reply's creation time comes from the node's clock: kept within what this side saw.
    if seconds <= 0:
        return high
    return min(max(datetime.fromtimestamp(seconds, UTC), low), high)


@dataclass
class _Round:
    """One round while it runs: what was sent, what came back, what was aggregated."""

    server_round: int
    started_at: datetime
    sent: dict[int, tuple[datetime, int]]  # node id -> (dispatched at, bytes down)
    updates: list[UpdateRecord] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    finished_at: datetime | None = None


class _Recording:
    """One recorded run: its database, experiment and Florist run, and the round in progress."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        run_id: int,
        weighted_by_key: str,
    ) -> None:
        self._engine = engine
        self._recorder = SqlRunRecorder(sessions)
        self._run_id = run_id
        self._weighted_by_key = weighted_by_key
        self._round: _Round | None = None
        self._last_metrics: dict[str, float] = {}

    @classmethod
    def open(cls, grid: Grid, strategy: Strategy, num_rounds: int) -> _Recording:
        """Find or create the run's external experiment and open a Florist run under it."""
        run = grid.run
        config = run_config(run)
        url = run_database_url(config)
        # The API may never have run on this database: the ServerApp may be the first writer.
        upgrade_database(url)
        engine = make_engine(url)
        try:
            sessions = make_session_factory(engine)
            ref, clients = strategy_spec(strategy)
            spec = ExternalSpec(
                app=run.fab_id,
                app_version=run.fab_version,
                run_config=public_run_config(config),
                strategy=ref,
                clients=clients,
            ).model_dump(mode="json")
            experiment, created = repo.ensure_external_experiment(
                sessions,
                flwr_run_id=run.run_id,
                name=run.fab_id or "flower-app",
                strategy=ref.name,
                num_rounds=num_rounds,
                spec=spec,
            )
            if not created and experiment.source == repo.EXTERNAL:
                # The API found the run first, knowing only what the SuperLink knows.
                with sessions.begin() as session:
                    repo.update_experiment(
                        session,
                        experiment_id=experiment.id,
                        strategy=ref.name,
                        num_rounds=num_rounds,
                        spec=spec,
                    )
            run_id = SqlRunRecorder(sessions).start_run(
                experiment_id=experiment.id, flwr_run_id=run.run_id
            )
        except BaseException:
            engine.dispose()
            raise
        where = make_url(url).render_as_string(hide_password=True)
        log.info("recording Flower run %d as experiment %d in %s", run.run_id, experiment.id, where)
        weighted_by_key = str(getattr(strategy, "weighted_by_key", "num-examples"))
        return cls(engine, sessions, run_id, weighted_by_key)

    def evaluate_fn(self, evaluate_fn: EvaluateFn | None) -> EvaluateFn | None:
        """``evaluate_fn``, its results kept: round 0's as an event, each round's with it."""
        if evaluate_fn is None:
            return None

        def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = evaluate_fn(server_round, arrays)
            if server_round == 0:
                self._recorder.record_event(
                    run_id=self._run_id,
                    kind="initial-evaluation",
                    message="evaluate_fn on the initial model",
                    data=_scalars(metrics),
                )
            elif self._round is not None and self._round.server_round == server_round:
                self._round.metrics = _scalars(metrics)
                self._round.finished_at = utcnow()
                # evaluate_fn is the last step of Flower's round: the round is complete.
                self.close_round()
            return metrics

        return evaluate_and_record

    def sent(self, server_round: int, messages: list[Message]) -> None:
        self.close_round()
        now = utcnow()
        self._round = _Round(
            server_round=server_round,
            started_at=now,
            sent={m.metadata.dst_node_id: (now, _array_bytes(m.content)) for m in messages},
        )

    def trained(
        self,
        server_round: int,
        replies: list[Message],
        aggregated: bool,
        metrics: MetricRecord | None,
    ) -> None:
        current = self._round
        if current is None or current.server_round != server_round:
            return
        now = utcnow()
        replied = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            replied.add(node_id)
            dispatched_at, bytes_down = current.sent.get(node_id, (current.started_at, 0))
            arrived_at = _timestamp(reply.metadata.created_at, low=dispatched_at, high=now)
            timing: dict[str, Any] = {
                "model_version": server_round - 1,
                "arrival_version": server_round - 1,
                "dispatched_at": dispatched_at,
                "arrived_at": arrived_at,
                "wall_duration_s": (arrived_at - dispatched_at).total_seconds(),
                "bytes_down": bytes_down,
            }
            if reply.has_error():
                current.updates.append(
                    UpdateRecord(
                        node_id=node_id, status="failed", reason=reply.error.reason, **timing
                    )
                )
                continue
            values = _reply_metrics(reply.content)
            examples = values.get(self._weighted_by_key)
            current.updates.append(
                UpdateRecord(
                    node_id=node_id,
                    # A strategy that aggregated nothing took none of the replies in.
                    status="accepted" if aggregated else "rejected",
                    reason=None if aggregated else "the strategy aggregated nothing",
                    num_examples=None if examples is None else int(examples),
                    metrics=values,
                    bytes_up=_array_bytes(reply.content),
                    **timing,
                )
            )
        for node_id, (dispatched_at, bytes_down) in current.sent.items():
            if node_id not in replied:
                current.updates.append(
                    UpdateRecord(
                        node_id=node_id,
                        status="failed",
                        reason="no reply before the timeout",
                        model_version=server_round - 1,
                        dispatched_at=dispatched_at,
                        wall_duration_s=(now - dispatched_at).total_seconds(),
                        bytes_down=bytes_down,
                    )
                )
        current.train_metrics = _scalars(metrics)
        current.finished_at = now

    def evaluated(self, server_round: int, metrics: MetricRecord | None) -> None:
        if self._round is not None and self._round.server_round == server_round:
            self._round.evaluate_metrics = _scalars(metrics)
            self._round.finished_at = utcnow()

    def close_round(self) -> None:
        """Commit the round in progress, with its updates, in one transaction."""
        current, self._round = self._round, None
        if current is None:
            return
        self._recorder.record_round(
            self._run_id,
            RoundRecord(
                server_round=current.server_round,
                started_at=current.started_at,
                finished_at=current.finished_at or utcnow(),
                metrics=current.metrics,
                train_metrics=current.train_metrics,
                evaluate_metrics=current.evaluate_metrics,
                updates=tuple(current.updates),
            ),
        )
        self._last_metrics = current.metrics

    def fail(self, exc: BaseException) -> None:
        """Keep what the unfinished round has, close the run as failed; never mask ``exc``."""
        current, self._round = self._round, None
        try:
            if current is not None and current.updates:
                self._recorder.record_updates(self._run_id, current.server_round, current.updates)
        except Exception:
            log.exception("could not record the updates of the failed round")
        try:
            self._recorder.finish_run(
                self._run_id, status="failed", error=f"{type(exc).__name__}: {exc}"
            )
        except Exception:
            log.exception("could not record the run's failure")
        finally:
            self._engine.dispose()

    def complete(self) -> None:
        try:
            self._recorder.finish_run(
                self._run_id, status="completed", final_metrics=self._last_metrics
            )
        finally:
            self._engine.dispose()
