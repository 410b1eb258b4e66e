"""Hand-made updates for tests of the asynchronous server rules."""

from __future__ import annotations

import numpy as np

from florist.strategies.events import Arrival, Weights


def vec(*values: float) -> Weights:
    return {"w": np.array(values, dtype=np.float64)}


def arrival(
    node: int, x: Weights, sent: Weights, sent_version: int, version: int, n: int = 10
) -> Arrival:
    return Arrival(
        node_id=node,
        weights=x,
        sent_weights=sent,
        sent_version=sent_version,
        version=version,
        num_examples=n,
        local_steps=1,
        metrics={},
        duration_s=1.0,
    )
