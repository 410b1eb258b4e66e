"""Florist's one server loop on the Grid: every plugin, one event at a time, on either clock.

Every strategy plugin's server half runs here as an :class:`EventStrategy` (synchronous rounds,
Flower's own strategies among them, are the scheduler in strategies/rounds.py), so each gets the
experiment's dropout policy, both clocks and the time budget. This module is also the one place
that builds a task's message, a ``dispatch`` event, an update record and a round record.

Each node has at most one task in flight. An arriving reply is checked (strategies/validation.py,
under the experiment's ``reply_checks``), handed to the strategy's :class:`EventStrategy`, and
the strategy's :class:`Decision` says whether the global model changed and whom to send work
next. Every aggregation is committed as a round, with every update handled since the previous one.

On the **virtual clock** each reply carries the simulated duration of its task
(``virtual-duration``, from the node's device profile); the loop holds replies until no task is in
flight and then handles the one that finishes first in virtual time (ties: the one sent first), so a
run is deterministic given its seed whatever the real timing.

A decision may set a **timer** (``wake_in``, e.g. a round's deadline under the experiment's
:class:`~florist.strategies.events.DropoutPolicy`); the strategy's ``on_tick`` runs when it comes
due. On the wall clock the loop checks it at every poll, after the replies pulled at that poll.
On the virtual clock it is one more event in time order: once every reply is in hand, a timer
earlier than the first held reply fires first (virtual time jumps to it) and the replies after
it arrive later; a reply at exactly the timer's time goes first. ``refused`` updates are recorded
as rejected, ``notes`` as events.

Once the run is done no new task is sent. When it ends (its rounds or budget reached, or an
error), every task dispatched that has no row yet gets one, in one transaction under the round
it would have joined: an update handled since the last aggregation or a reply pulled but not
handled is ``rejected`` ("run ended before it was aggregated") unless it failed on its own; a
task still in flight is ``failed`` ("run ended before the reply"). A ``tasks`` event then counts
the tasks dispatched per node, so that each can be matched to exactly one client-update row.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from florist.client.protocol import (
    Dropout,
    EvaluateInstruction,
    TrainInstruction,
    TrainReport,
)
from florist.client.task import flatten
from florist.server.db.models import utcnow
from florist.server.recording import ModelCheckpoint, RoundRecord, RunRecorder, UpdateRecord
from florist.server.recording.artifacts import rounds_to_drop, to_safetensors
from florist.server.runtime.replies import PulledReply, pull_replies
from florist.server.runtime.resume import ResumePoint, RngStates, SavedTask, Then, dumps
from florist.server.spec import ExperimentSpec
from florist.strategies.events import (
    Arrival,
    Decision,
    DropoutPolicyError,
    Evaluation,
    EventStrategy,
    NodeConfig,
    Weights,
)
from florist.strategies.flower_adapter import to_record
from florist.strategies.rounds import AggregationError
from florist.strategies.validation import (
    ARRAYS_KEY,
    METRIC_LIMIT,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    WEIGHT_KEY,
    MalformedReply,
    ReplyChecks,
    SoundTrainReply,
    UpdateNorms,
    check_weights,
    parse_evaluate_reply,
    parse_train_reply,
)

log = logging.getLogger(__name__)

NOT_AGGREGATED = "run ended before it was aggregated"
NO_REPLY = "run ended before the reply"
PUSH_REFUSED = "the SuperLink refused the task"
NO_REPLY_BY_DEADLINE = "no reply before the deadline"


class PushRefusedError(RuntimeError):
    """The SuperLink keeps refusing the run's tasks: nothing can be trained."""


def numeric_metrics(record: MetricRecord | None) -> dict[str, float]:
    """The scalar metrics of a record as floats (lists dropped)."""
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def _scalars(record: ConfigRecord) -> dict[str, Any]:
    """A ConfigRecord's scalar entries (node-config values are scalars; bytes are dropped)."""
    return {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}


def recordable_metrics(record: MetricRecord | None) -> dict[str, float]:
    """The scalar metrics of a reply that can be stored as they are: finite and of sane size
    (a rejected reply's NaN or 1e300 would break the JSON column; its reason says what it held)."""
    return {
        k: v
        for k, v in numeric_metrics(record).items()
        if np.isfinite(v) and abs(v) <= METRIC_LIMIT
    }


_INT32 = 2**31  # PostgreSQL's INTEGER, the narrowest column an example count lands in


def _recordable_count(record: MetricRecord | None) -> int | None:
    value = record.get(WEIGHT_KEY) if record is not None else None
    if isinstance(value, bool) or not isinstance(value, int) or not -_INT32 < value < _INT32:
        return None
    return value


def check_train(
    content: RecordDict,
    sent: Mapping[str, np.ndarray],
    *,
    checks: ReplyChecks | None = None,
    norm_limit: tuple[float, str] | None = None,
    **fields: Any,
) -> tuple[UpdateRecord, SoundTrainReply | None]:
    """The record of a training reply, accepted or rejected with the reason
    :func:`~florist.strategies.validation.parse_train_reply` gives against the model the node was
    ``sent``, and the decoded reply when it is sound."""
    checks = checks or ReplyChecks()
    try:
        sound = parse_train_reply(
            content, sent, max_examples=checks.max_examples, norm_limit=norm_limit
        )
        problem = None
    except MalformedReply as exc:
        sound, problem = None, str(exc)
    record = content.metric_records.get(METRICS_KEY)
    arrays = content.array_records.get(ARRAYS_KEY)
    node_config = content.config_records.get(NODE_CONFIG_KEY)
    report = sound.report if sound is not None else None
    update = UpdateRecord(
        status="rejected" if problem else "accepted",
        reason=problem,
        num_examples=_recordable_count(record),
        train_time_s=report.train_time if report else None,
        local_steps=report.local_steps if report else None,
        virtual_duration_s=report.virtual_duration if report else None,
        metrics=sound.metrics if sound is not None else recordable_metrics(record),
        bytes_up=arrays.count_bytes() if arrays is not None else 0,
        node_config=_scalars(node_config) if node_config is not None else None,
        **fields,
    )
    return update, sound


def train_update(
    content: RecordDict,
    sent: Mapping[str, np.ndarray],
    *,
    checks: ReplyChecks | None = None,
    norm_limit: tuple[float, str] | None = None,
    **fields: Any,
) -> UpdateRecord:
    """The record of a training reply (:func:`check_train`)."""
    return check_train(content, sent, checks=checks, norm_limit=norm_limit, **fields)[0]


def simulated_duration(reply: Message) -> float:
    """The virtual seconds a reply says its task took: a dropout's time before it vanished, a
    sound reply's ``virtual-duration``; 0 when it says nothing (it is rejected later)."""
    if reply.has_error():
        dropout = Dropout.from_error(reply.error)
        return dropout.after_s if dropout is not None else 0.0
    try:
        report = TrainReport.from_metrics(
            numeric_metrics(reply.content.metric_records.get(METRICS_KEY))
        )
    except ValidationError:
        return 0.0
    return report.virtual_duration or 0.0


@dataclass
class Task:
    """One dispatched training task, until its reply is handled."""

    node_id: int
    version: int
    sent: Weights
    bytes_down: int
    dispatched_at: datetime
    dispatched_mono: float
    virtual_start: float
    seq: int  # dispatch order in the run: on the virtual clock, equal end times go first-sent first
    config: Mapping[str, Any]  # the task's ConfigRecord entries: a resumed run sends them again


@dataclass
class Event:
    """A task's end: its reply, or ``pulled=None`` when the server gave up waiting."""

    task: Task
    pulled: PulledReply | None
    arrived_at: datetime
    wall_duration_s: float
    virtual_end: float
    reason: str = NO_REPLY_BY_DEADLINE  # why, when there is no reply

    @property
    def reply(self) -> Message | None:
        """The reply, pulled whole from the SuperLink the first time it is read."""
        return None if self.pulled is None else self.pulled.message()


@dataclass
class Tick:
    """A strategy's timer coming due at ``at`` on the experiment's clock."""

    at: float


class EventLoop:
    """Runs an :class:`EventStrategy` on the Grid until ``rounds`` aggregations or the budget."""

    # Wall seconds of the strategy's latest timed call (_timed); a new model's round takes it.
    decision_s: float | None = None

    def __init__(
        self,
        grid: Grid,
        spec: ExperimentSpec,
        strategy: EventStrategy,
        recorder: RunRecorder,
        run_id: int,
        evaluate: Callable[[int, ArrayRecord], dict[str, float]],
        task_config: Mapping[str, Any],
        *,
        poll_interval: float = 0.05,
        node_poll_s: float = 5.0,
    ) -> None:
        self.grid = grid
        self.spec = spec
        self.strategy = strategy
        self.recorder = recorder
        self.run_id = run_id
        self.evaluate = evaluate
        self.task_config = dict(task_config)
        self.poll_interval = poll_interval
        self.node_poll_s = node_poll_s  # how often to look for SuperNodes that joined
        self.known: set[int] = set()
        # The global model as a record, made once per model: the evaluation, every task of the
        # round and the federated evaluation send the same one.
        self.record_of: tuple[Weights, ArrayRecord] | None = None
        self.nodes_checked = time.monotonic()
        self.virtual = spec.clock == "virtual"
        self.version = 0
        self.vtime = 0.0
        self.weights: Weights = {}
        self.kept_checkpoints: list[int] = []  # rounds whose models this run has stored
        self.inflight: dict[str, Task] = {}
        self.refused: list[Event] = []  # tasks the SuperLink would not take, not handled yet
        self.refusals_in_a_row = 0
        self.held: list[Event] = []  # virtual clock: replies waiting for their turn
        self.queue: list[Event | Tick] = []  # pulled, not handled yet
        self.dispatched: Counter[int] = Counter()  # tasks pushed, by node
        self.pending: list[UpdateRecord] = []  # handled since the last aggregation
        self.wake_at: float | None = None  # the strategy's timer, on the experiment's clock
        self.started = time.monotonic()
        self.repeats: Counter[tuple[int, int]] = Counter()
        self.round_started = utcnow()
        self.history: list[RoundRecord] = []
        self.initial_metrics: dict[str, float] = {}
        self.checks = spec.reply_checks
        self.norms = UpdateNorms(self.checks.norm_bound)  # recent accepted update norms
        self.refused_models = 0  # new models not adopted in a row
        self.unresumable = False  # the strategy's state could not be saved (said once)
        self.last_metrics: dict[str, float] = {}  # the last committed round's, when resumed
        # Before anything runs: a policy the strategy cannot honour fails the run at once.
        strategy.use_dropout_policy(spec.dropout)

    # --- the loop -------------------------------------------------------------------------

    def run(self, initial: ArrayRecord, resume: ResumePoint | None = None) -> ArrayRecord:
        """Run from ``initial`` (round 0), or go on from ``resume``, the point stored with the
        last committed round, whose model ``initial`` then is."""
        try:
            self._run(initial, resume)
        except BaseException:
            # Best effort: what the run did so far is worth keeping, but not worth hiding the
            # error that ended it.
            try:
                self._record_unfinished()
            except Exception:
                log.exception("could not record the tasks left when the run failed")
            raise
        self._record_unfinished()
        return to_record(self.weights)

    def _run(self, initial: ArrayRecord, resume: ResumePoint | None) -> None:
        self.weights = {k: v.numpy() for k, v in initial.items()}
        nodes = self._wait_for_nodes()
        self.known, self.nodes_checked = set(nodes), time.monotonic()
        if resume is not None:
            self._resume(resume)
        else:
            self.initial_metrics = self.evaluate(0, initial)
            self.recorder.record_event(
                run_id=self.run_id,
                kind="initial-evaluation",
                message="global model evaluated before any update",
                data=self.initial_metrics,
            )
            self.started = time.monotonic()
            self.round_started = utcnow()
            self._apply(self.strategy.begin(nodes, self.weights))
        while not self._done():
            if not (self.inflight or self.held or self.refused) and self.wake_at is None:
                raise RuntimeError("the strategy left no task in flight: the run cannot go on")
            self.queue = self._next_events()
            while self.queue:
                event = self.queue.pop(0)
                if isinstance(event, Tick):
                    self._tick(event)
                else:
                    self._handle(event)
                if self._done():
                    break

    def _resume(self, point: ResumePoint) -> None:
        """Go on from ``point`` as the run that stored it would have: its state back, its tasks
        in flight sent again as they were (same model, config and place on the clock, so on the
        virtual clock their replies are the ones it would have had), then the rest of its last
        decision."""
        self.strategy = point.strategy
        self.version, self.vtime = point.version, point.vtime
        self.started = time.monotonic() - point.clock_s
        self.round_started = utcnow()
        self.known |= set(point.known)
        self.dispatched, self.repeats = Counter(point.dispatched), Counter(point.repeats)
        self.kept_checkpoints = list(point.kept_checkpoints)
        self.norms = point.norms
        self.initial_metrics = dict(point.initial_metrics)
        self.last_metrics = dict(point.last_metrics)
        point.rng.restore()
        records = {v: to_record(w) for v, w in point.models.items()}
        for saved in point.tasks:
            task = Task(
                node_id=saved.node_id,
                version=saved.version,
                sent=dict(point.models[saved.version]),
                bytes_down=saved.bytes_down,
                dispatched_at=utcnow(),
                dispatched_mono=time.monotonic(),
                virtual_start=saved.virtual_start,
                seq=saved.seq,
                config=saved.config,
            )
            if self._done():
                # Nothing more runs: the task is recorded as unanswered when the run ends.
                self.inflight[f"resumed-{saved.seq}"] = task
                continue
            msg_id = self._push_train(task, records[saved.version])
            if msg_id is None:
                self._refused_push(task)
            else:
                self.inflight[msg_id] = task
        self.recorder.record_event(
            run_id=self.run_id,
            kind="resumed",
            message=f"resumed after round {point.version}: {len(point.tasks)} tasks in flight "
            "then sent again",
            data={
                "model_version": point.version,
                "clock_s": point.clock_s,
                "node_ids": [str(t.node_id) for t in point.tasks],
            },
        )
        self.wake_at = point.wake_at
        self._apply(
            Decision(
                dispatch=point.then.dispatch,
                local_steps=point.then.local_steps,
                config=point.then.config,
                wake_in=point.then.wake_in,
            )
        )

    def _resume_point(
        self, record: RoundRecord, weights: Weights, decision: Decision
    ) -> bytes | None:
        """The state after ``record``'s aggregation, to be stored with it (None, with an event,
        if the strategy's state cannot be saved: the run goes on, but cannot resume)."""
        drop = set(record.checkpoint.drop_rounds) if record.checkpoint else set()
        unanswered = [*self.inflight.values(), *(e.task for e in self.held)]
        unanswered += [e.task for e in [*self.queue, *self.refused] if isinstance(e, Event)]
        tasks = sorted(unanswered, key=lambda t: t.seq)
        point = ResumePoint(
            version=record.server_round,
            clock_s=self._clock(),
            vtime=self.vtime,
            wake_at=self.wake_at,
            strategy=self.strategy,
            known=tuple(sorted(self.known)),
            dispatched=self.dispatched,
            repeats=self.repeats,
            kept_checkpoints=(
                *(r for r in self.kept_checkpoints if r not in drop),
                record.server_round,
            ),
            norms=self.norms,
            initial_metrics=self.initial_metrics,
            last_metrics=record.metrics,
            tasks=tuple(
                SavedTask(t.node_id, t.version, t.config, t.bytes_down, t.virtual_start, t.seq)
                for t in tasks
            ),
            models={t.version: t.sent for t in tasks},
            then=Then(decision.dispatch, decision.local_steps, decision.config, decision.wake_in),
            rng=RngStates.capture(),
        )
        try:
            return dumps(point)
        except Exception as exc:  # a third party's strategy holding a lock, a socket, a lambda
            if not self.unresumable:
                self.unresumable = True
                self.recorder.record_event(
                    run_id=self.run_id,
                    kind="not-resumable",
                    message=f"the strategy's state cannot be saved ({type(exc).__name__}: "
                    f"{exc}): rounds are recorded, but this run cannot resume after a crash",
                    data={"model_version": record.server_round},
                )
            return None

    def _clock(self) -> float:
        """Now on the experiment's clock: virtual seconds, or wall seconds since the start."""
        return self.vtime if self.virtual else time.monotonic() - self.started

    def _done(self) -> bool:
        if self.version >= self.spec.rounds:
            return True
        budget = self.spec.time_budget_s
        if budget is None or self.version == 0:
            return False
        return self._clock() >= budget

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.spec.round_timeout_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.spec.clients.min:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(nodes)} nodes connected, {self.spec.clients.min} needed, "
                    f"after {self.spec.round_timeout_s:.0f} s"
                )
            log.info("waiting for nodes: %d of %d", len(nodes), self.spec.clients.min)
            time.sleep(1.0)

    # --- dispatch ---------------------------------------------------------------------------

    def _busy(self, node_id: int) -> bool:
        return any(t.node_id == node_id for t in self.inflight.values()) or any(
            e.task.node_id == node_id for e in self.held
        )

    def _dispatch(self, node_id: int, local_steps: int | None, extra: NodeConfig) -> None:
        if self._busy(node_id):
            return  # one task per node: the strategy asks again when it reports
        repeat = self.repeats[(node_id, self.version)]
        self.repeats[(node_id, self.version)] += 1
        instruction = TrainInstruction(
            # The round it contributes to seeds its batches, as on Flower's loop; a node sent
            # the same version again trains on other batches.
            server_round=self.version + 1,
            model_version=self.version,
            task_repeat=repeat,
            # The node's availability trace is read at this time (client/profiles.py).
            virtual_time=self.vtime if self.virtual else None,
        )
        # The strategy's own entries first: the loop's must not be overridden.
        config = {**extra, **self.task_config, **instruction.to_record_dict()}
        if local_steps is not None:
            config.update(flatten({"training": {"local_steps": local_steps}}))
        arrays = self._record(self.weights)
        task = Task(
            node_id=node_id,
            version=self.version,
            sent=dict(self.weights),
            bytes_down=arrays.count_bytes(),
            dispatched_at=utcnow(),
            dispatched_mono=time.monotonic(),
            virtual_start=self.vtime,
            seq=sum(self.dispatched.values()),
            config=config,
        )
        msg_id = self._push_train(task, arrays)
        self.dispatched[node_id] += 1
        if msg_id is not None:
            self.refusals_in_a_row = 0
            self.inflight[msg_id] = task
        # The reply is recorded only when the round it joins is, so the dashboard learns from
        # this row that the node is training (a refused task gets its row at once).
        self.recorder.record_event(
            run_id=self.run_id,
            kind="dispatch",
            message=f"model version {self.version} sent to node {node_id}",
            data={
                "node_ids": [str(node_id)],
                "model_version": self.version,
                "server_round": self.version + 1,
            },
        )
        if msg_id is None:
            self._refused_push(task)

    def _push_train(self, task: Task, arrays: ArrayRecord) -> str | None:
        """Push ``task``'s message (its config, ``arrays``) to its node: the message id, or
        None when Flower refused it (or the whole push was too large for the SuperLink)."""
        message = Message(
            content=RecordDict({ARRAYS_KEY: arrays, "config": ConfigRecord(dict(task.config))}),
            dst_node_id=task.node_id,
            message_type=MessageType.TRAIN,
            ttl=self.spec.round_timeout_s,
        )
        return next(iter(self.grid.push_messages([message])), None)

    def _refused_push(self, task: Task) -> None:
        """A task the SuperLink would not take ends at once, as a lost one; the strategy hears of
        it with the next events. Refused again and again, nothing can go on: the run fails."""
        log.warning("the SuperLink refused the task for node %d", task.node_id)
        self.refused.append(Event(task, None, utcnow(), 0.0, task.virtual_start, PUSH_REFUSED))
        self.refusals_in_a_row += 1
        if self.refusals_in_a_row > 3 * len(self.dispatched) + 3:
            raise PushRefusedError(
                f"the SuperLink refused {self.refusals_in_a_row} tasks in a row "
                "(is the model larger than its message limit?)"
            )

    # --- arrivals ---------------------------------------------------------------------------

    def _pull(self) -> list[Event]:
        # Each reply is pulled whole only when it is handled (server/runtime/replies.py), so a
        # poll's replies are not all in memory at once; on the virtual clock they are read now,
        # since their order is their simulated durations.
        replies = pull_replies(self.grid, self.inflight) if self.inflight else []
        now, mono = utcnow(), time.monotonic()
        events, self.refused = self.refused, []
        for reply in replies:
            task = self.inflight.pop(reply.reply_to, None)
            if task is None:
                reply.message()  # not ours to handle, but taken, so the SuperLink drops it
                continue
            duration = simulated_duration(reply.message()) if self.virtual else 0.0
            events.append(
                Event(task, reply, now, mono - task.dispatched_mono, task.virtual_start + duration)
            )
        # Flower answers an expired TTL with an error reply (it says more, so it gets a grace
        # period); a deadline of our own as well, so that a reply that never comes cannot
        # stall the run.
        give_up = self.spec.round_timeout_s + min(5.0, 0.1 * self.spec.round_timeout_s)
        for msg_id, task in list(self.inflight.items()):
            if mono - task.dispatched_mono > give_up:
                del self.inflight[msg_id]
                events.append(
                    Event(task, None, now, mono - task.dispatched_mono, task.virtual_start)
                )
        return events

    def _next_events(self) -> list[Event | Tick]:
        while True:
            self._look_for_new_nodes()
            events = self._pull()
            if not self.virtual:
                due: list[Event | Tick] = []
                if self.wake_at is not None and self._clock() >= self.wake_at:
                    due = [Tick(self._clock())]
                if events or due:
                    return [*sorted(events, key=lambda e: e.task.node_id), *due]
            else:
                self.held.extend(events)
                if not self.inflight:
                    self.held.sort(key=lambda e: (e.virtual_end, e.task.seq))
                    first = self.held[0].virtual_end if self.held else None
                    if self.wake_at is not None and (first is None or self.wake_at < first):
                        self.vtime = max(self.vtime, self.wake_at)
                        return [Tick(self.vtime)]
                    if self.held:
                        event = self.held.pop(0)
                        self.vtime = max(self.vtime, event.virtual_end)
                        return [event]
            time.sleep(self.poll_interval)

    def _look_for_new_nodes(self) -> None:
        """A SuperNode that connected since (a new client, or one restarted under a new id) is
        offered to the strategy, as Flower's own loop samples from the nodes of the moment."""
        if time.monotonic() - self.nodes_checked < self.node_poll_s:
            return
        self.nodes_checked = time.monotonic()
        joined = sorted(set(self.grid.get_node_ids()) - self.known)
        if joined:
            self.known.update(joined)
            log.info("nodes joined: %s", joined)
            self._apply(self._timed(self.strategy.on_nodes_joined, joined, self.weights))

    def _tick(self, tick: Tick) -> None:
        if self.wake_at is None or self.wake_at > tick.at:
            return  # replaced by a later timer while the replies before it were handled
        self.wake_at = None
        self._apply(self._timed(self.strategy.on_tick, tick.at, self.weights))

    def _fields(self, task: Task) -> dict[str, Any]:
        """What every record of a task holds, whatever became of it."""
        return {
            "node_id": task.node_id,
            "bytes_down": task.bytes_down,
            "staleness": self.version - task.version,
            "model_version": task.version,
            "dispatched_at": task.dispatched_at,
        }

    def _checked(self, event: Event) -> tuple[UpdateRecord, SoundTrainReply | None]:
        """The record of a task's end (failed, or the reply checked against the model sent and
        the norm bound now), and the reply decoded when it is sound."""
        task, reply = event.task, event.reply
        common = self._fields(task) | {
            "arrival_version": self.version,
            "arrived_at": event.arrived_at,
            "wall_duration_s": event.wall_duration_s,
        }
        if reply is None or reply.has_error():
            reason = (reply.error.reason or "error reply") if reply is not None else event.reason
            return UpdateRecord(status="failed", reason=reason, **common), None
        return check_train(
            reply.content, task.sent, checks=self.checks, norm_limit=self.norms.limit(), **common
        )

    def _update_of(self, event: Event) -> UpdateRecord:
        return self._checked(event)[0]

    def _handle(self, event: Event) -> None:
        task = event.task
        update, sound = self._checked(event)
        self.pending.append(update)
        if sound is None:
            if update.status == "rejected":
                log.warning("rejected update from node %d: %s", task.node_id, update.reason)
            reason = update.reason or ""
            self._apply(self._timed(self.strategy.on_failure, task.node_id, reason, self.weights))
            return
        arrival = Arrival(
            node_id=task.node_id,
            weights=sound.weights,
            sent_weights=task.sent,
            sent_version=task.version,
            version=self.version,
            num_examples=sound.report.num_examples,
            local_steps=sound.report.local_steps or 0,
            metrics=sound.metrics,
            duration_s=(event.virtual_end - task.virtual_start)
            if self.virtual
            else event.wall_duration_s,
            arrived_at=self._clock(),
        )
        try:
            decision = self._timed(self.strategy.on_arrival, arrival, self.weights)
        except (AggregationError, DropoutPolicyError):
            raise  # the strategy's own verdict that the run cannot go on
        except Exception as exc:
            # The one arrival handed over is what the strategy choked on: it is rejected, and the
            # run goes on as after any lost task. A strategy that fails on every arrival still
            # ends the run (no task left, or dropout.max_skips), with the reasons recorded.
            reason = f"the strategy could not use it: {type(exc).__name__}: {exc}"
            log.warning("node %d: %s", task.node_id, reason)
            self.pending[-1] = replace(update, status="rejected", reason=reason)
            self._note_rejection("strategy-error", task.node_id, reason)
            decision = self._timed(self.strategy.on_failure, task.node_id, reason, self.weights)
        else:
            self.norms.observe(sound.update_norm)
        self._apply(decision)

    def _timed(self, call: Callable[..., Decision], *args: Any) -> Decision:
        """The strategy's decision on an event, timed: when it carries a new model, this is how
        long the strategy took to aggregate it (recorded with the round, ``aggregate_s``)."""
        started = time.perf_counter()
        decision = call(*args)
        self.decision_s = time.perf_counter() - started
        return decision

    def _note_rejection(self, kind: str, node_id: int, reason: str) -> None:
        self.recorder.record_event(
            run_id=self.run_id,
            kind=kind,
            message=f"reply from node {node_id} rejected: {reason}",
            data={"node_id": str(node_id), "reason": reason, "model_version": self.version},
        )

    def _apply(self, decision: Decision) -> None:
        for node_id, reason in decision.refused.items():
            self._refuse(node_id, reason)
        for note in decision.notes:
            self.recorder.record_event(
                run_id=self.run_id,
                kind=note.kind,
                message=note.message,
                data={**note.data, "clock_s": self._clock(), "model_version": self.version},
            )
        if decision.weights is not None:
            try:
                check_weights(decision.weights, self.weights)
            except MalformedReply as exc:
                self._refuse_aggregate(str(exc))
            else:
                self.refused_models = 0
                self._aggregated(decision.weights, decision)
        if self._done():
            return  # a task sent now could only be abandoned when the run ends
        for node_id in decision.dispatch:
            self._dispatch(
                node_id, decision.local_steps.get(node_id), decision.config.get(node_id, {})
            )
        if decision.wake_in is not None:
            self.wake_at = self._clock() + decision.wake_in

    def _refuse_aggregate(self, problem: str) -> None:
        """A new model that is not a model (non-finite, or not the model's arrays) is not
        adopted: the version stays, and the updates it was made of are rejected."""
        reason = f"their aggregate was refused: {problem}"
        log.warning("aggregate refused: %s", problem)
        self.refused_models += 1
        if self.refused_models > self.spec.dropout.max_skips:
            # A strategy whose every model is broken would otherwise run for ever.
            raise AggregationError(
                f"{self.refused_models} new models in a row refused "
                f"(dropout.max_skips = {self.spec.dropout.max_skips}): {problem}"
            )
        self.pending = [
            replace(u, status="rejected", reason=reason) if u.status == "accepted" else u
            for u in self.pending
        ]
        self.recorder.record_event(
            run_id=self.run_id,
            kind="aggregate-refused",
            message=f"the strategy's new model was not adopted: {problem}",
            data={"reason": problem, "model_version": self.version, "clock_s": self._clock()},
        )

    def _refuse(self, node_id: int, reason: str) -> None:
        """The node's latest accepted update since the last aggregation stays out of it."""
        for i in range(len(self.pending) - 1, -1, -1):
            update = self.pending[i]
            if update.node_id == node_id and update.status == "accepted":
                self.pending[i] = replace(update, status="rejected", reason=reason)
                return
        log.warning("refused update from node %d not found among pending ones", node_id)

    def _aggregated(self, weights: Weights, decision: Decision) -> None:
        # The version moves on only once the round is stored: if evaluating or recording it
        # fails, its updates are recorded at the end under the round they were meant for.
        version = self.version + 1
        metrics = self.evaluate(version, self._record(weights))
        federated = self._federated_evaluation(version, weights)
        record = RoundRecord(
            server_round=version,
            started_at=self.round_started,
            finished_at=max(utcnow(), self.round_started),
            metrics=metrics,
            train_metrics=_weighted_metrics(
                [
                    (u.num_examples, u.metrics)
                    for u in self.pending
                    if u.status == "accepted" and u.num_examples is not None
                ]
            )
            | dict(decision.metrics),
            evaluate_metrics=federated,
            updates=tuple(self.pending),
            virtual_time_s=self.vtime if self.virtual else None,
            checkpoint=self._checkpoint(version, weights),
            aggregate_s=self.decision_s,
        )
        record = replace(record, resume=self._resume_point(record, weights, decision))
        self.recorder.record_round(self.run_id, record)
        if record.checkpoint is not None:
            dropped = set(record.checkpoint.drop_rounds)
            self.kept_checkpoints = [r for r in self.kept_checkpoints if r not in dropped]
            self.kept_checkpoints.append(version)
        self.version, self.weights = version, weights
        # The history holds no model or state bytes: a long run would pile them up.
        self.history.append(replace(record, checkpoint=None, resume=None))
        self.pending = []
        self.round_started = record.finished_at

    def _checkpoint(self, version: int, weights: Weights) -> ModelCheckpoint:
        """This round's model, and the kept ones the retention policy now drops."""
        drop = rounds_to_drop(self.kept_checkpoints, version, self.spec.checkpoints)
        metadata = {"florist-round": str(version), "florist-workload": self.spec.workload_ref.name}
        return ModelCheckpoint(to_safetensors(weights, metadata), tuple(drop))

    def _record(self, weights: Weights) -> ArrayRecord:
        if self.record_of is None or self.record_of[0] is not weights:
            self.record_of = (weights, to_record(weights))
        return self.record_of[1]

    def _federated_evaluation(self, version: int, weights: Weights) -> dict[str, float]:
        """The new model evaluated by the idle nodes the strategy picks, on their own held-out
        shards, before anything else is sent; it takes no time on the virtual clock."""
        idle = [n for n in sorted(self.known) if not self._busy(n)]
        targets = self.strategy.configure_evaluate(version, weights, idle)
        if not targets:
            return {}
        pushed: dict[str, int] = {}
        for node_id, extra in sorted(targets.items()):
            instruction = EvaluateInstruction(server_round=version)
            config = {**extra, **self.task_config, **instruction.to_record_dict()}
            message = Message(
                content=RecordDict(
                    {ARRAYS_KEY: self._record(weights), "config": ConfigRecord(config)}
                ),
                dst_node_id=node_id,
                message_type=MessageType.EVALUATE,
                ttl=self.spec.round_timeout_s,
            )
            msg_id = next(iter(self.grid.push_messages([message])), None)
            if msg_id is not None:
                pushed[msg_id] = node_id
        deadline = time.monotonic() + self.spec.round_timeout_s
        results: list[Evaluation] = []
        while pushed and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pushed)):
                node_id = pushed.pop(reply.metadata.reply_to_message_id, -1)
                if node_id < 0:
                    continue
                if reply.has_error():
                    reason = reply.error.reason or "error reply"
                    self._note_rejection("evaluate-failed", node_id, reason)
                    continue
                try:
                    sound = parse_evaluate_reply(
                        reply.content, max_examples=self.checks.max_examples
                    )
                except MalformedReply as exc:
                    log.warning("rejected evaluation from node %d: %s", node_id, exc)
                    self._note_rejection("evaluate-rejected", node_id, str(exc))
                    continue
                results.append(Evaluation(node_id, sound.num_examples, sound.metrics))
            if pushed:
                time.sleep(self.poll_interval)
        if pushed:
            log.warning("version %d: %d evaluation replies missing", version, len(pushed))
        ordered = sorted(results, key=lambda r: r.node_id)
        try:
            return self.strategy.aggregate_evaluate(version, ordered)
        except (AggregationError, DropoutPolicyError):
            raise
        except Exception as exc:
            # Federated evaluation only reports on a model: it is not worth the run.
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("version %d: federated evaluation not aggregated: %s", version, reason)
            self.recorder.record_event(
                run_id=self.run_id,
                kind="evaluate-skipped",
                message=f"federated evaluation of version {version} not aggregated: {reason}",
                data={"reason": reason, "model_version": version},
            )
            return {}

    # --- the end -------------------------------------------------------------------------------

    def _record_unfinished(self) -> None:
        """One row for every dispatched task not yet recorded, then the per-node task count."""
        updates = [
            replace(u, status="rejected", reason=NOT_AGGREGATED) if u.status == "accepted" else u
            for u in self.pending
        ]
        for event in [*self.queue, *self.refused]:
            if isinstance(event, Event):
                update = self._update_of(event)
                if update.status == "accepted":
                    update = replace(update, status="rejected", reason=NOT_AGGREGATED)
                updates.append(update)
        # On the virtual clock a held reply ends after the run did: it never came, in its time.
        mono = time.monotonic()
        unfinished = [(e.task, e.wall_duration_s) for e in self.held]
        unfinished += [(t, mono - t.dispatched_mono) for t in self.inflight.values()]
        updates += [
            UpdateRecord(status="failed", reason=NO_REPLY, wall_duration_s=wall, **self._fields(t))
            for t, wall in unfinished
        ]
        self.pending, self.queue, self.held, self.inflight, self.refused = [], [], [], {}, []
        if updates:
            self.recorder.record_updates(self.run_id, self.version + 1, updates)
        if self.dispatched:
            total = sum(self.dispatched.values())
            self.recorder.record_event(
                run_id=self.run_id,
                kind="tasks",
                message=f"{total} tasks dispatched to {len(self.dispatched)} nodes, "
                f"{len(unfinished)} unfinished when the run ended",
                data={
                    "dispatched": total,
                    "by_node": {str(n): c for n, c in sorted(self.dispatched.items())},
                    "unfinished": len(unfinished),
                    "model_version": self.version,
                },
            )


def _weighted_metrics(accepted: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Example-weighted mean of each metric over the accepted updates of a round."""
    total = sum(n for n, _ in accepted)
    if total == 0:
        return {}
    keys = sorted({k for _, m in accepted for k in m})
    return {
        k: sum(n * m[k] for n, m in accepted if k in m) / sum(n for n, m in accepted if k in m)
        for k in keys
    }
