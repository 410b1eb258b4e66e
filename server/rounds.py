"""Synchronous rounds on the Grid: a faster reply poll and a wrapper that records each round."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from florist.server.db.models import utcnow
from florist.server.recorder import RoundRecord, RunRecorder, UpdateRecord
from florist.strategies.validation import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, check_train_reply

log = logging.getLogger(__name__)


class PollingGrid(Grid):
    """Flower's Grid with a short reply poll.

    ``HttpGrid.send_and_receive`` sleeps 3 s between pulls (flwr 1.39); a round that finishes
    just after a pull waits that long for nothing. This wrapper pushes and pulls through the
    same Grid, polling every ``interval`` seconds.
    """

    def __init__(self, inner: Grid, interval: float = 0.1) -> None:
        self._inner = inner
        self._interval = interval

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
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        if pending:
            log.warning("round timed out with %d replies missing", len(pending))
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
    return UpdateRecord(
        status="rejected" if problem else "accepted",
        reason=problem,
        num_examples=int(metrics[WEIGHT_KEY]) if WEIGHT_KEY in metrics else None,
        train_time_s=metrics.get("train-time"),
        metrics=metrics,
        bytes_up=arrays.count_bytes() if arrays is not None else 0,
        **fields,
    )


class RecordingStrategy(Strategy):
    """Wraps a plugin's Flower strategy: rejects malformed updates and records every round.

    Flower's ``Strategy.start`` drives the loop and calls these hooks; this wrapper checks each
    training reply against the model it was sent (a bad one is recorded as rejected and never
    reaches the inner strategy), and when the round's centralized evaluation is done
    (:meth:`evaluate_fn`) writes the round and its updates in one transaction.
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
        self._updates = []
        self._train_metrics = {}
        self._evaluate_metrics = {}
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        self._bytes_down = arrays.count_bytes()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._updates.append(
                    UpdateRecord(node_id=node, status="failed", reason=msg.error.reason)
                )
                continue
            update = train_update(
                msg.content, self._sent, node_id=node, bytes_down=self._bytes_down
            )
            self._updates.append(update)
            if update.status == "rejected":
                log.warning(
                    "round %d: rejected update from node %d: %s", server_round, node, update.reason
                )
            else:
                accepted.append(msg)
        if not accepted:
            return None, None
        # Replies arrive in any order; summing in node order makes a seeded run repeatable.
        accepted.sort(key=lambda m: m.metadata.src_node_id)
        arrays_out, metrics_out = self.inner.aggregate_train(server_round, accepted)
        self._train_metrics = numeric_metrics(metrics_out)
        return arrays_out, metrics_out

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
