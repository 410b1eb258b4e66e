"""Pure functions that cut an array of labels into client partitions (or a hold-out) of indices."""

from __future__ import annotations

from typing import assert_never

import numpy as np
import numpy.typing as npt

from florist.datasets.spec import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    PartitionerSpec,
    QuantitySkewPartitioner,
    ShardsPartitioner,
)

Indices = npt.NDArray[np.int64]

# Enough for any feasible setting in practice (each try is one pass over the labels); a setting
# that still fails is effectively infeasible and deserves an error, not an endless loop.
DIRICHLET_MAX_TRIES = 1000


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    spec: PartitionerSpec,
    seed: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_partitions`` disjoint, non-empty, sorted index sets.

    Every index lands in exactly one partition. The result depends only on the arguments
    (``seed`` feeds ``np.random.default_rng``). ``groups`` holds per-example device ids and is
    required by the natural partitioner only.

    Raises
    ------
    ValueError
        For settings that cannot be met (fewer examples than partitions, too many shards, a
        natural split without device ids, ...).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(labels) < num_partitions:
        raise ValueError(
            f"cannot cut {len(labels)} examples into {num_partitions} non-empty partitions"
        )
    rng = np.random.default_rng(seed)
    match spec:
        case IidPartitioner():
            parts = np.array_split(rng.permutation(len(labels)), num_partitions)
        case DirichletPartitioner():
            parts = _dirichlet(labels, num_partitions, spec, rng)
        case ShardsPartitioner():
            parts = _shards(labels, num_partitions, spec.classes_per_partition, rng)
        case QuantitySkewPartitioner():
            parts = _quantity_skew(len(labels), num_partitions, spec, rng)
        case NaturalPartitioner():
            parts = _natural(len(labels), num_partitions, groups)
        case _:
            assert_never(spec)
    return [np.sort(p).astype(np.int64) for p in parts]


def holdout_indices(strata: np.ndarray, fraction: float, seed: int) -> Indices:
    """The sorted indices of a seeded, stratified hold-out: ``round(n * fraction)`` examples
    drawn at random from each stratum of ``n`` examples, but never all of them, so that every
    stratum (a device, a class) keeps at least one example on the other side."""
    strata = np.asarray(strata)
    if strata.ndim != 1:
        raise ValueError(f"strata must be 1-D, got shape {strata.shape}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = [np.empty(0, dtype=np.int64)]
    for stratum in np.unique(strata):
        idx = np.flatnonzero(strata == stratum)
        size = min(round(len(idx) * fraction), len(idx) - 1)
        held.append(rng.permutation(idx)[:size])
    return np.sort(np.concatenate(held)).astype(np.int64)


def _dirichlet(
    labels: np.ndarray, num_partitions: int, spec: DirichletPartitioner, rng: np.random.Generator
) -> list[Indices]:
    # Empty partitions are never returned, whatever min_partition_size says.
    min_size = max(spec.min_partition_size, 1)
    if len(labels) < num_partitions * min_size:
        raise ValueError(
            f"dirichlet: {len(labels)} examples cannot give {num_partitions} partitions"
            f" min_partition_size={min_size} each"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_MAX_TRIES):
        chunks: list[list[Indices]] = [[] for _ in range(num_partitions)]
        for idx in by_class:
            proportions = rng.dirichlet(np.full(num_partitions, spec.alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for part, chunk in zip(chunks, np.split(rng.permutation(idx), cuts), strict=True):
                part.append(chunk)
        parts = [np.concatenate(c) for c in chunks]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"dirichlet: no draw in {DIRICHLET_MAX_TRIES} tries gave all {num_partitions} partitions"
        f" >= {min_size} examples (alpha={spec.alpha},"
        f" {len(labels)} examples); raise alpha, lower min_partition_size or use fewer partitions"
    )


def _shards(
    labels: np.ndarray, num_partitions: int, per_partition: int, rng: np.random.Generator
) -> list[Indices]:
    classes, counts = np.unique(labels, return_counts=True)
    num_shards = num_partitions * per_partition
    if num_shards > len(labels):
        raise ValueError(
            f"shards: {num_partitions} partitions x {per_partition} shards = {num_shards} shards"
            f" but only {len(labels)} examples"
        )
    # Shards are cut inside one class (unlike cutting the sorted labels in equal runs, where a
    # shard can straddle two classes); that is what makes "at most k classes" hold, and it needs
    # at least one shard per class or some examples would belong to no shard.
    if num_shards < len(classes):
        raise ValueError(
            f"shards: {num_partitions} partitions x {per_partition} shards = {num_shards} shards"
            f" cannot cover {len(classes)} classes; raise classes_per_partition or num_partitions"
        )
    per_class = _shards_per_class(counts, num_shards)
    shards: list[Indices] = []
    for c, k in zip(classes, per_class, strict=True):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), k))
    order = rng.permutation(num_shards).reshape(num_partitions, per_partition)
    return [np.concatenate([shards[s] for s in row]) for row in order]


def _shards_per_class(counts: np.ndarray, num_shards: int) -> np.ndarray:
    """One shard per class, the rest by largest remainder in proportion to class size."""
    per_class = np.ones(len(counts), dtype=np.int64)
    extra = num_shards - len(counts)
    if extra > 0:
        quota = counts / counts.sum() * extra
        per_class += np.floor(quota).astype(np.int64)
        short = num_shards - per_class.sum()
        per_class[np.argsort(-(quota - np.floor(quota)), kind="stable")[:short]] += 1
    # A class cannot have more (non-empty) shards than examples; hand the surplus to classes
    # that still have room. Feasible because num_shards <= len(labels).
    surplus = int(np.maximum(per_class - counts, 0).sum())
    per_class = np.minimum(per_class, counts)
    while surplus > 0:
        room = np.flatnonzero(per_class < counts)
        take = min(surplus, len(room))
        per_class[room[:take]] += 1
        surplus -= take
    return per_class


def _quantity_skew(
    n: int, num_partitions: int, spec: QuantitySkewPartitioner, rng: np.random.Generator
) -> list[Indices]:
    floor = spec.min_partition_size * num_partitions
    if n < floor:
        raise ValueError(
            f"quantity_skew: {n} examples cannot give {num_partitions} partitions"
            f" min_partition_size={spec.min_partition_size} each"
        )
    # Guarantee the minimum by construction instead of resampling, which for small alpha would
    # reject most draws.
    proportions = rng.dirichlet(np.full(num_partitions, spec.alpha))
    sizes = spec.min_partition_size + rng.multinomial(n - floor, proportions)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _natural(n: int, num_partitions: int, groups: np.ndarray | None) -> list[Indices]:
    if groups is None:
        raise ValueError(
            "natural: this dataset has no per-device split; use 'iid', 'dirichlet', 'shards' or"
            " 'quantity_skew'"
        )
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"natural: groups must have shape ({n},), got {groups.shape}")
    slot = groups % num_partitions
    parts = [np.flatnonzero(slot == p) for p in range(num_partitions)]
    empty = [p for p, idx in enumerate(parts) if len(idx) == 0]
    if empty:
        raise ValueError(
            f"natural: partitions {empty} get no device ({len(np.unique(groups))} devices for"
            f" {num_partitions} partitions); use fewer partitions or more devices"
        )
    return parts
