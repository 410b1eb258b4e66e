"""Flower's message-API strategies on Florist's one loop: their hooks drive a round's maths.

Any ``flwr.serverapp.strategy.Strategy`` (Flower's FedAvg, FedProx, FedAdam, Krum…, or a third
party's) becomes a :class:`~florist.strategies.rounds.RoundAggregator`: ``configure_train``
picks a round's nodes (and any extra task config, e.g. FedProx's ``proximal-mu``),
``aggregate_train`` computes the new model from the round's sound updates, and
``configure_evaluate`` / ``aggregate_evaluate`` run federated evaluation. Timing, the dropout
policy, the clocks and the time budget are the loop's, as for every other plugin. A strategy's
``start`` loop is never used, and so neither are its ``evaluate_fn`` nor the arrays it puts in a
message: every node is sent the current global model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.supercore.run import Run

from florist.client.protocol import TrainInstruction

from .events import Arrival, ConfigValue, Evaluation, EventStrategy, NodeConfig, Weights
from .rounds import AggregationError, RoundAggregator, SyncRounds
from .streaming import RunningSum
from .validation import WEIGHT_KEY, common_metric_keys

log = logging.getLogger(__name__)

# Flower puts the round into every task itself; the loop's instruction does that for all plugins.
_LOOP_KEYS = frozenset(TrainInstruction.key(name) for name in TrainInstruction.model_fields)


_MAX_LOOKS = 10

# Flower strategies whose model is FedAvg's example-weighted mean of the replies: as they are
# (FedAvg, FedProx) or then post-processed by a server optimiser (the FedOpt family, FedAvgM),
# which calls FedAvg's aggregate_train on the replies first. Exact types only: a subclass may
# aggregate otherwise, and then it gets every reply as before.
_MEAN_ONLY = (FedAvg, FedProx)
_MEAN_THEN_SERVER_STEP = (FedAvgM, FedAdagrad, FedAdam, FedYogi)


class TooFewNodes(Exception):
    """The strategy waits for more nodes than it was offered (Flower's ``sample_nodes``)."""


class NodeList(Grid):
    """The Grid a strategy's ``configure_*`` hook sees: only the nodes it may pick from.

    Flower's sampling waits, one second at a time, until enough nodes are connected; offered a
    fixed list, a strategy asking for more would wait forever. Flower's FedAvg looks twice per
    hook; the tenth look in one hook (about ten seconds of such waiting) refuses.
    """

    def __init__(self, nodes: Sequence[int]) -> None:
        self._nodes = list(nodes)
        self._looks = 0

    def get_node_ids(self) -> Iterable[int]:
        self._looks += 1
        if self._looks >= _MAX_LOOKS:
            raise TooFewNodes(f"only {len(self._nodes)} nodes to pick from")
        return list(self._nodes)

    def set_run(self, run: Run) -> None:
        raise NotImplementedError("a strategy hook cannot change the run")

    @property
    def run(self) -> Run:
        raise NotImplementedError("a strategy hook has no run")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return Message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("Florist's loop sends the messages, not the strategy")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("Florist's loop pulls the replies, not the strategy")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError("Florist's loop sends the messages, not the strategy")


def to_record(weights: Weights) -> ArrayRecord:
    """Numpy weights as an ArrayRecord with their original keys (state_dict order kept)."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()})


def _task_config(message: Message) -> NodeConfig:
    records = list(message.content.config_records.values())
    if not records:
        return {}
    out: dict[str, ConfigValue] = {}
    for key, value in records[0].items():
        if key not in _LOOP_KEYS and isinstance(value, int | float | str | bool):
            out[key] = value
    return out


def _reply(node_id: int, message_type: str, content: RecordDict) -> Message:
    """A reply as Flower's hooks expect one: from ``node_id``, carrying ``content``."""
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=message_type)
    return Message(content, reply_to=request)


def _numbers(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def _shared_metrics(server_round: int, metrics: list[Mapping[str, float]]) -> set[str]:
    shared = common_metric_keys(metrics)
    dropped = sorted({k for m in metrics for k in m} - shared)
    if dropped:
        log.warning(
            "round %d: metrics not reported by every node left out: %s", server_round, dropped
        )
    return shared


def _only(metrics: Mapping[str, float], keys: set[str]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in keys and k != WEIGHT_KEY}


class FlowerAggregator(RoundAggregator):
    """A Flower ``Strategy``'s ``configure_*`` / ``aggregate_*`` hooks as a round's maths."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    @property
    def needs_all_updates(self) -> bool:
        kind = type(self.strategy)
        if kind not in (*_MEAN_ONLY, *_MEAN_THEN_SERVER_STEP):
            return True
        return getattr(self.strategy, "weighted_by_key", None) != WEIGHT_KEY

    def finish(
        self, server_round: int, weights: Weights, total: RunningSum, updates: Sequence[Arrival]
    ) -> tuple[Weights | None, dict[str, float]]:
        """The round's mean from the running sum; metrics by the strategy's own metric rule.

        FedAvg and FedProx: the mean is the new model. The FedOpt family and FedAvgM: their
        ``aggregate_train`` is handed one reply, the mean with the updates' total weight, whose
        FedAvg mean is itself (a weight factor of exactly 1), and applies its server step.
        """
        dtypes = {k: v.dtype for k, v in weights.items()}
        if type(self.strategy) in _MEAN_ONLY:
            mean = total.mean(dtypes)
            metrics = self._train_metrics(server_round, updates)
            return mean, metrics
        weight = total.total
        mean = total.mean(dtypes)
        metrics = self._train_metrics(server_round, updates)
        reply = _reply(
            min(u.node_id for u in updates),
            MessageType.TRAIN,
            RecordDict(
                {
                    "arrays": to_record(mean),
                    "metrics": MetricRecord({**metrics, WEIGHT_KEY: weight}),
                }
            ),
        )
        del mean
        arrays, out = self.strategy.aggregate_train(server_round, [reply])
        if arrays is None:
            return None, _numbers(out)
        new = {k: v.numpy().astype(weights[k].dtype, copy=False) for k, v in arrays.items()}
        return new, _numbers(out)

    def _train_metrics(self, server_round: int, updates: Sequence[Arrival]) -> dict[str, float]:
        """The round's train metrics by the strategy's own rule, from the metrics alone."""
        shared = _shared_metrics(server_round, [u.metrics for u in updates])
        records = [
            RecordDict(
                {"metrics": MetricRecord({**_only(u.metrics, shared), WEIGHT_KEY: u.num_examples})}
            )
            for u in updates
        ]
        rule = self.strategy.train_metrics_aggr_fn  # type: ignore[attr-defined]
        return _numbers(rule(records, WEIGHT_KEY))

    def _min_nodes(self) -> int:
        return int(getattr(self.strategy, "min_available_nodes", 0) or 0)

    def select(
        self, server_round: int, weights: Weights, nodes: Sequence[int]
    ) -> dict[int, NodeConfig]:
        if len(nodes) < self._min_nodes():
            raise AggregationError(
                f"{type(self.strategy).__name__} needs {self._min_nodes()} nodes, "
                f"{len(nodes)} take part"
            )
        try:
            messages = self.strategy.configure_train(
                server_round, to_record(weights), ConfigRecord(), NodeList(nodes)
            )
            return {m.metadata.dst_node_id: _task_config(m) for m in messages}
        except TooFewNodes as exc:
            raise AggregationError(
                f"{type(self.strategy).__name__} waits for more nodes than take part: {exc}"
            ) from exc

    def aggregate(
        self, server_round: int, weights: Weights, updates: Sequence[Arrival]
    ) -> tuple[Weights | None, dict[str, float]]:
        # Flower's strategies refuse replies whose metric keys differ (InconsistentMessageReplies):
        # the round's metrics are those every update shares, so a node adding a key of its own
        # (or leaving one out) changes what is averaged, never whether the round aggregates.
        shared = _shared_metrics(server_round, [u.metrics for u in updates])
        replies = [
            _reply(
                u.node_id,
                MessageType.TRAIN,
                RecordDict(
                    {
                        "arrays": to_record(u.weights),
                        "metrics": MetricRecord(
                            {**_only(u.metrics, shared), WEIGHT_KEY: u.num_examples}
                        ),
                    }
                ),
            )
            for u in updates
        ]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return None, _numbers(metrics)
        # The global model keeps its dtypes: Flower's FedOpt family computes in float64, and a
        # float64 model would make every float32 reply a mismatch.
        new = {k: v.numpy().astype(weights[k].dtype, copy=False) for k, v in arrays.items()}
        return new, _numbers(metrics)

    def select_evaluate(
        self, server_round: int, weights: Weights, nodes: Sequence[int]
    ) -> dict[int, NodeConfig]:
        if not nodes or len(nodes) < self._min_nodes():
            return {}  # nodes still busy with training: this round goes without
        try:
            messages = self.strategy.configure_evaluate(
                server_round, to_record(weights), ConfigRecord(), NodeList(nodes)
            )
        except TooFewNodes as exc:
            log.warning("round %d: federated evaluation skipped: %s", server_round, exc)
            return {}
        return {m.metadata.dst_node_id: _task_config(m) for m in messages}

    def aggregate_evaluate(
        self, server_round: int, results: Sequence[Evaluation]
    ) -> dict[str, float]:
        if not results:
            return {}
        shared = _shared_metrics(server_round, [r.metrics for r in results])
        replies = [
            _reply(
                r.node_id,
                MessageType.EVALUATE,
                RecordDict(
                    {
                        "metrics": MetricRecord(
                            {**_only(r.metrics, shared), WEIGHT_KEY: r.num_examples}
                        )
                    }
                ),
            )
            for r in results
        ]
        return _numbers(self.strategy.aggregate_evaluate(server_round, replies))


def as_scheduler(server_half: EventStrategy | Strategy) -> EventStrategy:
    """What the one loop runs for a plugin's server half: a Florist scheduler as it is, a Flower
    ``Strategy`` as synchronous rounds of its own hooks."""
    if isinstance(server_half, EventStrategy):
        return server_half
    if isinstance(server_half, Strategy):
        return SyncRounds(FlowerAggregator(server_half))
    raise TypeError(
        f"a server half must be an EventStrategy or a Flower Strategy, "
        f"not {type(server_half).__name__}"
    )
