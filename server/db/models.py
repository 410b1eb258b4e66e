"""SQLAlchemy models for experiments, runs, rounds, client updates, nodes, events and API tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from florist.server.db.status import ExperimentStatus, as_status

RUN_STATUSES = ("running", "completed", "failed", "stopped")
# Where an experiment comes from: submitted to Florist, or a Flower app run with `flwr run` that
# Florist found on its SuperLink or that recorded itself (florist.server.external).
EXPERIMENT_SOURCES = ("florist", "external")
_EXTERNAL = text("source = 'external'")
UPDATE_STATUSES = ("accepted", "rejected", "failed")

_UINT64_LIMIT = 2**64
_INT64_LIMIT = 2**63


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UInt64(TypeDecorator[int]):
    """An unsigned 64-bit integer stored in a signed BIGINT.

    Flower node and run ids use the whole unsigned range, which BIGINT cannot hold, so values
    at or above 2**63 are shifted down by 2**64. Equality lookups work; ORDER BY and range
    comparisons in SQL do not follow unsigned order.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if not 0 <= value < _UINT64_LIMIT:
            raise ValueError(f"{value} is outside the unsigned 64-bit range")
        return value - _UINT64_LIMIT if value >= _INT64_LIMIT else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return value + _UINT64_LIMIT if value < 0 else value


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite keeps no offset, so values are normalised to UTC on the way in and marked UTC on the
    way out. Naive datetimes are refused: their meaning depends on the writer's clock settings.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is UTC:  # PostgreSQL sessions run in UTC (db/engine.py)
            return value
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name == "sqlite":
            return _utc_from_sqlite
        return super().result_processor(dialect, coltype)


def _utc_from_sqlite(value: str | None) -> datetime | None:
    """A stored SQLite timestamp (UTC wall time as text, no offset) as an aware UTC datetime."""
    if value is None:
        return None
    # One parse with the offset appended: SQLAlchemy's parse, then replacing the tzinfo, cost
    # ten times as much, 3 timestamps a row (a tenth of a 1,000-row page of updates).
    try:
        return datetime.fromisoformat(value + "+00:00")
    except ValueError:  # text this code did not write, e.g. with an offset of its own
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


class StatusColumn(TypeDecorator[ExperimentStatus]):
    """An experiment's status: a plain string in the database, an ExperimentStatus in Python.

    Stored as the bare value, so no migration was needed when the enum came; an unknown name
    is refused on the way in, so no typo reaches a row.
    """

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else as_status(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> ExperimentStatus | None:
        return None if value is None else ExperimentStatus(value)


# Deterministic constraint names keep Alembic diffs and SQLite batch migrations stable.
_NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base holding the metadata that the migrations mirror."""

    metadata = MetaData(naming_convention=_NAMING_CONVENTION)


# JSON columns that may be absent store SQL NULL rather than the JSON literal null.
_NullableJSON = JSON(none_as_null=True)


class Experiment(Base):
    """A user's request to train (strategy, dataset and the validated spec), or an external
    Flower app's run (``source`` external)."""

    __tablename__ = "experiments"
    __table_args__ = (
        # One external experiment per Flower run, however many writers find it at once (the
        # recording ServerApp and the API's run discovery). Partial: Florist's own rows keep
        # their run ids unchecked, as before, so no existing database needs cleaning first.
        Index(
            "uq_experiments_external_flwr_run_id",
            "flwr_run_id",
            unique=True,
            sqlite_where=_EXTERNAL,
            postgresql_where=_EXTERNAL,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Written only by florist.server.db.repository, which enforces the allowed transitions.
    status: Mapped[ExperimentStatus] = mapped_column(StatusColumn, default=ExperimentStatus.PENDING)
    strategy: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[str] = mapped_column(String(100))
    num_rounds: Mapped[int] = mapped_column(Integer)
    # An external experiment has no Florist spec: its spec holds what Flower says of the run.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(20), default="florist", server_default="florist")
    flwr_run_id: Mapped[int | None] = mapped_column(UInt64, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set while one follower submits the experiment (repository.claim_submission): the run it
    # starts carries the token in its run config, so a start that was never recorded is found
    # on the SuperLink instead of being repeated.
    submission_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Times its run was started again after it was lost (automatically or on request).
    resumes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    runs: Mapped[list[Run]] = relationship(
        back_populates="experiment",
        order_by="Run.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Run(Base):
    """One Flower run executing an experiment."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    flwr_run_id: Mapped[int] = mapped_column(UInt64)
    status: Mapped[str] = mapped_column(String(20), default="running")
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    final_metrics: Mapped[dict[str, Any] | None] = mapped_column(_NullableJSON, nullable=True)

    experiment: Mapped[Experiment] = relationship(back_populates="runs")
    rounds: Mapped[list[Round]] = relationship(
        back_populates="run",
        order_by="Round.server_round",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Round(Base):
    """One finished server round: the global model's evaluation and aggregated client metrics."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("run_id", "server_round"),
        # The listing order of GET /experiments/{id}/rounds (migration 0008).
        Index("ix_rounds_listing", "experiment_id", "run_id", "server_round", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    server_round: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime)
    duration_s: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    train_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    evaluate_metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_updates: Mapped[int] = mapped_column(Integer)
    num_rejected: Mapped[int] = mapped_column(Integer)
    num_failures: Mapped[int] = mapped_column(Integer)
    # Simulated seconds since the run began when the round was aggregated (virtual clock only).
    virtual_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What the round cost the server: the strategy's time to make the new model, and the
    # training traffic (models sent to nodes, updates received). None on rounds recorded before
    # they were measured.
    aggregate_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes_in: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes_out: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    run: Mapped[Run] = relationship(back_populates="rounds")


class Checkpoint(Base):
    """A global model an experiment kept (safetensors), written in its round's transaction."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("experiment_id", "server_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    server_round: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    # Loaded only when asked for: listing checkpoints must not read every model.
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ResumePointRow(Base):
    """The experiment's resume point (server/runtime/resume.py): one per experiment, replaced in
    each round's transaction, so it always belongs to the last committed round."""

    __tablename__ = "resume_points"

    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    server_round: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ClientUpdate(Base):
    """One client's reply in a round: accepted into the aggregate, rejected, or failed."""

    __tablename__ = "client_updates"
    __table_args__ = (
        # Pages of GET /experiments/{id}/updates in their order, one round's updates, and the
        # accepted count of the progress summary, without reading every row (migration 0008).
        Index("ix_client_updates_listing", "experiment_id", "run_id", "server_round", "id"),
        Index("ix_client_updates_round", "experiment_id", "server_round", "id"),
        Index("ix_client_updates_status", "experiment_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    server_round: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[int] = mapped_column(UInt64)
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    num_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    train_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    staleness: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The task's life, for asynchronous runs and the client timeline: the global model version
    # it was sent and the version when it arrived (staleness = their difference), its local
    # steps, when it left and came back, and how long it took on the wall and virtual clocks.
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    arrival_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    local_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    arrived_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    wall_duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    virtual_duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class Node(Base):
    """A Flower SuperNode the server has heard from."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(UInt64, unique=True)
    node_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_seen: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Event(Base):
    """A timeline entry: submissions, state changes, warnings, errors."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), nullable=True, index=True
    )
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), nullable=True
    )
    kind: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(_NullableJSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class NodeKey(Base):
    """A SuperNode public key registered with the SuperLink (SuperNode authentication).

    ``node_id`` is the Flower node id the SuperLink gave the key when it was registered: the
    SuperNode that connects with the key is that node.
    """

    __tablename__ = "node_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    fingerprint: Mapped[str] = mapped_column(String(100), unique=True)
    public_key: Mapped[str] = mapped_column(Text)  # the OpenSSH line
    node_id: Mapped[int] = mapped_column(UInt64)
    added_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


API_ROLES = ("reader", "operator", "admin")


class ApiToken(Base):
    """An API token (server/tokens.py): its role and the SHA-256 of its secret, never the secret."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ApiSession(Base):
    """A dashboard login: the cookie's SHA-256, the token it was opened with, when it ends."""

    __tablename__ = "api_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
