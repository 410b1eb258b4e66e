"""The run recorder: the ServerApp's single writer of runs, rounds, client updates and events.

One interface (base.py), an in-memory and a SQL implementation, one contract test for both.
"""

from .base import (
    FINISH_REFUSED,
    RUN_INTERRUPTED,
    DuplicateRoundError,
    ExperimentEndedError,
    ModelCheckpoint,
    RecorderError,
    RoundRecord,
    RunFinishedError,
    RunOutcome,
    RunRecorder,
    RunSupersededError,
    StoredResume,
    UnknownExperimentError,
    UnknownRunError,
    UpdateRecord,
    UpdateStatus,
)
from .memory import InMemoryEvent, InMemoryExperiment, InMemoryRun, InMemoryRunRecorder
from .sql import SqlRunRecorder

__all__ = [
    "FINISH_REFUSED",
    "RUN_INTERRUPTED",
    "DuplicateRoundError",
    "ExperimentEndedError",
    "InMemoryEvent",
    "InMemoryExperiment",
    "InMemoryRun",
    "InMemoryRunRecorder",
    "ModelCheckpoint",
    "RecorderError",
    "RoundRecord",
    "RunFinishedError",
    "RunOutcome",
    "RunRecorder",
    "RunSupersededError",
    "SqlRunRecorder",
    "StoredResume",
    "UnknownExperimentError",
    "UnknownRunError",
    "UpdateRecord",
    "UpdateStatus",
]
