"""Curriculum / ordered learning with client selection (Vahidian et al., ICCV 2023).

Each client scores its own examples with a fixed scorer, sorts them (easy first, hard first or at
random) and draws each minibatch from a growing prefix of that order, the pacing function g(t)
saying how much. The server can order clients the same way, by their mean example difficulty.

Paper: https://arxiv.org/abs/2212.12712 (When Do Curricula Work in Federated Learning?).

Variant followed: the paper's, with two scorers because no pretrained expert ships offline.
Local ordering: an example's difficulty is its loss under a model of the task's architecture
trained from a fixed seed on the client's own training data (never test data), out-of-fold: the
data is split in ``scorer_folds`` folds and each fold is scored by a model trained on the others,
so an example is never scored by a model that saw it. Client selection needs scores comparable
across clients, so it uses ONE common scorer: the global model of round ``warmup_rounds``. Every
warm-up round trains all offered nodes (so each node is scored by that same model), each node
reporting the mean loss of its training data under the model it received, measured before it
trains; those means, frozen, rank the nodes for the rest of the run. Per-client scorers are not
comparable: a client holding one label learns to predict it and looks "easy" whatever its data.
Pacing g(t) runs over global local-step time, with the paper's six families and parameters a
(share of training until all data is used) and b (starting share), over ``pacing_rounds`` rounds
(the run's length unless set).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.app import RecordDict as FlwrRecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from pydantic import Field
from torch import nn

from florist.client.task import PREFIX
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
from florist.datasets import XY

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs

log = logging.getLogger(__name__)

Pacing = Literal["linear", "quad", "root", "step", "exp", "log", "none"]
Ordering = Literal["curriculum", "anti", "random"]
Selection = Literal["all", "easy_first", "hard_first", "random"]

SCORES_KEY = "curriculum.scores"
DIFFICULTY_METRIC = "mean-difficulty"
COMMON_METRIC = "common-difficulty"
PACING_METRIC = "pacing-fraction"
SELECTED_METRIC = "selected-clients"
# The run length reaches the client half as its own config field: the task spec leaves out a None
# field (client/task.py's flatten) and the loop lets a strategy's task entry fill that gap.
PACING_ROUNDS_KEY = f"{PREFIX}.strategy.config.pacing-rounds"


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
        Fraction of the paced training after which all data is used (the paper's a).
    b : float, default 0.2
        Starting fraction (the paper's b).
    pacing_rounds : int or None, default None
        Number of server rounds the pacing spans: T = pacing_rounds × local steps per round.
        None paces over the whole run (the experiment's ``rounds``).
    scorer : {"loss"}, default "loss"
        Local difficulty of an example = its cross-entropy under a model of the same
        architecture trained, from a fixed seed, on the client's other folds only. Computed
        once per run per node; test data is never used.
    scorer_epochs : int, default 2
        Epochs each fold's scorer trains for.
    scorer_folds : int, default 2
        Folds of the out-of-fold local scores.
    client_selection : {"all", "easy_first", "hard_first", "random"}, default "all"
        "all" samples like FedAvg. Otherwise the first ``warmup_rounds`` rounds train every node
        and later rounds pick ``clients_per_round`` nodes from a pool of the easiest (hardest,
        a random fixed order of) nodes under the common scorer, see :func:`pool_size`.
    warmup_rounds : int, default 2
        Rounds before selection starts; the global model of the last one is the common scorer.
        2 is the fewest for which that model has been trained (by one FedAvg round).
    clients_per_round : int or None, default None
        Nodes per round when selection is on; None takes FedAvg's sample size.
    selection_pacing : same choices as ``pacing``, default "linear"
        Pacing family of the client pool, over the rounds after the warm-up.
    """

    ordering: Ordering = Field(default="curriculum", description="Local data order.")
    pacing: Pacing = Field(default="linear", description="Family of the data pacing g(t).")
    a: float = Field(default=0.8, gt=0, le=1, description="Share of training until all data.")
    b: float = Field(default=0.2, gt=0, le=1, description="Starting share of the data.")
    pacing_rounds: int | None = Field(
        default=None, ge=1, description="Rounds the pacing spans; None: the run's rounds."
    )
    scorer: Literal["loss"] = Field(default="loss", description="Local difficulty measure.")
    scorer_epochs: int = Field(default=2, ge=1, le=100, description="Epochs of the scorer.")
    scorer_folds: int = Field(
        default=2, ge=2, le=10, description="Folds of the out-of-fold local scores."
    )
    client_selection: Selection = Field(default="all", description="How nodes are chosen.")
    warmup_rounds: int = Field(
        default=2,
        ge=1,
        description="Rounds of all nodes before selection; the last one's model scores nodes.",
    )
    clients_per_round: int | None = Field(
        default=None, ge=1, description="Nodes per selected round; None: FedAvg's sample size."
    )
    selection_pacing: Pacing = Field(
        default="linear", description="Pacing family of the client pool."
    )


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


def pool_size(fraction: float, n: int, k: int) -> int:
    """Size of the pool ``k`` of ``n`` ranked nodes are drawn from: k + ⌈g·(n − k)⌉.

    The pacing share g applies to the n − k nodes beyond the k that must be picked anyway, so
    for n > k the pool always holds at least one more node than is picked and the chosen sets
    keep changing from round to round; sized ⌈g·n⌉, it would equal k (a forced choice of the
    same k nodes) for every round in which g·n ≤ k.
    """
    if n <= k:
        return n
    return k + prefix_size(fraction, n - k)


def rank_nodes(
    difficulty: dict[int, float],
    nodes: list[int],
    selection: Selection,
    tie_rank: dict[int, float],
) -> list[int]:
    """``nodes`` in selection order: ascending common difficulty for easy_first, descending for
    hard_first, ``tie_rank`` (a random number per node, fixed for the run) for random.

    Ties, and nodes with no known difficulty (ranked last), are ordered by ``tie_rank``, not by
    node id, so no node is favoured for its id.
    """

    def tie(n: int) -> float:
        return tie_rank.get(n, math.inf)

    known = [n for n in nodes if n in difficulty]
    unknown = sorted((n for n in nodes if n not in difficulty), key=lambda n: (tie(n), n))
    match selection:
        case "easy_first":
            ranked = sorted(known, key=lambda n: (difficulty[n], tie(n), n))
        case "hard_first":
            ranked = sorted(known, key=lambda n: (-difficulty[n], tie(n), n))
        case "random":
            ranked = sorted(known, key=lambda n: (tie(n), n))
        case _:
            raise ValueError(f"no ranking for selection {selection!r}")
    return ranked + unknown


def select_clients(ranked: list[int], k: int, fraction: float, rng: random.Random) -> list[int]:
    """``k`` nodes drawn uniformly from the first :func:`pool_size` of ``ranked``."""
    k = min(k, len(ranked))
    pool = ranked[: pool_size(fraction, len(ranked), k)]
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


def fold_ids(n: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Each of ``n`` examples' fold, 0..folds−1, in a random order with fold sizes within one."""
    return rng.permutation(n) % folds


def out_of_fold_scores(
    data: XY,
    folds: np.ndarray,
    fit: Callable[[XY], nn.Module],
    score: Callable[[nn.Module, XY], np.ndarray],
) -> np.ndarray:
    """Scores of ``data`` where fold f's examples are scored by ``fit`` on the other folds only."""
    scores = np.zeros(len(data), dtype=np.float64)
    for fold in np.unique(folds):
        held_out = folds == fold
        model = fit(XY(x=data.x[~held_out], y=data.y[~held_out]))
        scores[held_out] = score(model, XY(x=data.x[held_out], y=data.y[held_out]))
    return scores


def difficulty_scores(task: TrainTask[CurriculumConfig]) -> np.ndarray:
    """Each local example's loss under a scorer trained only on this client's OTHER folds.

    Out-of-fold, because a scorer's loss on the examples it was trained on measures what it
    memorised rather than how hard an example is. Each fold's scorer has the task model's
    architecture, is re-initialised from a fixed seed and trained for ``scorer_epochs`` with the
    client's SGD settings; the global torch RNG is forked so scoring never changes what the real
    training draws. With fewer than two examples there is nothing to order: all scores are 0.
    """
    n = len(task.data)
    folds = min(task.config.scorer_folds, n)
    if folds < 2:
        return np.zeros(n, dtype=np.float64)
    training = task.training.model_copy(
        update={"local_epochs": task.config.scorer_epochs, "local_steps": None}
    )

    def fit(data: XY) -> nn.Module:
        torch.manual_seed(task.seed)
        scorer = copy.deepcopy(task.model)
        _reset_parameters(scorer)
        # Round 0 gives the scorer its own batch generator, distinct from every training round's.
        train_sgd(
            TrainTask(
                model=scorer,
                data=data,
                training=training,
                config=task.config,
                server_round=0,
                seed=task.seed,
                device=task.device,
            )
        )
        return scorer

    devices = [task.device] if task.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        ids = fold_ids(n, folds, np.random.default_rng(task.seed))
        return out_of_fold_scores(
            task.data, ids, fit, lambda model, data: example_losses(model, data, task.device)
        )


def common_difficulty(model: nn.Module, data: XY, device: torch.device) -> float:
    """Mean loss of ``data`` under ``model`` (the round's global model, shared by every node),
    leaving the model in training mode for the local steps that follow."""
    mean = float(example_losses(model, data, device).mean())
    model.train()
    return mean


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
        self.common: float | None = None
        self.fractions: list[float] = []

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        cfg = self.config
        if cfg.client_selection != "all":
            # Before any local step: ``model`` is still the global model every node received.
            # One forward pass, so every round reports it; the server ranks by round W's only.
            self.common = common_difficulty(model, task.data, task.device)
        self.scores = cached_scores(task)
        steps_per_round = num_local_steps(task.training, len(task.data))
        if cfg.pacing == "none":
            self.fractions = [1.0] * steps_per_round
            return
        if cfg.pacing_rounds is None:
            raise ValueError(
                "pacing_rounds is unknown: the server half sends the run's rounds with each task"
            )
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
        metrics = {DIFFICULTY_METRIC: float(self.scores.mean()), PACING_METRIC: self.fractions[-1]}
        if self.common is not None:
            metrics[COMMON_METRIC] = self.common
        return metrics


def train(task: TrainTask[CurriculumConfig]) -> TrainResult:
    """Local SGD whose minibatches come from the paced prefix of the ordered local data."""
    return train_local(task, CurriculumHooks(task.config))


# --- server half ----------------------------------------------------------------------------


class CurriculumFedAvg(FedAvg):
    """FedAvg whose nodes are chosen by their difficulty under one common scorer (Vahidian et
    al., 2023).

    Rounds 1..W (W = ``warmup_rounds``) train every offered node. Each node reports the mean
    loss of its training data under the global model it received, x^W in round W, measured
    before training: one model scores every node, so the scores are comparable, and it was
    trained on training data only. Those scores, frozen (the paper's scorer is fixed), rank the
    nodes from round W + 1 on; a node with no round-W score (absent or failed then) ranks last.
    Each later round draws k nodes uniformly from a pool of the first k + ⌈g·(N − k)⌉ ranked
    ones (:func:`pool_size`), g paced over the rounds after the warm-up, so the pool always
    exceeds k and the chosen sets vary. Warm-up rounds train all nodes rather than a random k
    so that every node is scored by the same model x^W.

    Parameters
    ----------
    client_selection : {"all", "easy_first", "hard_first", "random"}, default "all"
        "all" keeps FedAvg's sampling (no warm-up); see :class:`CurriculumConfig`.
    clients_per_round : int or None, default None
        k, nodes per round once selection starts; None takes FedAvg's sample size.
    selection_pacing : pacing family, default "linear"
        How the pool grows, reaching all N nodes after a share a of the post-warm-up rounds.
    a, b : float, defaults 0.8 and 0.2
        Pacing parameters of the pool.
    pacing_rounds : int, default 10
        T, in rounds (``build_server`` passes the run's rounds unless the config sets it); the
        pool's pacing spans T − W rounds. Sent to the clients for their data pacing.
    warmup_rounds : int, default 2
        W.
    seed : int or None, default None
        Seeds the tie ranks and the draws from the pool; None draws them from system entropy.
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
        warmup_rounds: int = 2,
        seed: int | None = None,
        **kwargs: float | int,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.client_selection: Selection = client_selection
        self.clients_per_round = clients_per_round
        self.selection_pacing: Pacing = selection_pacing
        self.a, self.b, self.pacing_rounds = a, b, pacing_rounds
        self.warmup_rounds = warmup_rounds
        self.rng = random.Random(seed)
        # node id -> mean loss of its data under the common scorer (round W's global model)
        self.difficulty: dict[int, float] = {}
        self.ranking: dict[int, list[int]] = {}
        self.selected: dict[int, list[int]] = {}
        self._tie_rank: dict[int, float] = {}

    def selection_fraction(self, server_round: int) -> float:
        """g of the pool in ``server_round``: t = rounds since the warm-up, T = the rest."""
        span = max(self.pacing_rounds - self.warmup_rounds, 1)
        t = server_round - self.warmup_rounds - 1
        return pacing_fraction(self.selection_pacing, t, span, self.a, self.b)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[PACING_ROUNDS_KEY] = self.pacing_rounds
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
            if server_round <= self.warmup_rounds:
                chosen = nodes
            else:
                for node in nodes:
                    self._tie_rank.setdefault(node, self.rng.random())
                ranked = rank_nodes(self.difficulty, nodes, self.client_selection, self._tie_rank)
                self.ranking[server_round] = ranked
                fraction = self.selection_fraction(server_round)
                chosen = select_clients(ranked, wanted, fraction, self.rng)
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
        if self.client_selection != "all" and server_round == self.warmup_rounds:
            for msg in replies:
                if msg.has_error():
                    continue
                for record in msg.content.metric_records.values():
                    value = record.get(COMMON_METRIC)
                    if isinstance(value, int | float) and math.isfinite(value):
                        self.difficulty[msg.metadata.src_node_id] = float(value)
            if not self.difficulty:
                log.warning("round %d: no node reported its common difficulty", server_round)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            metrics[SELECTED_METRIC] = len(self.selected.get(server_round, []))
        return arrays, metrics


def build_server(config: CurriculumConfig, setup: ServerSetup) -> CurriculumFedAvg:
    if config.client_selection != "all" and config.warmup_rounds >= setup.num_rounds:
        log.warning(
            "warmup_rounds %d ≥ rounds %d: every round trains all nodes, none is selected",
            config.warmup_rounds,
            setup.num_rounds,
        )
    return CurriculumFedAvg(
        client_selection=config.client_selection,
        clients_per_round=config.clients_per_round,
        selection_pacing=config.selection_pacing,
        a=config.a,
        b=config.b,
        pacing_rounds=config.pacing_rounds or setup.num_rounds,
        warmup_rounds=config.warmup_rounds,
        **sampling_kwargs(setup),  # type: ignore[arg-type]
    )


plugin = StrategyPlugin(
    name="curriculum",
    summary=(
        "Curriculum learning: clients train on a paced prefix of their data sorted by an "
        "out-of-fold scorer's loss; optionally the server selects clients easy- or hard-first "
        "by their loss under one common model (the global model after a warm-up)."
    ),
    config_model=CurriculumConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/2212.12712",
    tags=("sync",),
)
