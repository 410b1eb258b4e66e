"""Names of the centralized metrics every round records, and the rule that picks the best round."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

# On the dataset's test split: reported, never used to choose anything.
ACCURACY = "accuracy"
LOSS = "loss"
# On the validation split (carved from the training side): what rounds and settings are chosen on.
VAL_PREFIX = "val-"
VAL_ACCURACY = VAL_PREFIX + ACCURACY
VAL_LOSS = VAL_PREFIX + LOSS

BestBy = Literal["validation", "last-round"]


def metric(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    """``metrics[name]`` as a float, or None if it is missing or not a finite number."""
    value = (metrics or {}).get(name)
    # bool is an int; NaN and infinities never compare as best.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def best_round(rounds: Sequence[Mapping[str, Any] | None]) -> tuple[int, BestBy] | None:
    """The index of the best of ``rounds`` (each a round's metrics, oldest first) and the rule
    that chose it.

    The best round is the one with the highest ``val-accuracy``, the earliest on a tie (it got
    there first). Rounds recorded before the validation split existed carry none; if no round
    does, the last round with a test ``accuracy`` stands in ("last-round"): choosing the round
    with the highest test accuracy would tune on the test split. None if no round has either.
    """
    best: tuple[int, float] | None = None
    for index, metrics in enumerate(rounds):
        value = metric(metrics, VAL_ACCURACY)
        if value is not None and (best is None or value > best[1]):
            best = (index, value)
    if best is not None:
        return best[0], "validation"
    for index in reversed(range(len(rounds))):
        if metric(rounds[index], ACCURACY) is not None:
            return index, "last-round"
    return None
