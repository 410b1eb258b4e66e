"""Synchronous rounds on the Grid: a faster reply poll and a wrapper that records each round."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from florist.server.db.models import utcnow
from florist.server.recorder import RoundRecord, RunRecorder, UpdateRecord
from florist.strategies.validation import (
    ARRAYS_KEY,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    WEIGHT_KEY,
    check_train_reply,
)

log = logging.getLogger(__name__)

NO_REPLY_REASON = "no reply before the round timeout"


@dataclass
class Delivery:
    """One message of a :meth:`PollingGrid.send_and_receive`: where it went, when it left,
    and when its reply came back (``reply`` is None if none came before the timeout;
    ``ended_at`` is then when the grid stopped waiting)."""

    node_id: int
    pushed_at: datetime
    pushed_mono: float
    reply: Message | None = None
    ended_at: datetime | None = None
    ended_mono: float | None = None

    @property
    def wall_duration_s(self) -> float | None:
        return None if self.ended_mono is None else self.ended_mono - self.pushed_mono


class PollingGrid(Grid):
    """Flower's Grid with a short reply poll, remembering when each message left and returned.

    ``HttpGrid.send_and_receive`` sleeps 3 s between pulls (flwr 1.39); a round that finishes
    just after a pull waits that long for nothing. This wrapper pushes and pulls through the
    same Grid, polling every ``interval`` seconds, and keeps the latest exchange's
    :class:`Delivery` per message id in :attr:`deliveries`, so the round's recorder can tell
    when each node got its task and delivered, and which nodes never did.
    """

    def __init__(self, inner: Grid, interval: float = 0.1) -> None:
        self._inner = inner
        self._interval = interval
        self.deliveries: dict[str, Delivery] = {}

    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        # Flower's push returns the ids in the order given, None for a message it refused, or
        # no ids at all when the whole push was too large.
        ids = list(self.push_messages(messages))
        pushed_at, pushed_mono = utcnow(), time.monotonic()
        self.deliveries = {
            msg_id: Delivery(msg.metadata.dst_node_id, pushed_at, pushed_mono)
            for msg_id, msg in zip(ids, messages, strict=False)
            if msg_id is not None
        }
        if len(self.deliveries) < len(messages):
            log.warning("%d messages were not pushed", len(messages) - len(self.deliveries))
        pending = set(self.deliveries)
        deadline = None if timeout is None else pushed_mono + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            ended_at, ended_mono = utcnow(), time.monotonic()
            for reply in got:
                msg_id = reply.metadata.reply_to_message_id
                delivery = self.deliveries.get(msg_id)
                if delivery is not None and delivery.reply is None:
                    delivery.reply = reply
                    delivery.ended_at, delivery.ended_mono = ended_at, ended_mono
                pending.discard(msg_id)
            replies.extend(got)
            if not pending or (deadline is not None and ended_mono >= deadline):
                break
            time.sleep(self._interval)
        if pending:
            log.warning("round timed out with %d replies missing", len(pending))
            ended_at, ended_mono = utcnow(), time.monotonic()
            for msg_id in pending:
                self.deliveries[msg_id].ended_at = ended_at
                self.deliveries[msg_id].ended_mono = ended_mono
        return replies


def numeric_metrics(record: MetricRecord | None) -> dict[str, float]:
    """The scalar metrics of a record as floats (lists dropped)."""
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def train_update(
    content: RecordDict, sent: Mapping[str, np.ndarray], **fields: Any
) -> UpdateRecord:
    """The record of a training reply: accepted, or rejected with the reason
    :func:`check_train_reply` gives against the model the node was ``sent``."""
    problem = check_train_reply(content, sent)
    metrics = numeric_metrics(content.metric_records.get(METRICS_KEY))
    arrays = content.array_records.get(ARRAYS_KEY)
    node_config = content.config_records.get(NODE_CONFIG_KEY)
    return UpdateRecord(
        status="rejected" if problem else "accepted",
        reason=problem,
        num_examples=int(metrics[WEIGHT_KEY]) if WEIGHT_KEY in metrics else None,
        train_time_s=metrics.get("train-time"),
        metrics=metrics,
        bytes_up=arrays.count_bytes() if arrays is not None else 0,
        node_config=_scalars(node_config) if node_config is not None else None,
        **fields,
    )


def _scalars(record: ConfigRecord) -> dict[str, Any]:
    """A ConfigRecord's scalar entries (node-config values are scalars; bytes are dropped)."""
    return {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}


class RecordingStrategy(Strategy):
    """Wraps a plugin's Flower strategy: rejects malformed updates and records every round.

    Flower's ``Strategy.start`` drives the loop and calls these hooks; this wrapper checks each
    training reply against the model it was sent (a bad one is recorded as rejected and never
    reaches the inner strategy), and when the round's centralized evaluation is done
    (:meth:`evaluate_fn`) writes the round and its updates in one transaction. On a
    :class:`PollingGrid` each update carries when its task left and its reply came back, and a
    node that sent no reply before the round timeout is recorded as a failed update.
    """

    def __init__(
        self,
        inner: Strategy,
        recorder: RunRecorder,
        run_id: int,
        evaluate: Callable[[int, ArrayRecord], dict[str, float]] | None = None,
    ) -> None:
        self.inner = inner
        self.recorder = recorder
        self.run_id = run_id
        self._evaluate = evaluate
        self._sent: dict[str, np.ndarray] = {}
        self._bytes_down = 0
        self._grid: Grid | None = None
        self._round_started: datetime = utcnow()
        self._updates: list[UpdateRecord] = []
        self._train_metrics: dict[str, float] = {}
        self._evaluate_metrics: dict[str, float] = {}
        self.history: list[RoundRecord] = []
        self.initial_metrics: dict[str, float] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = utcnow()
        self._grid = grid
        self._updates = []
        self._train_metrics = {}
        self._evaluate_metrics = {}
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        self._bytes_down = arrays.count_bytes()
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        # Written before the push: a task is otherwise unseen until its reply arrives, and the
        # dashboard reads this row to tell that the nodes are training.
        node_ids = [str(msg.metadata.dst_node_id) for msg in messages]
        self.recorder.record_event(
            run_id=self.run_id,
            kind="dispatch",
            message=f"round {server_round}: training sent to {len(node_ids)} nodes",
            data={
                "server_round": server_round,
                "node_ids": node_ids,
                "model_version": server_round - 1,
            },
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's Strategy.start pulls the training replies through the grid it handed to
        # configure_train, then calls this at once: the grid's deliveries are this round's.
        deliveries = self._grid.deliveries if isinstance(self._grid, PollingGrid) else {}
        accepted: list[Message] = []
        for msg in replies:
            delivery = deliveries.get(msg.metadata.reply_to_message_id)
            # The node the task went to: an error Flower makes up itself may name another.
            node = delivery.node_id if delivery is not None else msg.metadata.src_node_id
            common = self._update_fields(server_round, node, delivery)
            if msg.has_error():
                self._updates.append(
                    UpdateRecord(status="failed", reason=msg.error.reason, **common)
                )
                continue
            update = train_update(msg.content, self._sent, **common)
            steps = update.metrics.get("local-steps")
            update = replace(
                update,
                local_steps=int(steps) if steps is not None else None,
                virtual_duration_s=update.metrics.get("virtual-duration"),
            )
            self._updates.append(update)
            if update.status == "rejected":
                log.warning(
                    "round %d: rejected update from node %d: %s", server_round, node, update.reason
                )
            else:
                accepted.append(msg)
        for delivery in deliveries.values():
            if delivery.reply is None:
                log.warning("round %d: node %d sent no reply", server_round, delivery.node_id)
                self._updates.append(
                    UpdateRecord(
                        status="failed",
                        reason=NO_REPLY_REASON,
                        **self._update_fields(server_round, delivery.node_id, delivery),
                    )
                )
        if not accepted:
            return None, None
        # Replies arrive in any order; summing in node order makes a seeded run repeatable.
        accepted.sort(key=lambda m: m.metadata.src_node_id)
        arrays_out, metrics_out = self.inner.aggregate_train(server_round, accepted)
        self._train_metrics = numeric_metrics(metrics_out)
        return arrays_out, metrics_out

    def _update_fields(
        self, server_round: int, node_id: int, delivery: Delivery | None
    ) -> dict[str, Any]:
        """What every update of this round records besides its outcome. Every node trains on
        the model of the round before (version ``server_round - 1``), which is still the global
        model when it delivers, so staleness is 0."""
        fields: dict[str, Any] = {
            "node_id": node_id,
            "bytes_down": self._bytes_down,
            "model_version": server_round - 1,
            "arrival_version": server_round - 1,
        }
        if delivery is not None:
            fields["dispatched_at"] = delivery.pushed_at
            fields["arrived_at"] = delivery.ended_at
            fields["wall_duration_s"] = delivery.wall_duration_s
        return fields

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ok = [m for m in replies if not m.has_error()]
        result = self.inner.aggregate_evaluate(server_round, ok) if ok else None
        self._evaluate_metrics = numeric_metrics(result)
        return result

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's per-round hook: evaluate centrally, then commit the round."""
        metrics = self._evaluate(server_round, arrays) if self._evaluate else {}
        if server_round == 0:
            self.initial_metrics = metrics
            self.recorder.record_event(
                run_id=self.run_id,
                kind="initial-evaluation",
                message="global model evaluated before round 1",
                data=metrics,
            )
        else:
            record = RoundRecord(
                server_round=server_round,
                started_at=self._round_started,
                finished_at=utcnow(),
                metrics=metrics,
                train_metrics=self._train_metrics,
                evaluate_metrics=self._evaluate_metrics,
                updates=tuple(self._updates),
            )
            self.recorder.record_round(self.run_id, record)
            self.history.append(record)
        return MetricRecord(dict(metrics)) if metrics else None
