"""The experiment spec: what a user submits, validated once at the edge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from florist.client.plugins import PluginRegistryError
from florist.client.task import StrategyRef, TaskSpec, WorkloadRef
from florist.client.workloads import (
    WorkloadConfig,
    WorkloadPlugin,
    WorkloadRegistry,
    default_workloads,
)
from florist.server.recording.artifacts import CheckpointPolicy
from florist.strategies import (
    ServerSetup,
    StrategyConfig,
    StrategyPlugin,
    StrategyRegistry,
    default_registry,
)
from florist.strategies.events import DropoutPolicy
from florist.strategies.validation import ReplyChecks


class ClientsConfig(BaseModel):
    """Which SuperNodes take part in each round."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    min: int = Field(default=2, ge=1, le=100_000, description="Nodes needed before a round starts.")
    fraction_train: float = Field(default=1.0, gt=0, le=1, description="Share of nodes sampled.")
    fraction_evaluate: float = Field(
        default=0.0, ge=0, le=1, description="Share of nodes for federated evaluation (0: none)."
    )
    # Simulation mode only (docs/simulation.md); left out of a deployment spec's dump, so that
    # stored deployment specs read exactly as before.
    virtual: int | None = Field(
        default=None,
        ge=1,
        description="Simulation mode: how many virtual clients Flower's Simulation Engine "
        "holds (at most FLORIST_SIMULATION_MAX_VIRTUAL_CLIENTS).",
        exclude_if=lambda value: value is None,
    )
    per_round: int | None = Field(
        default=None,
        ge=1,
        description="Simulation mode: virtual clients sampled each round (at most `virtual`).",
        exclude_if=lambda value: value is None,
    )
    profiles: dict[str, float] | None = Field(
        default=None,
        description="Simulation mode: the device-profile mix virtual clients are drawn from, "
        "profile name → weight (fast, normal, slow, flaky, neutral); each virtual client gets "
        "one, fixed by the experiment's seed and its partition id. Default: fast, normal and "
        "slow alike, as `florist up` gives its SuperNodes.",
        exclude_if=lambda value: value is None,
    )


class ExperimentSpec(TaskSpec):
    """A whole experiment: the clients' task plus how the server runs it."""

    name: str = Field(min_length=1, max_length=200, examples=["digits-fedavg"])
    rounds: int = Field(ge=1, le=100_000)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    round_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="How long a round (or, on the event runtime, one task) waits for its reply.",
    )
    mode: Literal["deployment", "simulation"] = Field(
        default="deployment",
        description="deployment: the SuperLink's real SuperNodes train; simulation: "
        "`clients.virtual` virtual clients on Flower's Simulation Engine (Ray), "
        "`clients.per_round` of them each round, no SuperNodes needed.",
        exclude_if=lambda value: value == "deployment",
    )
    runtime: Literal["flower", "event"] | None = Field(
        default=None,
        deprecated=True,
        description="Ignored, kept so that earlier experiments still load: every strategy, "
        "Flower's included, runs on Florist's one loop.",
    )
    time_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="Stop at the first aggregation after this many seconds on the experiment's "
        "clock; `rounds` (aggregations) stays an upper bound.",
    )
    checkpoints: CheckpointPolicy = Field(
        default_factory=CheckpointPolicy,
        description="Which rounds' global models are kept (GET /experiments/{id}/model); the "
        "latest is always kept.",
    )
    dropout: DropoutPolicy = Field(
        default_factory=DropoutPolicy,
        description="Synchronous rounds: deadline, quorum, over-commitment and late updates. "
        "The default waits for every sampled node, as Flower's FedAvg does.",
    )

    reply_checks: ReplyChecks = Field(
        default_factory=ReplyChecks,
        description="What a client's reply must satisfy to reach the strategy: besides the "
        "fixed checks (records, array keys, shapes and dtypes, finite values and metrics), "
        "a bound on the update's L2 norm and a cap on its example count. A reply that fails "
        "is recorded as rejected with its reason.",
    )

    def task(self) -> TaskSpec:
        """The part every client message carries."""
        return TaskSpec.model_validate(self.model_dump(include=set(TaskSpec.model_fields)))


class StrategySpecError(ValueError):
    """The strategy or workload name or its config is wrong; ``errors`` are pydantic-style, with
    locs under the experiment spec."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def resolve_strategy(
    ref: StrategyRef, registry: StrategyRegistry | None = None
) -> tuple[StrategyPlugin, StrategyConfig]:
    """The plugin and its validated config; errors carry locs like ('strategy', 'config', 'x')."""
    registry = registry or default_registry()
    try:
        plugin = registry.get(ref.name)
    except PluginRegistryError as exc:
        raise StrategySpecError(
            [{"loc": ("strategy", "name"), "msg": str(exc), "type": "unknown_strategy"}]
        ) from exc
    return plugin, _parse(plugin.parse_config, ref.config, "strategy")


def resolve_workload(
    ref: WorkloadRef, registry: WorkloadRegistry | None = None
) -> tuple[WorkloadPlugin, WorkloadConfig]:
    """The workload plugin and its validated config; errors carry locs like
    ('workload', 'config', 'model', 'name')."""
    registry = registry or default_workloads()
    try:
        plugin = registry.get(ref.name)
    except PluginRegistryError as exc:
        raise StrategySpecError(
            [{"loc": ("workload", "name"), "msg": str(exc), "type": "unknown_workload"}]
        ) from exc
    return plugin, _parse(plugin.parse_config, ref.config, "workload")


def _parse(parse: Callable[[Any], Any], raw: dict[str, Any], field: str) -> Any:
    try:
        return parse(raw)
    except ValidationError as exc:
        errors = [
            {"loc": (field, "config", *err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_context=False)
        ]
        raise StrategySpecError(errors) from exc


def server_setup(spec: ExperimentSpec) -> ServerSetup:
    """What a server half gets besides its config: the experiment's sampling settings.

    In simulation mode ``per_round`` of the ``virtual`` clients take part in each round:
    Flower's rule (``max(int(fraction · nodes), min)``) then samples exactly ``per_round``.
    """
    clients = spec.clients
    if spec.mode == "simulation" and clients.virtual and clients.per_round:
        return ServerSetup(
            num_rounds=spec.rounds,
            min_clients=clients.per_round,
            fraction_train=clients.per_round / clients.virtual,
            fraction_evaluate=min(clients.fraction_evaluate, clients.per_round / clients.virtual),
        )
    return ServerSetup(
        num_rounds=spec.rounds,
        min_clients=clients.min,
        fraction_train=clients.fraction_train,
        fraction_evaluate=clients.fraction_evaluate,
    )


def experiment_row(spec: ExperimentSpec) -> dict[str, Any]:
    """The columns of a new ``experiments`` row for ``spec`` (``repository.create_experiment``)."""
    return {
        "name": spec.name,
        "strategy": spec.strategy.name,
        # The column predates workloads: it names the workload.
        "dataset": spec.workload_ref.name,
        "num_rounds": spec.rounds,
        "spec": spec.model_dump(mode="json"),
    }
