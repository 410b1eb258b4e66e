"""Checks on client replies before anything is aggregated: a malformed update is rejected."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from florist.client.protocol import TrainReport

# Defined with the task, which the ClientApp writes by; re-exported for the server.
from florist.client.task import NODE_CONFIG_KEY as NODE_CONFIG_KEY

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
WEIGHT_KEY = TrainReport.key("num_examples")  # an update's weight


def check_train_reply(
    content: RecordDict, reference: Mapping[str, np.ndarray], max_examples: int = 10**9
) -> str | None:
    """Why a training reply must not be aggregated, or None when it is sound.

    ``reference`` is the global model the round sent: a sound update has the same keys,
    shapes and dtypes, only finite values, and a positive example count.
    """
    arrays = content.array_records.get(ARRAYS_KEY)
    metrics = content.metric_records.get(METRICS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"reply has no ArrayRecord {ARRAYS_KEY!r}"
    if not isinstance(metrics, MetricRecord):
        return f"reply has no MetricRecord {METRICS_KEY!r}"
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return f"metric {WEIGHT_KEY!r} missing or not a number"
    if not (0 < weight <= max_examples) or not math.isfinite(weight):
        return f"metric {WEIGHT_KEY!r} = {weight} is out of range"
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"metric {key!r} is not finite"
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference) - set(arrays))
        extra = sorted(set(arrays) - set(reference))
        return f"arrays do not match the model: missing {missing}, unexpected {extra}"
    for key, ref in reference.items():
        try:
            got = arrays[key].numpy()
        except Exception as exc:  # a corrupt buffer must reject the update, not crash the round
            return f"array {key!r} cannot be decoded: {exc}"
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return (
                f"array {key!r} has shape {got.shape} {got.dtype}, expected {ref.shape} {ref.dtype}"
            )
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            return f"array {key!r} holds NaN or infinite values"
    return None
