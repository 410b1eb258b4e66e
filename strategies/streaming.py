"""Running weighted sums: aggregation as updates arrive, in one model's memory.

A weighted mean Σ w_i·x_i / Σ w_i needs only the running sum and the running weight, so an
aggregator whose rule is such a mean (FedAvg and its kin, FedBuff's buffer) folds each update in
when it arrives and lets it go, instead of holding every client's arrays until the round closes.

The accumulators are kept in each array's own floating dtype (float32 for a float32 model;
integer arrays in float64). Why not float64 for float32 models: the fold is memory-bound, and a
float64 accumulator moves 20 bytes per parameter and update against 12 for float32 — measured
here, about a third of a plain copy's bandwidth against about two thirds
(benchmarks/aggregation.py) — and takes two models' memory instead of one. The price is
float32's: the sum's last bits depend on the order the updates came in (an N-term sum is within
about N·2⁻²⁴ relative error either way), as Flower's own float32 aggregation depends on the
order of its replies. On the virtual clock arrivals come in a deterministic order, so a seeded
run stays repeatable bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]

# Elements per step of a fold: the product w·x is formed in a scratch buffer this big (256 KiB
# of float32, well inside L2), so the fold needs no model-sized temporary.
CHUNK = 1 << 16


class RunningSum:
    """Σ w_i·x_i and Σ w_i over the updates folded in so far, one accumulator per array."""

    def __init__(self) -> None:
        self.sums: Weights = {}
        self.total = 0.0
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def _check(self, arrays: Mapping[str, np.ndarray], *others: Mapping[str, np.ndarray]) -> None:
        """Refuse, before anything is folded, what does not fit: an update either enters the
        sum whole or not at all (the caller then rejects it)."""
        keys = set(arrays)
        if self.sums and keys != set(self.sums):
            raise ValueError(
                f"update arrays {sorted(keys)} are not the running sum's {sorted(self.sums)}"
            )
        for other in others:
            if set(other) != keys:
                raise ValueError(f"arrays {sorted(other)} do not match {sorted(keys)}")
        for key, value in arrays.items():
            shape = self.sums[key].shape if key in self.sums else value.shape
            if value.shape != shape or any(o[key].shape != shape for o in others):
                raise ValueError(f"array {key!r}: shape {value.shape}, expected {shape}")

    def add(
        self,
        arrays: Mapping[str, np.ndarray],
        weight: float,
        *,
        minus: Mapping[str, np.ndarray] | None = None,
        plus: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Fold ``weight``·(arrays − minus + plus) in (``minus``/``plus`` optional, same keys):
        a model (FedAvg), a delta x − x_sent (FedBuff), or a late delta moved onto the current
        model, x − x_sent + x (a stale update)."""
        if not np.isfinite(weight):
            raise ValueError(f"weight {weight} is not finite")
        self._check(arrays, *(m for m in (minus, plus) if m is not None))
        for key, value in arrays.items():
            acc = self.sums.get(key)
            if acc is None:
                acc = self.sums[key] = np.zeros(value.shape, _accumulator_dtype(value.dtype))
            _fold(
                acc.reshape(-1),
                np.ravel(value),
                weight,
                None if minus is None else np.ravel(minus[key]),
                None if plus is None else np.ravel(plus[key]),
            )
        self.total += float(weight)
        self.count += 1

    def absorb(self, other: RunningSum) -> None:
        """Add another running sum into this one (a round's late updates into its fresh ones)."""
        if not other:
            return
        self._check(other.sums)
        for key, value in other.sums.items():
            if key in self.sums:
                self.sums[key] += value
            else:
                self.sums[key] = value.copy()
        self.total += other.total
        self.count += other.count

    def mean(
        self, dtypes: Mapping[str, np.dtype] | None = None, *, divide_by: float | None = None
    ) -> Weights:
        """Σ w_i·x_i / Σ w_i (or / ``divide_by``), divided in place so that the sum is spent,
        cast to ``dtypes`` if given."""
        if not self:
            raise ValueError("no update was folded in")
        divisor = self.total if divide_by is None else float(divide_by)
        if divisor == 0:
            raise ValueError("the updates' weights sum to zero")
        out: Weights = {}
        for key, acc in self.sums.items():
            acc /= divisor
            dtype = dtypes[key] if dtypes is not None else acc.dtype
            out[key] = acc.astype(dtype, copy=False)
        self.sums, self.total, self.count = {}, 0.0, 0
        return out

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.sums.values())


def _accumulator_dtype(dtype: np.dtype) -> np.dtype:
    # Floating arrays in their own precision (see the module docstring); integer arrays (e.g. a
    # BatchNorm's batch counter) in float64, as Flower's mean of them comes out.
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _fold(
    acc: np.ndarray,
    x: np.ndarray,
    weight: float,
    minus: np.ndarray | None,
    plus: np.ndarray | None,
) -> None:
    scratch = np.empty(min(CHUNK, acc.size), acc.dtype)
    w = acc.dtype.type(weight)
    for start in range(0, acc.size, CHUNK):
        end = min(start + CHUNK, acc.size)
        part = x[start:end]
        if minus is not None:
            # x − x_sent in the update's own dtype, as Arrival.delta computes it.
            part = part - minus[start:end]
        if plus is not None:
            part = part + plus[start:end]
        tmp = scratch[: end - start]
        np.multiply(part, w, out=tmp, casting="unsafe")
        acc[start:end] += tmp
