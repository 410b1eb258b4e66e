"""A resume point: everything the one loop needs to go on from a committed round as if it had
never stopped (the strategy's whole server half, the loop's counters, the tasks in flight and
the models they were sent, the RNG states), stored with the round it follows."""

from __future__ import annotations

import io
import pickle
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from florist.strategies.events import EventStrategy, NodeConfig, Weights
from florist.strategies.validation import UpdateNorms

# Bumped when the layout changes: a point written by another layout is refused, not misread.
FORMAT = 1
_MAGIC = b"florist-resume\n"


class ResumeError(RuntimeError):
    """A run cannot resume: no usable resume point for its last committed round."""


@dataclass(frozen=True)
class SavedTask:
    """A task in flight when the round was committed: sent again, exactly, on resume."""

    node_id: int
    version: int  # the model version it was sent (its model is in ResumePoint.models)
    config: Mapping[str, Any]  # the task's ConfigRecord entries, as sent
    bytes_down: int
    virtual_start: float
    seq: int


@dataclass(frozen=True)
class Then:
    """What the round's decision still had to do once the round was committed."""

    dispatch: tuple[int, ...] = ()
    local_steps: Mapping[int, int] = field(default_factory=dict)
    config: Mapping[int, NodeConfig] = field(default_factory=dict)
    wake_in: float | None = None


@dataclass(frozen=True)
class RngStates:
    """The server process's global random generators (strategies sample with ``random``)."""

    python: Any
    numpy: Any
    torch: bytes

    @classmethod
    def capture(cls) -> RngStates:
        torch_state = torch.get_rng_state().numpy().tobytes()
        return cls(random.getstate(), np.random.get_state(), torch_state)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(torch.frombuffer(bytearray(self.torch), dtype=torch.uint8))


@dataclass(frozen=True)
class ResumePoint:
    """The loop's state right after round ``version`` was aggregated (the global model itself is
    that round's checkpoint, stored beside it)."""

    version: int
    clock_s: float  # the experiment's clock at the aggregation
    vtime: float
    wake_at: float | None  # a timer set before this round's decision, on the same clock
    strategy: EventStrategy
    known: tuple[int, ...]
    dispatched: Counter[int]
    repeats: Counter[tuple[int, int]]
    kept_checkpoints: tuple[int, ...]
    norms: UpdateNorms
    initial_metrics: Mapping[str, float]
    last_metrics: Mapping[str, float]  # the round's centralized metrics: a final one's result
    tasks: tuple[SavedTask, ...]
    models: Mapping[int, Weights]  # by version: what the tasks in flight were sent
    then: Then
    rng: RngStates
    format: int = FORMAT


def dumps(point: ResumePoint) -> bytes:
    """The point as bytes: a magic line, then a pickle.

    Pickle, because a strategy's server half is arbitrary Python (Flower's strategies, a third
    party's); it is written and read by the ServerApp only, through the database it already
    trusts with every experiment, and never accepted from a request."""
    buffer = io.BytesIO()
    buffer.write(_MAGIC)
    pickle.dump(point, buffer, protocol=5)
    return buffer.getvalue()


def loads(data: bytes) -> ResumePoint:
    """The point stored by :func:`dumps`; ResumeError if it is not one this code can read."""
    if not data.startswith(_MAGIC):
        raise ResumeError("the stored resume point is not one (wrong header)")
    try:
        point = pickle.loads(data[len(_MAGIC) :])
    except Exception as exc:  # a class renamed or removed since it was written, a torn blob
        raise ResumeError(f"the stored resume point cannot be read: {exc}") from exc
    if not isinstance(point, ResumePoint) or point.format != FORMAT:
        raise ResumeError("the stored resume point was written by another version of Florist")
    return point
