"""Florist's one server loop (loop.py) and an in-process Grid for tests (localgrid.py)."""

from .loop import (
    NO_REPLY,
    NO_REPLY_BY_DEADLINE,
    NOT_AGGREGATED,
    PUSH_REFUSED,
    EventLoop,
    PushRefusedError,
    numeric_metrics,
    simulated_duration,
    train_update,
)

__all__ = [
    "NOT_AGGREGATED",
    "NO_REPLY",
    "NO_REPLY_BY_DEADLINE",
    "PUSH_REFUSED",
    "EventLoop",
    "PushRefusedError",
    "numeric_metrics",
    "simulated_duration",
    "train_update",
]
