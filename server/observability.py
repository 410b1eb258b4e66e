"""Prometheus metrics of the API: its requests, and every recent experiment read from the database.

Request metrics come from prometheus-fastapi-instrumentator (``http_requests_total``,
``http_request_duration_seconds``, …, labelled by route template). The experiment series are
computed from the database at scrape time by :class:`ExperimentCollector`, not counted in the
process: the ServerApp that writes the rounds is another process (on another machine, in a
deployment), and every API replica then reports the same numbers, also after a restart. A
scrape costs a handful of grouped queries over the rows of at most
``metrics_max_experiments`` experiments: the unfinished ones and those finished within
``metrics_recent_s``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import distinct, func, or_, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from florist.server.db.models import ClientUpdate, Experiment, Node, Round, utcnow
from florist.server.db.status import ExperimentStatus
from florist.server.settings import Settings

log = logging.getLogger(__name__)

UPDATE_STATUSES = ("accepted", "rejected", "failed")


@dataclass
class ExperimentFigures:
    """What ``/metrics`` says of one experiment."""

    id: int
    name: str
    strategy: str
    status: str
    rounds_planned: int
    rounds_done: int = 0  # the highest round recorded
    rounds_recorded: int = 0
    round_seconds: float = 0.0  # summed over its rounds
    last_round_seconds: float | None = None
    last_round_metrics: dict[str, float] = field(default_factory=dict)
    aggregations_timed: int = 0  # rounds whose aggregation time was measured
    aggregate_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    updates: dict[str, int] = field(default_factory=dict)
    nodes: int = 0


@dataclass
class Snapshot:
    """The database's figures at one scrape."""

    experiments: list[ExperimentFigures]
    by_status: dict[str, int]
    nodes_recent: int


def read_snapshot(
    session: Session,
    *,
    now: datetime,
    recent_s: float,
    max_experiments: int,
    node_window_s: float,
) -> Snapshot:
    """The figures of the experiments worth reporting: unfinished, or finished at most
    ``recent_s`` ago, the newest ``max_experiments`` of them."""
    active = [s.value for s in ExperimentStatus if s.active]
    rows = session.execute(
        select(
            Experiment.id,
            Experiment.name,
            Experiment.strategy,
            Experiment.status,
            Experiment.num_rounds,
        )
        .where(
            or_(
                Experiment.status.in_(active),
                Experiment.finished_at >= now - timedelta(seconds=recent_s),
            )
        )
        .order_by(Experiment.id.desc())
        .limit(max_experiments)
    ).all()
    figures = {
        r.id: ExperimentFigures(r.id, r.name, r.strategy, str(r.status), r.num_rounds) for r in rows
    }
    ids = list(figures)
    if ids:
        _read_rounds(session, ids, figures)
        _read_updates(session, ids, figures, since=now - timedelta(seconds=node_window_s))
    by_status: dict[str, int] = {s.value: 0 for s in ExperimentStatus}
    for status, count in session.execute(
        select(Experiment.status, func.count()).group_by(Experiment.status)
    ):
        by_status[str(status)] = count
    nodes_recent = session.scalar(
        select(func.count())
        .select_from(Node)
        .where(Node.last_seen >= now - timedelta(seconds=node_window_s))
    )
    return Snapshot(list(figures.values()), by_status, int(nodes_recent or 0))


def _read_rounds(session: Session, ids: list[int], figures: dict[int, ExperimentFigures]) -> None:
    totals = session.execute(
        select(
            Round.experiment_id,
            func.count(),
            func.max(Round.server_round),
            func.sum(Round.duration_s),
            func.count(Round.aggregate_s),
            func.sum(Round.aggregate_s),
            func.sum(Round.bytes_in),
            func.sum(Round.bytes_out),
        )
        .where(Round.experiment_id.in_(ids))
        .group_by(Round.experiment_id)
    )
    for exp_id, count, highest, seconds, timed, agg, b_in, b_out in totals:
        fig = figures[exp_id]
        fig.rounds_recorded, fig.rounds_done = count, highest or 0
        fig.round_seconds = float(seconds or 0.0)
        fig.aggregations_timed, fig.aggregate_seconds = timed, float(agg or 0.0)
        fig.bytes_in, fig.bytes_out = int(b_in or 0), int(b_out or 0)
    latest = (
        select(func.max(Round.id))
        .where(Round.experiment_id.in_(ids))
        .group_by(Round.experiment_id)
        .scalar_subquery()
    )
    for exp_id, seconds, metrics in session.execute(
        select(Round.experiment_id, Round.duration_s, Round.metrics).where(Round.id.in_(latest))
    ):
        fig = figures[exp_id]
        fig.last_round_seconds = seconds
        fig.last_round_metrics = {
            k: float(v)
            for k, v in (metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


def _read_updates(
    session: Session, ids: list[int], figures: dict[int, ExperimentFigures], *, since: datetime
) -> None:
    for exp_id, status, count in session.execute(
        select(ClientUpdate.experiment_id, ClientUpdate.status, func.count())
        .where(ClientUpdate.experiment_id.in_(ids))
        .group_by(ClientUpdate.experiment_id, ClientUpdate.status)
    ):
        figures[exp_id].updates[status] = count
    # A node is connected to an experiment while it keeps replying to it. Replies are
    # committed with their round, so a node shows up once its first round is recorded.
    for exp_id, count in session.execute(
        select(ClientUpdate.experiment_id, func.count(distinct(ClientUpdate.node_id)))
        .where(
            ClientUpdate.experiment_id.in_(ids),
            ClientUpdate.status != "failed",
            ClientUpdate.arrived_at >= since,
        )
        .group_by(ClientUpdate.experiment_id)
    ):
        figures[exp_id].nodes = count


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families, one series per experiment (label
    ``experiment_id``); ``florist_experiment_info`` maps the id to its name, strategy and
    status."""
    label = ["experiment_id"]
    info = GaugeMetricFamily(
        "florist_experiment_info",
        "An experiment /metrics reports on, with its name, strategy and status (value 1).",
        labels=[*label, "name", "strategy", "status"],
    )
    planned = GaugeMetricFamily(
        "florist_experiment_rounds_planned", "Rounds asked for.", labels=label
    )
    done = GaugeMetricFamily(
        "florist_experiment_rounds_done", "The latest round recorded.", labels=label
    )
    duration = SummaryMetricFamily(
        "florist_experiment_round_duration_seconds",
        "Wall seconds from one aggregation to the next, over the recorded rounds.",
        labels=label,
    )
    last = GaugeMetricFamily(
        "florist_experiment_last_round_duration_seconds",
        "Wall seconds the latest recorded round took.",
        labels=label,
    )
    aggregate = SummaryMetricFamily(
        "florist_experiment_aggregate_seconds",
        "Wall seconds the ServerApp's strategy took to make each round's model.",
        labels=label,
    )
    received = CounterMetricFamily(
        "florist_experiment_received_bytes",
        "Bytes of the updates the ServerApp received (training replies' arrays).",
        labels=label,
    )
    sent = CounterMetricFamily(
        "florist_experiment_sent_bytes",
        "Bytes of the models the ServerApp sent with training tasks.",
        labels=label,
    )
    updates = CounterMetricFamily(
        "florist_experiment_updates",
        "Client updates recorded: accepted into an aggregate, rejected, or failed.",
        labels=[*label, "status"],
    )
    nodes = GaugeMetricFamily(
        "florist_experiment_connected_nodes",
        "Nodes whose latest recorded reply to the experiment is recent "
        "(FLORIST_METRICS_NODE_WINDOW_S).",
        labels=label,
    )
    metric = GaugeMetricFamily(
        "florist_experiment_round_metric",
        "The latest round's centralized evaluation of the global model (loss, accuracy, ...).",
        labels=[*label, "metric"],
    )
    for fig in snapshot.experiments:
        key = [str(fig.id)]
        info.add_metric([*key, fig.name, fig.strategy, fig.status], 1)
        planned.add_metric(key, fig.rounds_planned)
        done.add_metric(key, fig.rounds_done)
        duration.add_metric(key, count_value=fig.rounds_recorded, sum_value=fig.round_seconds)
        if fig.last_round_seconds is not None:
            last.add_metric(key, fig.last_round_seconds)
        aggregate.add_metric(
            key, count_value=fig.aggregations_timed, sum_value=fig.aggregate_seconds
        )
        received.add_metric(key, fig.bytes_in)
        sent.add_metric(key, fig.bytes_out)
        for status in UPDATE_STATUSES:
            updates.add_metric([*key, status], fig.updates.get(status, 0))
        nodes.add_metric(key, fig.nodes)
        for name, value in sorted(fig.last_round_metrics.items()):
            metric.add_metric([*key, name], value)
    yield from (info, planned, done, duration, last, aggregate, received, sent, updates, nodes)
    yield metric
    experiments = GaugeMetricFamily(
        "florist_experiments", "Experiments in the database, by status.", labels=["status"]
    )
    for status, count in sorted(snapshot.by_status.items()):
        experiments.add_metric([status], count)
    yield experiments
    yield GaugeMetricFamily(
        "florist_nodes_recent",
        "Nodes the ServerApp heard from recently (FLORIST_METRICS_NODE_WINDOW_S), any experiment.",
        value=snapshot.nodes_recent,
    )


class ExperimentCollector(Collector):
    """Reads the experiments' figures from the database at each scrape.

    A database that cannot be read costs the experiment series, not the scrape:
    ``florist_database_up`` says 0 and the request metrics are still served.
    """

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._clock = clock

    def describe(self) -> list[Metric]:
        # Nothing to describe ahead: registering must not query a database not yet opened.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            with self._sessions()() as session:
                snapshot = read_snapshot(
                    session,
                    now=self._clock(),
                    recent_s=self._settings.metrics_recent_s,
                    max_experiments=self._settings.metrics_max_experiments,
                    node_window_s=self._settings.metrics_node_window_s,
                )
        except Exception:
            log.exception("reading the experiments' metrics from the database failed")
            up = 0
        else:
            up = 1
            yield from families(snapshot)
        yield GaugeMetricFamily(
            "florist_database_up", "1 if the last scrape could read the database.", value=up
        )


def instrument(app: FastAPI, settings: Settings) -> CollectorRegistry:
    """Count the app's requests and serve ``GET /metrics`` (Prometheus' text format).

    Each app has its own registry, so several apps in one process (tests) never share series.
    """
    registry = CollectorRegistry()
    Instrumentator(
        registry=registry,
        excluded_handlers=["/metrics", "/static/.*"],
        # A server-sent event stream lasts minutes: its latency is its time to first byte.
        should_exclude_streaming_duration=True,
    ).instrument(app)
    registry.register(ExperimentCollector(lambda: app.state.sessions, settings))

    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # A plain def: the scrape's queries run in the thread pool, not on the event loop.
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    return registry
