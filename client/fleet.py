"""Fleet files: the device profiles of N SuperNodes, drawn from a distribution or listed.

A fleet file (TOML, kebab-case keys like the node-config it produces; see examples/fleet.toml)
either draws N speeds, as the FedCompass paper does (normal(mean, sd) truncated to positive
values, or exponential(mean)), or lists each node's profile under ``[[node]]``. Draws are
deterministic by the file's ``seed``. :func:`load_fleet` returns each node's node-config entries;
the caller adds ``partition-id`` and ``num-partitions``.

A ``[traces]`` table gives nodes availability traces from a trace file (:func:`load_traces`; see
examples/availability-traces.toml): FedScale's ``client_behave_trace`` shape, one ``[[trace]]``
per client with its ``active`` times (an online spell starts), ``inactive`` times (it ends) and
``finish-time`` (the trace repeats after it), in seconds, as TOML or JSON
(``{"trace": [{"active": [...], "inactive": [...], "finish-time": 600}]}``). Node *i* gets trace
``(offset + i) mod T`` (``assign = "round-robin"``, the default), or only the trace its own
``[[node]]`` entry names with ``trace = k`` (``assign = "by-index"``); ``offset = "seeded"`` draws
the first trace from the seed, and ``shift = true`` delays each node's trace by a seeded time in
``[0, finish-time)`` so that nodes sharing a trace are not offline in lockstep. Each trace reaches
its SuperNode as the compact ``availability-trace`` string of :mod:`florist.client.profiles`.
"""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from florist.client.profiles import (
    PERIODIC_KEYS,
    PROFILE_KEYS,
    TRACE_KEY,
    AvailabilityTrace,
    ProfileError,
    TraceError,
    profile_from_node_config,
)

NodeConfig = dict[str, int | float | str]
# A [[node]] entry's index into the trace file; not a node-config key.
TRACE_INDEX_KEY = "trace"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Kebab(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True)


class FleetError(ValueError):
    """A fleet file that cannot be used."""


class SpeedDistribution(_Kebab):
    """Seconds per local step, drawn per node."""

    distribution: Literal["normal", "exponential"]
    mean: float = Field(gt=0, allow_inf_nan=False, description="Mean seconds per step.")
    sd: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="normal only: standard deviation."
    )

    @model_validator(mode="after")
    def _sd_matches(self) -> SpeedDistribution:
        if self.distribution == "normal" and self.sd is None:
            raise ValueError("a normal distribution needs sd")
        if self.distribution == "exponential" and self.sd is not None:
            raise ValueError("an exponential distribution has no sd (its sd is its mean)")
        return self

    def draw(self, rng: random.Random) -> float:
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean)
        assert self.sd is not None
        if self.sd == 0:
            return self.mean
        # Truncated to positive values by rejection; fine unless sd ≫ mean.
        for _ in range(10_000):
            value = rng.gauss(self.mean, self.sd)
            if value > 0:
                return value
        raise ValueError(f"normal({self.mean}, {self.sd}) hardly ever draws a positive speed")


class TraceEntry(_Kebab):
    """One client's availability, in FedScale's ``client_behave_trace`` shape."""

    active: list[float] = Field(description="Seconds at which an online spell starts.")
    inactive: list[float] = Field(description="Seconds at which the matching spell ends.")
    # FedScale spells it finish_time; populate_by_name accepts that as well as finish-time.
    finish_time: float = Field(description="Length of the trace; it repeats after this.")


class TraceFile(_Kebab):
    """A trace file: ``[[trace]]`` entries, one per client."""

    trace: list[TraceEntry] = Field(min_length=1)


class TraceAssignment(_Kebab):
    """A fleet file's ``[traces]``: which availability trace each node follows."""

    file: Path = Field(description="Trace file, relative to the fleet file (.toml or .json).")
    assign: Literal["round-robin", "by-index"] = "round-robin"
    offset: int | Literal["seeded"] = Field(
        default=0, description="round-robin: node 0's trace; 'seeded': drawn from the seed."
    )
    shift: bool = Field(default=False, description="Delay each node's trace by a seeded time.")

    @model_validator(mode="after")
    def _offset_is_round_robin(self) -> TraceAssignment:
        if self.assign == "by-index" and self.offset != 0:
            raise ValueError("offset applies to assign = 'round-robin' only")
        if isinstance(self.offset, int) and self.offset < 0:
            raise ValueError("offset must be >= 0 or 'seeded'")
        return self


def load_traces(path: Path | str) -> list[AvailabilityTrace]:
    """The availability traces of a trace file (TOML, or JSON for a ``.json`` name)."""
    path = Path(path)
    try:
        text = path.read_text()
        raw: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, OSError) as exc:
        raise FleetError(f"{path}: {exc}") from exc
    try:
        entries = TraceFile.model_validate(raw).trace
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise FleetError(f"{path}: {loc}: {err['msg']}") from None
    traces = []
    for i, entry in enumerate(entries):
        try:
            traces.append(
                AvailabilityTrace.from_fedscale(entry.active, entry.inactive, entry.finish_time)
            )
        except TraceError as exc:
            raise FleetError(f"{path}: trace {i}: {exc}") from None
    return traces


class FleetSpec(_Kebab):
    """A fleet: ``nodes`` + ``speed`` (drawn), or an explicit ``[[node]]`` list."""

    seed: int = 0
    nodes: int | None = Field(default=None, ge=1, le=1000)
    speed: SpeedDistribution | None = None
    # Applied to every drawn node; an explicit [[node]] entry sets its own.
    availability: float | None = None
    period_s: float | None = None
    dropout: float | None = None
    bandwidth_mbps: float | None = None
    traces: TraceAssignment | None = None
    node: list[NodeConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _drawn_or_listed(self) -> FleetSpec:
        if self.node and (self.nodes is not None or self.speed is not None):
            raise ValueError("give either nodes and speed (drawn) or [[node]] entries, not both")
        if not self.node and (self.nodes is None or self.speed is None):
            raise ValueError("give nodes and speed (drawn) or a list of [[node]] entries")
        if self.traces is not None and (self.availability is not None or self.period_s is not None):
            raise ValueError("give either availability and period-s or [traces], not both")
        if self.traces is not None and self.traces.assign == "by-index" and not self.node:
            raise ValueError("assign = 'by-index' needs [[node]] entries that say trace = k")
        return self

    def node_configs(self) -> list[NodeConfig]:
        """Each node's entries, without traces (:meth:`assign_traces` adds them)."""
        if self.node:
            return [dict(entry) for entry in self.node]
        assert self.nodes is not None and self.speed is not None
        rng = random.Random(self.seed)
        shared: NodeConfig = {
            _kebab(k): v
            for k, v in self.model_dump(
                include={"availability", "period_s", "dropout", "bandwidth_mbps"}
            ).items()
            if v is not None
        }
        # Six significant digits: readable on the command line, and plenty for a speed.
        return [
            {"seconds-per-step": float(f"{self.speed.draw(rng):.6g}"), **shared}
            for _ in range(self.nodes)
        ]

    def assign_traces(self, configs: list[NodeConfig], traces: list[AvailabilityTrace]) -> None:
        """Give each node its trace as ``availability-trace`` (see the module docstring)."""
        assert self.traces is not None
        # Its own stream: adding [traces] to a fleet leaves its drawn speeds as they were.
        rng = random.Random(f"{self.seed}:traces")
        offset = self.traces.offset
        first = rng.randrange(len(traces)) if offset == "seeded" else offset
        for i, config in enumerate(configs):
            index = config.pop(TRACE_INDEX_KEY, None)
            if index is None:
                # An entry with its own availability keeps it.
                own = TRACE_KEY in config or any(key in config for key in PERIODIC_KEYS)
                if self.traces.assign == "by-index" or own:
                    continue
                index = (first + i) % len(traces)
            if isinstance(index, bool) or not isinstance(index, int):
                raise FleetError(f"node {i}: trace: expected an index, got {index!r}")
            if not 0 <= index < len(traces):
                raise FleetError(f"node {i}: trace {index}: the trace file has {len(traces)}")
            trace = traces[index]
            if self.traces.shift:
                # Milliseconds: short node-config strings, and plenty for a trace in seconds.
                trace = trace.shifted(round(rng.uniform(0.0, trace.period_s), 3))
            config[TRACE_KEY] = str(trace)


def load_fleet(path: Path | str) -> list[NodeConfig]:
    """Each node's profile node-config entries (``profile``, ``seconds-per-step``, …)."""
    path = Path(path)
    try:
        spec = FleetSpec.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise FleetError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise FleetError(f"{path}: {loc}: {err['msg']}") from None
    configs = spec.node_configs()
    if spec.traces is None:
        for i, config in enumerate(configs):
            if TRACE_INDEX_KEY in config:
                raise FleetError(f"{path}: node {i}: trace = k needs a [traces] table")
    else:
        traces = load_traces(path.parent / spec.traces.file)
        try:
            spec.assign_traces(configs, traces)
        except FleetError as exc:
            raise FleetError(f"{path}: {exc}") from None
    allowed = {"profile", *PROFILE_KEYS}
    for i, config in enumerate(configs):
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise FleetError(f"{path}: node {i}: unknown key {unknown[0]!r}; known: {allowed}")
        try:
            profile_from_node_config(config)
        except ProfileError as exc:
            raise FleetError(f"{path}: node {i}: {exc}") from None
    return configs
