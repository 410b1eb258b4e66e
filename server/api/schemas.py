"""REST payloads: ExperimentCreate in, *Public out (the naming ladder of the FastAPI template)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from florist.client.task import StrategyRef, WorkloadRef
from florist.server.api.deps import NEXT_CURSOR_DESCRIPTION
from florist.server.certs import parse_node_public_key
from florist.server.db.status import ExperimentStatus
from florist.server.metrics import BestBy
from florist.server.spec import ClientsConfig, ExperimentSpec


class Paged(BaseModel):
    """A page of a listing. ``next_cursor`` appears only when another page follows, so a
    listing that fits one page reads exactly as before pagination: ``{data, count}``."""

    next_cursor: int | None = Field(
        default=None,
        description=NEXT_CURSOR_DESCRIPTION,
        exclude_if=lambda cursor: cursor is None,
    )


class ExperimentCreate(ExperimentSpec):
    """The body of ``POST /experiments``."""

    model_config = ExperimentSpec.model_config | {
        "json_schema_extra": {
            "examples": [
                {
                    "name": "digits-fedavg",
                    "strategy": {"name": "fedavg", "config": {}},
                    "workload": {
                        "name": "digits",
                        "config": {
                            "partitioner": {"name": "dirichlet", "alpha": 0.5},
                            "seed": 0,
                            "model": {"name": "mlp"},
                        },
                    },
                    "rounds": 5,
                    "clients": {"min": 3},
                }
            ]
        }
    }


class ExperimentPublic(BaseModel):
    id: int
    name: str
    status: ExperimentStatus
    strategy: StrategyRef
    mode: Literal["deployment", "simulation"] = Field(
        default="deployment",
        description="Where its clients run: real SuperNodes, or virtual clients on Flower's "
        "Simulation Engine (clients.virtual, clients.per_round).",
    )
    workload: WorkloadRef | None = Field(
        description="What is trained; null for an external experiment (its app's own)."
    )
    training: dict[str, Any]
    clients: ClientsConfig | None = Field(
        default=None, description="Null for an external experiment whose strategy is unknown."
    )
    num_rounds: int
    current_round: int = 0
    asynchronous: bool = Field(
        default=False,
        description="The strategy aggregates updates as they arrive: its rounds are aggregations, "
        "and accepted_updates is the measure of progress.",
    )
    accepted_updates: int = Field(default=0, description="Client updates aggregated so far.")
    resumes: int = Field(
        default=0,
        description="Times a new run took the experiment over from its last committed round "
        "(its run was lost, or a resume was requested).",
    )
    best_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of the best round (best_round). The best round is chosen on "
        "the validation split, never on the test split: the round with the highest val-accuracy, "
        "the earliest on a tie. For rounds recorded without val-accuracy (before validation "
        "splits existed, or a dataset with validation_fraction 0) the last round stands in, and "
        "best_by says so.",
    )
    best_round: int | None = Field(
        default=None, description="The round best_accuracy and best_val_accuracy come from."
    )
    best_val_accuracy: float | None = Field(
        default=None,
        description="Validation accuracy of best_round; null if it recorded none.",
    )
    best_by: BestBy | None = Field(
        default=None,
        description="How best_round was chosen: 'validation' (highest val-accuracy) or "
        "'last-round' (no round has a val-accuracy).",
    )
    # Flower's run ids are uint64: sent as a string so JavaScript keeps every digit.
    flwr_run_id: str | None = None
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    source: Literal["florist", "external"] = Field(
        default="florist",
        description="'florist': submitted to this API. 'external': a Flower app run with `flwr "
        "run` on Florist's SuperLink, found there (its status only) or recording its own rounds "
        "(`florist.server.external.recorded`); it has no Florist spec, so its dataset, model "
        "and training are empty, its strategy is the Flower class name ('unknown' if it did not "
        "record itself) and its num_rounds 0 until it says.",
    )
    app: str | None = Field(
        default=None,
        description="External experiments: the Flower app (FAB id publisher/name and version).",
    )
    run_config: dict[str, Any] | None = Field(
        default=None, description="External experiments: the Flower run's config."
    )


class ExperimentsPublic(Paged):
    data: list[ExperimentPublic]
    count: int


class RoundPublic(BaseModel):
    server_round: int
    started_at: datetime
    finished_at: datetime
    duration_s: float
    metrics: dict[str, Any]
    train_metrics: dict[str, Any]
    evaluate_metrics: dict[str, Any]
    num_updates: int
    num_rejected: int
    num_failures: int
    virtual_time_s: float | None = Field(
        default=None,
        description="Simulated seconds since the run began when the round was aggregated.",
    )
    aggregate_s: float | None = Field(
        default=None,
        description="Wall seconds the strategy took to make the round's model (null on rounds "
        "recorded before it was measured).",
    )
    bytes_in: int | None = Field(
        default=None, description="Bytes of the updates the server received in the round."
    )
    bytes_out: int | None = Field(
        default=None, description="Bytes of the models the server sent for the round's tasks."
    )


class RoundsPublic(Paged):
    data: list[RoundPublic]
    count: int


class UpdatePublic(BaseModel):
    server_round: int
    node_id: str = Field(description="Flower's uint64 node id, as a string.")
    status: str
    reason: str | None
    num_examples: int | None
    train_time_s: float | None
    metrics: dict[str, Any]
    bytes_up: int
    bytes_down: int
    staleness: int
    created_at: datetime
    model_version: int | None = Field(
        default=None, description="Global model version the task was sent."
    )
    arrival_version: int | None = Field(
        default=None, description="Global model version when the reply arrived."
    )
    local_steps: int | None = None
    dispatched_at: datetime | None = None
    arrived_at: datetime | None = None
    wall_duration_s: float | None = None
    virtual_duration_s: float | None = None


class UpdatesPublic(Paged):
    data: list[UpdatePublic]
    count: int


class EventPublic(BaseModel):
    """One entry of an experiment's log: a decision or a state change of its run."""

    id: int = Field(description="The event's row id; pass it as ``after`` to read on from here.")
    run_id: int | None = None
    kind: str = Field(
        description="What happened: submitted, initial-evaluation, dispatch, policy, tasks, "
        "cancel, …"
    )
    message: str
    data: dict[str, Any] | None = Field(
        default=None,
        description="The kind's details; node ids (``node_id``, ``node_ids``, ``queued``, "
        "``lost``, ``waiting_for``) are Flower's uint64 ids, as strings.",
    )
    created_at: datetime


class EventsPublic(Paged):
    data: list[EventPublic]
    count: int


class StrategyPublic(BaseModel):
    name: str
    summary: str
    paper: str
    tags: list[str]
    config_schema: dict[str, Any]


class StrategiesPublic(BaseModel):
    data: list[StrategyPublic]
    count: int
    errors: dict[str, str] = Field(
        default_factory=dict, description="Plugins that failed to load, with the reason."
    )


class CheckpointPublic(BaseModel):
    server_round: int
    run_id: int
    sha256: str = Field(description="Content address of the safetensors file.")
    num_bytes: int
    created_at: datetime


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    count: int


class WorkloadPublic(BaseModel):
    name: str
    summary: str
    tags: list[str]
    config_schema: dict[str, Any]
    server_evaluation: bool = Field(
        description="Whether the server holds test data and evaluates every global model."
    )


class WorkloadsPublic(BaseModel):
    data: list[WorkloadPublic]
    count: int
    errors: dict[str, str] = Field(
        default_factory=dict, description="Plugins that failed to load, with the reason."
    )


class Health(BaseModel):
    status: str
    database: str
    superlink: str


class NodePublic(BaseModel):
    """A SuperNode: what the SuperLink says of it now, and what Florist recorded of it."""

    node_id: str = Field(description="Flower's uint64 node id, as a string.")
    node_config: dict[str, Any]
    first_seen: datetime | None = Field(
        default=None, description="When it first took part in a round; None if it never did."
    )
    last_seen: datetime | None = Field(
        default=None, description="When it last took part in a round; None if it never did."
    )
    seconds_since_seen: float | None = None
    stale: bool = Field(
        description="It took part in a round, but not for longer than the request's "
        "``stale_after_s``."
    )
    status: str | None = Field(
        default=None,
        description="The SuperLink's word now: online (heartbeating), offline (heartbeat "
        "lapsed), registered (never connected), unregistered (it left). None when the SuperLink "
        "does not know the node or could not be asked (see ``NodesPublic.superlink``).",
    )
    registered_at: datetime | None = Field(
        default=None, description="When it joined the SuperLink (SuperLink)."
    )
    connected_at: datetime | None = Field(
        default=None, description="When it last came online (SuperLink)."
    )
    disconnected_at: datetime | None = Field(
        default=None, description="When it last went offline or left (SuperLink)."
    )
    online_until: datetime | None = Field(
        default=None, description="Its heartbeat deadline: offline if none comes by then."
    )


class NodesPublic(Paged):
    data: list[NodePublic]
    count: int
    stale_after_s: float
    superlink: str = Field(
        default="not configured",
        description="Whether ``status`` is live: ok, not configured, unreachable: <why>, or "
        "error: <why>. Only when ok are nodes listed that never took part in a round.",
    )


class StreamEnd(BaseModel):
    """The data of the last server-sent event, ``end``, sent once the experiment has finished."""

    status: ExperimentStatus | Literal["deleted"] = Field(
        description="The experiment's final status, or ``deleted`` if it was deleted meanwhile."
    )
    error: str | None = None


class NodeKeyCreate(BaseModel):
    """The body of ``POST /node-keys``: a SuperNode's public key to admit, and a name for it."""

    model_config = {"extra": "forbid"}

    name: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$",
        description="Who the node is (a site, a machine): letters, digits, '.', '_', '-', spaces.",
    )
    public_key: str = Field(
        max_length=4096,
        description="The node's OpenSSH public key line, as `florist node keygen` or "
        "`ssh-keygen -t ecdsa -b 384` writes it (`ecdsa-sha2-nistp384 AAAA…`).",
    )

    @field_validator("public_key")
    @classmethod
    def _a_key_flower_accepts(cls, value: str) -> str:
        return parse_node_public_key(value).openssh


class NodeKeyNode(BaseModel):
    """The SuperNode that authenticates with a key, as the SuperLink lists it now."""

    status: str = Field(
        description="The SuperLink's word: online (connected, heartbeating), offline (was "
        "connected, heartbeat lapsed), registered (never connected yet), unregistered."
    )
    connected_at: datetime | None = None
    disconnected_at: datetime | None = None


class NodeKeyPublic(BaseModel):
    """A registered key and the Flower node it admits."""

    id: int
    name: str
    fingerprint: str = Field(description="SHA256 of the key, as `ssh-keygen -l` prints it.")
    public_key: str
    node_id: str = Field(description="The Flower node id the key was registered as (uint64).")
    added_at: datetime
    node: NodeKeyNode | None = Field(
        default=None,
        description="The node as the SuperLink lists it; None when the SuperLink does not know "
        "the key (its state was lost) or could not be asked (see ``superlink``).",
    )


class NodeKeysPublic(BaseModel):
    data: list[NodeKeyPublic]
    count: int
    supernode_auth: bool = Field(
        description="Whether this server's SuperLink runs with SuperNode authentication "
        "(otherwise any SuperNode may connect, registered or not)."
    )
    superlink: str = Field(
        description="Whether ``node`` is live: ok, not configured, unreachable: <why>, or "
        "error: <why>."
    )
