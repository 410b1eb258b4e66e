"""Curriculum / ordered learning with client selection (Vahidian et al., ICCV 2023).

Each client scores its own examples with a fixed scorer, sorts them (easy first, hard first or at
random) and draws each minibatch from a growing prefix of that order, the pacing function g(t)
saying how much. The server can order clients the same way, by their mean example difficulty.

Paper: https://arxiv.org/abs/2212.12712 (When Do Curricula Work in Federated Learning?).

Variant followed: the paper's. Its scorer is a fixed "expert" model's per-example loss; no
pretrained expert ships offline, so each client's expert is a model of the task's architecture
trained from a fixed seed on that client's own training data only (never test data) and then
frozen, computed once per run. Pacing g(t) runs over global local-step time, with the paper's
six families and parameters a (share of training until all data is used) and b (starting
share). Client selection ranks nodes by the mean difficulty they report (easy first, hard first
or a fixed random order) and draws each round from a pool that the selection pacing grows from
⌈b·N⌉ nodes to all N; round 1 trains every node so that each has a score.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.app import RecordDict as FlwrRecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from pydantic import Field
from torch import nn

from florist.client.training import (
    Batch,
    RunningMetrics,
    TrainerHooks,
    TrainResult,
    TrainTask,
    local_minibatches,
    num_local_steps,
    round_seed,
    train_local,
    train_sgd,
)

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs

if TYPE_CHECKING:
    from florist.datasets import XY

log = logging.getLogger(__name__)

Pacing = Literal["linear", "quad", "root", "step", "exp", "log", "none"]
Ordering = Literal["curriculum", "anti", "random"]
Selection = Literal["all", "easy_first", "hard_first", "random"]

SCORES_KEY = "curriculum.scores"
DIFFICULTY_METRIC = "mean-difficulty"
PACING_METRIC = "pacing-fraction"
SELECTED_METRIC = "selected-clients"


class CurriculumConfig(StrategyConfig):
    """Ordered local training and difficulty-paced client selection.

    Parameters
    ----------
    ordering : {"curriculum", "anti", "random"}, default "curriculum"
        Local data order: easy→hard, hard→easy, or a random permutation fixed for the run.
    pacing : {"linear", "quad", "root", "step", "exp", "log", "none"}, default "linear"
        The family of g(t), the share of the ordered local data minibatches are drawn from;
        "none" uses all data all the time (see :func:`pacing_fraction`).
    a : float, default 0.8
        Fraction of the paced training after which all data is used.
    b : float, default 0.2
        Starting fraction.
    pacing_rounds : int, default 10
        Number of server rounds the pacing spans: T = pacing_rounds × local steps per round.
        Set it to the experiment's ``rounds`` to pace over the whole training.
    scorer : {"loss"}, default "loss"
        Difficulty of an example = its cross-entropy under a scorer: a model of the same
        architecture trained only on the client's own training data from a fixed seed, then
        frozen. Computed once per run per node; test data is never used.
    scorer_epochs : int, default 2
        Epochs the scorer trains for.
    client_selection : {"all", "easy_first", "hard_first", "random"}, default "all"
        "all" samples like FedAvg. Otherwise round 1 trains every node (so each reports its
        mean difficulty) and later rounds pick ``clients_per_round`` nodes from a pool that
        grows, by ``selection_pacing`` over rounds, from the easiest (hardest, a random fixed
        order of) ⌈b·N⌉ nodes to all N.
    clients_per_round : int or None, default None
        Nodes per round when selection is on; None takes FedAvg's sample size.
    selection_pacing : same choices as ``pacing``, default "linear"
        Pacing family of the client pool, with t = round − 1 and T = ``pacing_rounds``.
    """

    ordering: Ordering = "curriculum"
    pacing: Pacing = "linear"
    a: float = Field(default=0.8, gt=0, le=1, description="Share of training until all data.")
    b: float = Field(default=0.2, gt=0, le=1, description="Starting share of the data.")
    pacing_rounds: int = Field(default=10, ge=1, description="Rounds the pacing spans.")
    scorer: Literal["loss"] = "loss"
    scorer_epochs: int = Field(default=2, ge=1, le=100, description="Epochs of the scorer.")
    client_selection: Selection = "all"
    clients_per_round: int | None = Field(default=None, ge=1)
    selection_pacing: Pacing = "linear"


# --- pure functions -------------------------------------------------------------------------


def pacing_fraction(kind: Pacing, t: float, T: float, a: float, b: float) -> float:
    """g(t): the share of the ordered data in use at step ``t`` of ``T``.

    With s = min(t / (a·T), 1), the progress towards the point where all data is used:

    - linear: b + (1−b)·s
    - quad:   b + (1−b)·s²
    - root:   b + (1−b)·√s
    - step:   b while s < 1, then 1 (one step, at t = a·T; no staircase)
    - exp:    b + (1−b)·(e^{10s} − 1)/(e^{10} − 1)
    - log:    b + (1−b)·(1 + 0.1·ln(s + e^{−10}))
    - none:   1 (all data all the time)

    Every family starts at b (t = 0), is non-decreasing in t, lies in [b, 1] and is 1 for
    t ≥ a·T.
    """
    if kind == "none":
        return 1.0
    if not (0 < a <= 1 and 0 < b <= 1 and T > 0):
        raise ValueError(f"need 0 < a, b <= 1 and T > 0 (got a={a}, b={b}, T={T})")
    s = min(max(t, 0.0) / (a * T), 1.0)
    if s >= 1.0:
        return 1.0
    match kind:
        case "linear":
            progress = s
        case "quad":
            progress = s * s
        case "root":
            progress = math.sqrt(s)
        case "step":
            progress = 0.0
        case "exp":
            progress = math.expm1(10 * s) / math.expm1(10)
        case "log":
            progress = 1 + 0.1 * math.log(s + math.exp(-10))
        case _:
            raise ValueError(f"unknown pacing {kind!r}")
    return min(max(b + (1 - b) * progress, b), 1.0)


def order_indices(scores: np.ndarray, ordering: Ordering, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``scores`` in training order: ascending (curriculum), descending (anti) or a
    random permutation. Ties keep index order, so the order is deterministic."""
    scores = np.asarray(scores)
    match ordering:
        case "curriculum":
            return np.argsort(scores, kind="stable")
        case "anti":
            return np.argsort(-scores, kind="stable")
        case "random":
            return rng.permutation(len(scores))
        case _:
            raise ValueError(f"unknown ordering {ordering!r}")


def prefix_size(fraction: float, n: int) -> int:
    """⌈g·n⌉ examples, at least one (for n > 0)."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def sample_prefix_batch(
    order: np.ndarray, fraction: float, batch_size: int, generator: torch.Generator
) -> np.ndarray:
    """One minibatch drawn uniformly without replacement from the first ⌈g·n⌉ of ``order``."""
    m = prefix_size(fraction, len(order))
    pick = torch.randperm(m, generator=generator)[: min(batch_size, m)].numpy()
    return order[pick]


def select_clients(
    difficulty: dict[int, float],
    nodes: list[int],
    selection: Selection,
    k: int,
    fraction: float,
    rng: random.Random,
    random_rank: dict[int, float] | None = None,
) -> list[int]:
    """``k`` of ``nodes`` drawn from the eligible pool: the first max(⌈g·N⌉, k) nodes ranked
    by ``selection`` (ascending mean difficulty for easy_first, descending for hard_first,
    ``random_rank`` for random). Nodes with no known difficulty rank last in every order."""
    known = [n for n in nodes if n in difficulty]
    unknown = sorted(n for n in nodes if n not in difficulty)
    match selection:
        case "easy_first":
            ranked = sorted(known, key=lambda n: (difficulty[n], n))
        case "hard_first":
            ranked = sorted(known, key=lambda n: (-difficulty[n], n))
        case "random":
            rank = random_rank or {}
            ranked = sorted(known, key=lambda n: (rank.get(n, math.inf), n))
        case _:
            raise ValueError(f"no ranking for selection {selection!r}")
    ranked += unknown
    k = min(k, len(ranked))
    pool = ranked[: max(prefix_size(fraction, len(ranked)), k)]
    return sorted(rng.sample(pool, k))


# --- client half ----------------------------------------------------------------------------


def _reset_parameters(model: nn.Module) -> None:
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


@torch.no_grad()
def example_losses(model: nn.Module, data: XY, device: torch.device) -> np.ndarray:
    """Per-example cross-entropy of ``model`` on ``data`` (float64, shape (n,))."""
    model.eval()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    losses = []
    for start in range(0, len(y), 512):
        logits = model(x[start : start + 512].to(device))
        loss = nn.functional.cross_entropy(
            logits, y[start : start + 512].to(device), reduction="none"
        )
        losses.append(loss.cpu().numpy())
    return np.concatenate(losses).astype(np.float64) if losses else np.zeros(0)


def difficulty_scores(task: TrainTask[CurriculumConfig]) -> np.ndarray:
    """Each local example's loss under a scorer trained only on this client's training data.

    The scorer has the task model's architecture, is re-initialised from a fixed seed and
    trained for ``scorer_epochs`` with the client's SGD settings; the global torch RNG is forked
    so scoring never changes what the real training draws.
    """
    devices = [task.device] if task.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(task.seed)
        scorer = copy.deepcopy(task.model)
        _reset_parameters(scorer)
        training = task.training.model_copy(
            update={"local_epochs": task.config.scorer_epochs, "local_steps": None}
        )
        # Round 0 gives the scorer its own batch generator, distinct from every training round's.
        train_sgd(
            TrainTask(
                model=scorer,
                data=task.data,
                training=training,
                config=task.config,
                server_round=0,
                seed=task.seed,
                device=task.device,
            )
        )
        return example_losses(scorer, task.data, task.device)


def cached_scores(task: TrainTask[CurriculumConfig]) -> np.ndarray:
    """The difficulty scores, computed on this node's first round of the run and kept in
    ``task.state`` (Flower's Context.state) for the later ones."""
    record = task.state.array_records.get(SCORES_KEY)
    if record is not None:
        scores = record["scores"].numpy()
        if len(scores) == len(task.data):
            return scores
    scores = difficulty_scores(task)
    task.state[SCORES_KEY] = ArrayRecord({"scores": Array(scores)})
    return scores


class CurriculumHooks(TrainerHooks):
    """Minibatches from the paced prefix of the local data ordered by difficulty.

    Step k of round r is global step t = (r−1)·K + k, K the local steps per round, so the
    schedule follows the federation's clock (a node skipped by client selection does not fall
    behind) and T = ``pacing_rounds``·K. When g = 1 for the whole round the order cannot matter,
    and the round draws FedAvg's batches exactly.
    """

    def __init__(self, config: CurriculumConfig) -> None:
        self.config = config
        self.scores = np.zeros(0)
        self.fractions: list[float] = []

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        cfg = self.config
        self.scores = cached_scores(task)
        steps_per_round = num_local_steps(task.training, len(task.data))
        start = (max(task.server_round, 1) - 1) * steps_per_round
        total = cfg.pacing_rounds * steps_per_round
        self.fractions = [
            pacing_fraction(cfg.pacing, start + k, total, cfg.a, cfg.b)
            for k in range(steps_per_round)
        ]

    def minibatches(self, task: TrainTask[Any]) -> Iterable[Batch]:
        if min(self.fractions) >= 1.0:
            return local_minibatches(task)
        return self._paced(task)

    def _paced(self, task: TrainTask[Any]) -> Iterator[Batch]:
        # The random order is drawn once per run, so its growing prefix is one fixed random subset.
        order = order_indices(self.scores, self.config.ordering, np.random.default_rng(task.seed))
        generator = torch.Generator().manual_seed(round_seed(task))
        x, y = torch.from_numpy(task.data.x), torch.from_numpy(task.data.y)
        for fraction in self.fractions:
            idx = torch.from_numpy(
                sample_prefix_batch(order, fraction, task.training.batch_size, generator)
            )
            yield x[idx].to(task.device), y[idx].to(task.device)

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        return {DIFFICULTY_METRIC: float(self.scores.mean()), PACING_METRIC: self.fractions[-1]}


def train(task: TrainTask[CurriculumConfig]) -> TrainResult:
    """Local SGD whose minibatches come from the paced prefix of the ordered local data."""
    return train_local(task, CurriculumHooks(task.config))


# --- server half ----------------------------------------------------------------------------


class CurriculumFedAvg(FedAvg):
    """FedAvg whose nodes are chosen by their reported mean difficulty (Vahidian et al., 2023).

    Parameters
    ----------
    client_selection : {"all", "easy_first", "hard_first", "random"}, default "all"
        "all" keeps FedAvg's sampling; see :class:`CurriculumConfig` for the others.
    clients_per_round : int or None, default None
        Nodes per round once selection starts; None takes FedAvg's sample size.
    selection_pacing : pacing family, default "linear"
        How the eligible pool grows over rounds, from ⌈b·N⌉ nodes to N by round a·T + 1.
    a, b : float, defaults 0.8 and 0.2
        Pacing parameters of the pool.
    pacing_rounds : int, default 10
        T, in rounds.
    **kwargs
        FedAvg's sampling arguments.
    """

    def __init__(
        self,
        *,
        client_selection: Selection = "all",
        clients_per_round: int | None = None,
        selection_pacing: Pacing = "linear",
        a: float = 0.8,
        b: float = 0.2,
        pacing_rounds: int = 10,
        **kwargs: float | int,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.client_selection: Selection = client_selection
        self.clients_per_round = clients_per_round
        self.selection_pacing: Pacing = selection_pacing
        self.a, self.b, self.pacing_rounds = a, b, pacing_rounds
        # node id -> mean difficulty, as last reported
        self.difficulty: dict[int, float] = {}
        self.selected: dict[int, list[int]] = {}
        self._random_rank: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.client_selection == "all" or self.fraction_train == 0.0:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            nodes = sorted(grid.get_node_ids())
            wanted = self.clients_per_round or max(
                int(len(nodes) * self.fraction_train), self.min_train_nodes
            )
            # Flower waits here until enough nodes are connected.
            _, available = sample_nodes(grid, self.min_available_nodes, min(wanted, len(nodes)))
            nodes = sorted(available)
            if not self.difficulty:
                chosen = nodes  # nobody has reported a difficulty yet: everyone does now
            else:
                for node in nodes:
                    self._random_rank.setdefault(node, random.random())
                fraction = pacing_fraction(
                    self.selection_pacing, server_round - 1, self.pacing_rounds, self.a, self.b
                )
                chosen = select_clients(
                    self.difficulty,
                    nodes,
                    self.client_selection,
                    wanted,
                    fraction,
                    random.Random(random.random()),
                    self._random_rank,
                )
            config["server-round"] = server_round
            record = FlwrRecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            messages = list(self._construct_messages(record, chosen, MessageType.TRAIN))
        self.selected[server_round] = sorted(m.metadata.dst_node_id for m in messages)
        log.info("round %d: training on nodes %s", server_round, self.selected[server_round])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            for record in msg.content.metric_records.values():
                value = record.get(DIFFICULTY_METRIC)
                if isinstance(value, int | float) and math.isfinite(value):
                    self.difficulty[msg.metadata.src_node_id] = float(value)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            metrics[SELECTED_METRIC] = len(self.selected.get(server_round, []))
        return arrays, metrics


def build_server(config: CurriculumConfig, setup: ServerSetup) -> CurriculumFedAvg:
    return CurriculumFedAvg(
        client_selection=config.client_selection,
        clients_per_round=config.clients_per_round,
        selection_pacing=config.selection_pacing,
        a=config.a,
        b=config.b,
        pacing_rounds=config.pacing_rounds,
        **sampling_kwargs(setup),
    )


plugin = StrategyPlugin(
    name="curriculum",
    summary=(
        "Curriculum learning: clients train on a paced prefix of their data sorted by a "
        "fixed scorer's loss; optionally the server selects clients easy- or hard-first."
    ),
    config_model=CurriculumConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/2212.12712",
    tags=("sync",),
)
