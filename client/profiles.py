"""Device profiles: how fast, how available and how reliable a SuperNode pretends to be.

A SuperNode gets its profile through its ``--node-config`` (``profile="slow"``, or explicit keys
``seconds-per-step``, ``availability``, ``period-s``, ``availability-trace``, ``dropout``,
``bandwidth-mbps`` that override the named profile's values). :func:`profile_mod`, a Flower
ClientApp mod, applies it to every train message, under the experiment's clock (``florist.clock``
in the message's ConfigRecord):

- **wall**: the task really takes the profile's time. The node first waits out an offline spell
  (if the task arrived while its availability trace says offline), trains, then sleeps until
  ``local-steps × seconds_per_step + bytes·8 / bandwidth`` has passed.
- **virtual**: no sleeping; the simulated duration is reported and the server orders by it.

When a node is online is an :class:`AvailabilityTrace`: on-intervals within a period that repeats,
FedScale's ``client_behave_trace`` shape, given on the node-config as a compact string
``availability-trace="0-120,300-500/600"`` (online 0–120 s and 300–500 s of every 600 s).
Without one, ``availability`` and ``period-s`` make the degenerate trace
``0-availability·period_s/period_s``, with a phase drawn per node. A trace is read at the task's
arrival time: on the virtual clock the server's ``virtual-time``, on the wall clock Unix time (so
every node of a fleet reads its trace on one shared timeline).

Either way a successful train reply carries ``virtual-duration`` (seconds, in its MetricRecord
``"metrics"``; client/protocol.py's :class:`TrainReport`): the offline wait plus the simulated
work. A node that drops out answers with a :class:`~florist.client.protocol.Dropout` error reply
(how long it worked before vanishing) and never with the trained model. Without a
``virtual-time`` on the virtual clock, where in its on/off cycle the node is when a task arrives
is drawn from the seed instead.
Evaluate (and query) messages pass through unchanged: profiles model the cost of training, and
federated evaluation is off by default.

Random draws (dropout, the offline phase) are seeded by the experiment's seed (``florist.seed``),
the node's ``partition-id``, the ``server-round`` and ``task-repeat`` (``derive_seed``), so a
virtual-clock run is reproducible.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    model_validator,
)

from florist.client.protocol import Dropout, TaskClock, TrainInstruction, TrainReport
from florist.datasets.seeds import derive_seed

Clock = Literal["wall", "virtual"]


class TraceError(ValueError):
    """An availability trace that cannot be used."""


def _seconds(value: float) -> str:
    # Integral seconds print without ".0"; anything else round-trips exactly.
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_INTERVAL = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*")
_PERIOD = re.compile(rf"\s*({_NUMBER})\s*")
TRACE_FORMAT = "'start-end,start-end,…/period' in seconds, e.g. '0-120,300-500/600'"


@dataclass(frozen=True)
class AvailabilityTrace:
    """When a node is online: on-intervals ``[start, end)`` of a period that repeats forever.

    FedScale's ``client_behave_trace`` in one value: its ``active`` times are the starts, its
    ``inactive`` times the ends, its ``finish_time`` the period. ``str()`` gives the compact
    node-config form (``"0-120,300-500/600"``) that :meth:`parse` reads back.
    """

    on: tuple[tuple[float, float], ...]
    period_s: float

    def __post_init__(self) -> None:
        # Floats throughout, whatever the caller passed (ints print and compare the same way).
        object.__setattr__(self, "on", tuple((float(s), float(e)) for s, e in self.on))
        object.__setattr__(self, "period_s", float(self.period_s))
        period = self.period_s
        if not (math.isfinite(period) and period > 0):
            raise TraceError(f"the period {_seconds(period)} is not a positive number of seconds")
        if not self.on:
            # A node that is never online would hold every task it gets forever.
            raise TraceError("needs at least one on-interval")
        previous_end = 0.0
        for start, end in self.on:
            spell = f"{_seconds(start)}-{_seconds(end)}"
            if not (math.isfinite(start) and math.isfinite(end)):
                raise TraceError(f"on-interval {spell} is not finite")
            if start < previous_end:
                where = "0" if previous_end == 0 else f"the previous end {_seconds(previous_end)}"
                raise TraceError(
                    f"on-interval {spell} starts before {where}: intervals go in ascending "
                    "order and do not overlap"
                )
            if end <= start:
                raise TraceError(f"on-interval {spell} does not end after it starts")
            if end > period:
                raise TraceError(f"on-interval {spell} ends after the period {_seconds(period)}")
            previous_end = end

    def __str__(self) -> str:
        spells = ",".join(f"{_seconds(s)}-{_seconds(e)}" for s, e in self.on)
        return f"{spells}/{_seconds(self.period_s)}"

    @classmethod
    def parse(cls, text: str) -> AvailabilityTrace:
        """The trace a compact string describes (see :data:`TRACE_FORMAT`)."""
        body, slash, period = text.rpartition("/")
        period_match = _PERIOD.fullmatch(period)
        if not slash or period_match is None:
            raise TraceError(f"expected {TRACE_FORMAT}")
        on = []
        for part in body.split(",") if body.strip() else []:
            match = _INTERVAL.fullmatch(part)
            if match is None:
                raise TraceError(f"{part.strip()!r} is not an on-interval 'start-end'")
            on.append((float(match.group(1)), float(match.group(2))))
        return cls(tuple(on), float(period_match.group(1)))

    @classmethod
    def from_fedscale(
        cls, active: Sequence[float], inactive: Sequence[float], finish_time: float
    ) -> AvailabilityTrace:
        """FedScale's per-client trace: online from ``active[i]`` until ``inactive[i]``."""
        if len(active) != len(inactive):
            raise TraceError(
                f"active has {len(active)} times and inactive {len(inactive)}: "
                "each online spell needs both its start and its end"
            )
        return cls(tuple(zip(active, inactive, strict=True)), finish_time)

    @classmethod
    def periodic(cls, availability: float, period_s: float) -> AvailabilityTrace:
        """Online for the first ``availability·period_s`` of every ``period_s``."""
        return cls(((0.0, availability * period_s),), period_s)

    @property
    def online_share(self) -> float:
        """The share of the period spent online."""
        return sum(end - start for start, end in self.on) / self.period_s

    def offline_wait(self, t: float) -> float:
        """Seconds from time ``t`` until the node is online (0 if it is online at ``t``)."""
        position = t % self.period_s
        for start, end in self.on:
            if position < start:
                return start - position
            if position < end:
                return 0.0
        # Past the last spell: wait for the first one of the next period.
        return self.period_s - position + self.on[0][0]

    def shifted(self, offset_s: float) -> AvailabilityTrace:
        """The same trace, ``offset_s`` seconds later (an interval crossing the period is split)."""
        offset = offset_s % self.period_s
        period = self.period_s
        spells: list[tuple[float, float]] = []
        for start, end in self.on:
            start, end = start + offset, end + offset
            if start >= period:
                spells.append((start - period, end - period))
            elif end > period:
                spells += [(start, period), (0.0, end - period)]
            else:
                spells.append((start, end))
        merged: list[tuple[float, float]] = []
        # Rounded to the nanosecond: float sums like 25 + 37.746 - 60 then print as 2.746, and
        # the pieces of a spell split at the period meet their neighbours exactly.
        for start, end in sorted((round(s, 9), round(e, 9)) for s, e in spells):
            # The two halves of a split spell may touch their neighbours again; keep one spell.
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return AvailabilityTrace(tuple(merged), period)


def _to_trace(value: object) -> AvailabilityTrace | None:
    if value is None or isinstance(value, AvailabilityTrace):
        return value
    if isinstance(value, str):
        return AvailabilityTrace.parse(value)
    raise TraceError(f"expected {TRACE_FORMAT}")


# In the model an AvailabilityTrace; in and out (node-config, model_dump) its compact string.
TraceField = Annotated[
    AvailabilityTrace | None,
    PlainValidator(_to_trace, json_schema_input_type=str | None),
    PlainSerializer(lambda t: None if t is None else str(t), return_type=str | None),
]


class DeviceProfile(BaseModel):
    """How a simulated device behaves. The defaults are the neutral profile: no slowdown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds_per_step: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="0 = as fast as the machine."
    )
    availability: float = Field(
        default=1.0, gt=0, le=1, description="Share of each period_s online (a periodic cycle)."
    )
    period_s: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="Length of one on/off cycle: online availability·period_s, then offline.",
    )
    availability_trace: TraceField = Field(
        default=None,
        description="When online, replacing availability and period_s (FedScale-style trace).",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Probability a task is dropped.")
    bandwidth_mbps: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="None = infinite bandwidth."
    )
    # The local steps this device is willing to run per task, for strategies whose workers
    # choose their own (AFA); None leaves that bound to the experiment.
    min_local_steps: int | None = Field(
        default=None, ge=1, le=100_000, description="Fewest local steps this device runs."
    )
    max_local_steps: int | None = Field(
        default=None, ge=1, le=100_000, description="Most local steps this device runs."
    )

    @model_validator(mode="after")
    def _one_availability(self) -> DeviceProfile:
        if self.availability_trace is not None and self.availability < 1.0:
            raise ValueError("give either availability-trace or availability and period-s")
        low, high = self.min_local_steps, self.max_local_steps
        if low is not None and high is not None and low > high:
            raise ValueError(f"min-local-steps ({low}) exceeds max-local-steps ({high})")
        return self

    def step_range(self, low: int, high: int) -> tuple[int, int]:
        """The experiment's step range [low, high] under this device's own bounds, which win:
        a device that runs at least 30 steps runs 30 when the experiment allows at most 20."""
        if self.min_local_steps is not None:
            low, high = self.min_local_steps, max(high, self.min_local_steps)
        if self.max_local_steps is not None:
            low, high = min(low, self.max_local_steps), self.max_local_steps
        return low, high

    def availability_cycle(self) -> AvailabilityTrace | None:
        """The trace this profile follows, before any phase; None: always online."""
        if self.availability_trace is not None:
            return self.availability_trace
        if self.availability >= 1.0:
            return None
        return AvailabilityTrace.periodic(self.availability, self.period_s)


# Speeds span 12× between fast and slow, in the range of FedCompass's normal/exponential fleets,
# small enough that the demo (digits, ~30 steps a round) takes seconds a round on the slowest node.
PROFILES: dict[str, DeviceProfile] = {
    "neutral": DeviceProfile(),
    "fast": DeviceProfile(seconds_per_step=0.005),
    "normal": DeviceProfile(seconds_per_step=0.02),
    "slow": DeviceProfile(seconds_per_step=0.06),
    "flaky": DeviceProfile(seconds_per_step=0.02, dropout=0.2),
}

# node-config key -> DeviceProfile field
PROFILE_KEYS: dict[str, str] = {
    "seconds-per-step": "seconds_per_step",
    "availability": "availability",
    "period-s": "period_s",
    "availability-trace": "availability_trace",
    "dropout": "dropout",
    "bandwidth-mbps": "bandwidth_mbps",
    "min-local-steps": "min_local_steps",
    "max-local-steps": "max_local_steps",
}
NO_BANDWIDTH_LIMIT = ("none", "inf", "infinite", "")
PERIODIC_KEYS = ("availability", "period-s")
TRACE_KEY = "availability-trace"


class ProfileError(ValueError):
    """A SuperNode's node-config holds an unusable device profile."""


def profile_from_node_config(node_config: Mapping[str, Any]) -> DeviceProfile:
    """The profile a SuperNode's ``--node-config`` describes; no profile keys → neutral.

    ``profile`` names a base profile (:data:`PROFILES`); explicit keys override its values.
    ``bandwidth-mbps`` may be ``"none"`` or ``"inf"`` for no limit. ``availability-trace`` (a
    compact :class:`AvailabilityTrace` string) and ``availability``/``period-s`` exclude each
    other; either replaces the named profile's availability.
    """
    name = node_config.get("profile", "neutral")
    if not isinstance(name, str) or name not in PROFILES:
        raise ProfileError(f"profile: unknown profile {name!r}; known: {', '.join(PROFILES)}")
    values = PROFILES[name].model_dump()
    periodic = [key for key in PERIODIC_KEYS if key in node_config]
    if TRACE_KEY in node_config:
        if periodic:
            raise ProfileError(f"{TRACE_KEY}: give either {TRACE_KEY} or {periodic[0]}, not both")
        values["availability"], values["period_s"] = 1.0, DeviceProfile().period_s
    elif periodic:
        values["availability_trace"] = None
    for key, field in PROFILE_KEYS.items():
        if key not in node_config:
            continue
        raw = node_config[key]
        if key == "bandwidth-mbps" and isinstance(raw, str) and raw.lower() in NO_BANDWIDTH_LIMIT:
            values[field] = None
        elif key == TRACE_KEY:
            if not isinstance(raw, str):
                raise ProfileError(f"{key}: expected {TRACE_FORMAT}, got {raw!r}")
            values[field] = raw
        elif isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ProfileError(f"{key}: expected a number, got {raw!r}")
        else:
            values[field] = float(raw)
    try:
        return DeviceProfile.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        # A rule across fields (a model validator) has no field: its message names the keys.
        key = next((k for k, f in PROFILE_KEYS.items() if f == field), "node-config")
        # pydantic prefixes a validator's own ValueError; the key already says where it came from.
        message = err["msg"].removeprefix("Value error, ")
        raise ProfileError(f"{key}: {message} (got {err['input']!r})") from None


def describe(profile: DeviceProfile) -> str:
    """The profile's name if it is a named one, else its non-default values."""
    for name, named in PROFILES.items():
        if named == profile:
            return name
    return ", ".join(f"{k}={v}" for k, v in profile.model_dump(exclude_defaults=True).items())


def _rng(seed: int, node: int, draw: tuple[int, int], purpose: str) -> random.Random:
    """The stream of one purpose's draws for a node's task (``draw``: round and repeat)."""
    return random.Random(derive_seed(seed, "profile", purpose, node, *draw))


def offline_wait(profile: DeviceProfile, now: float, seed: int, node: int) -> float:
    """Seconds until the node is online again at time ``now`` (0 if it is online).

    An ``availability_trace`` is read as given: its time 0 is time 0 of the clock. The periodic
    cycle (online for ``availability·period_s``, then offline) gets a phase drawn once per
    (seed, node), so that nodes sharing the same numbers are not offline in lockstep.
    """
    if profile.availability_trace is not None:
        return profile.availability_trace.offline_wait(now)
    cycle = profile.availability_cycle()
    if cycle is None:
        return 0.0
    phase = _rng(seed, node, (0, 0), "phase").uniform(0.0, cycle.period_s)
    return cycle.offline_wait(now + phase)


def work_seconds(profile: DeviceProfile, steps: int, bytes_down: int, bytes_up: int) -> float:
    """Simulated compute plus transfer time of one task."""
    compute = steps * profile.seconds_per_step
    if profile.bandwidth_mbps is None:
        return compute
    return compute + (bytes_down + bytes_up) * 8 / (profile.bandwidth_mbps * 1e6)


def _array_bytes(msg: Message) -> int:
    return sum(record.count_bytes() for record in msg.content.array_records.values())


def _node(context: Context) -> int:
    """The node's partition id, which outlives a restart (its node id may not)."""
    pid = context.node_config.get("partition-id")
    return int(pid) if isinstance(pid, int | float) else context.node_id


# Module-level so tests can record sleeps instead of sleeping.
sleep: Callable[[float], None] = time.sleep
now: Callable[[], float] = time.time


def profile_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the node's device profile to a train message (see the module docstring)."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    profile = profile_from_node_config(context.node_config)
    config = msg.content.config_records.get("config", ConfigRecord())
    try:
        task = TaskClock.from_config(config)
        instruction = TrainInstruction.from_record_dict(config)
    except ValidationError as exc:
        raise ProfileError(f"the task's message cannot be read: {exc}") from exc
    seed, clock = task.seed, task.clock
    node = _node(context)
    # The loop may send a node the same version again; its repeat draws anew.
    draw = (instruction.server_round, instruction.task_repeat)

    if clock == "wall":
        arrived = now()
    elif instruction.virtual_time is not None:
        arrived = instruction.virtual_time
    else:
        cycle = profile.availability_cycle()
        period = profile.period_s if cycle is None else cycle.period_s
        arrived = _rng(seed, node, draw, "arrival").uniform(0.0, period)
    waited = offline_wait(profile, arrived, seed, node)
    if clock == "wall" and waited > 0:
        sleep(waited)

    started = time.monotonic()
    reply = call_next(msg, context)
    elapsed = time.monotonic() - started
    if reply.has_error():
        return reply

    metrics = reply.content.metric_records.get("metrics", MetricRecord())
    steps = TrainReport.from_metrics(metrics).local_steps or 0
    work = work_seconds(profile, steps, _array_bytes(msg), _array_bytes(reply))

    draws = _rng(seed, node, draw, "dropout")
    if draws.random() < profile.dropout:
        # The node vanishes part-way through its work.
        lasted = draws.random() * work
        if clock == "wall":
            sleep(max(0.0, lasted - elapsed))
        dropout = Dropout(profile=describe(profile), after_s=waited + lasted)
        return Message(dropout.to_error(), reply_to=msg)

    if clock == "wall":
        remaining = work - elapsed
        if remaining > 0 and math.isfinite(remaining):
            sleep(remaining)
    reply.content["metrics"] = metrics
    metrics[TrainReport.key("virtual_duration")] = waited + work
    return reply
