"""Load a dataset spec's train, validation and test splits and client partitions, cached."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import assert_never

import numpy as np
from pydantic import TypeAdapter

from florist.datasets.partition import holdout_indices, partition_indices
from florist.datasets.seeds import derive_seed
from florist.datasets.spec import DatasetSpec, DigitsSpec, SyntheticSpec

_DATASET_ADAPTER: TypeAdapter[DigitsSpec | SyntheticSpec] = TypeAdapter(DatasetSpec)

# One user seed drives both data generation and partitioning; separate streams keep the two
# draws independent of each other.
_DATA_STREAM = 0
# Names the validation split's stream: derive_seed(spec.seed, VALIDATION_STREAM).
VALIDATION_STREAM = "validation"
_SPLIT_CACHE_SIZE = 16
_PARTITION_CACHE_SIZE = 64


# (low, high): every feature of every example lies in [low, high]; None: no such bound.
InputRange = tuple[float, float] | None


@dataclass(frozen=True)
class DatasetInfo:
    """What a model or an attack needs to know about a dataset: one example's shape, the number
    of classes, and the valid input range (None for unbounded data such as ``synthetic``)."""

    input_shape: tuple[int, ...]
    num_classes: int
    input_range: InputRange = None


@dataclass(frozen=True)
class XY:
    """Examples ``x`` (float32, shape (n, *input_shape)) and integer labels ``y`` (int64, (n,)).

    ``input_range`` is the dataset's valid input range (:attr:`DatasetInfo.input_range`), carried
    with the arrays so that code handed only the data (an attack's projection) can respect it.
    The loaders set it; None means unbounded, or unknown for arrays built by hand.
    """

    x: np.ndarray
    y: np.ndarray
    input_range: InputRange = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class _Split:
    # train: what the clients' partitions are cut from; validation: carved from the training
    # side before that, so no client ever trains on it; test: held out, for reporting only.
    train: XY
    validation: XY
    test: XY
    # Device id of each training example, for the natural partitioner; None if the dataset has none.
    train_groups: np.ndarray | None


def dataset_info(spec: DatasetSpec) -> DatasetInfo:
    """Input shape and class count of ``spec``'s dataset, without loading it."""
    match spec:
        case DigitsSpec():
            # Pixels are scaled from [0, 16] to [0, 1] (see _digits).
            return DatasetInfo(input_shape=(1, 8, 8), num_classes=10, input_range=(0.0, 1.0))
        case SyntheticSpec():
            # Gaussian features: no bound.
            return DatasetInfo(input_shape=(spec.num_features,), num_classes=spec.num_classes)
        case _:
            assert_never(spec)


def data_extent(spec: DatasetSpec) -> tuple[float, float]:
    """The smallest and largest feature value over the train, validation and test splits."""
    split = _split(spec)
    values = [a for a in (split.train.x, split.validation.x, split.test.x) if a.size]
    return float(min(a.min() for a in values)), float(max(a.max() for a in values))


def load_partition(spec: DatasetSpec, partition_id: int, num_partitions: int) -> XY:
    """The training examples of client ``partition_id`` out of ``num_partitions``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    train = _split(spec).train
    idx = _partitions(spec.model_dump_json(), num_partitions)[partition_id]
    return XY(x=train.x[idx], y=train.y[idx], input_range=dataset_info(spec).input_range)


def load_test(spec: DatasetSpec) -> XY:
    """The held-out test split; for server-side evaluation only, never for training."""
    return _copy(_split(spec).test, spec)


def load_validation(spec: DatasetSpec) -> XY:
    """The validation split, carved from the training side (``validation_fraction``) and in no
    partition: rounds and settings are chosen on it. Empty if ``validation_fraction`` is 0."""
    return _copy(_split(spec).validation, spec)


def load_train(spec: DatasetSpec) -> XY:
    """The training split the clients share (the union of all partitions; the validation split
    is not part of it), for centralized baselines."""
    return _copy(_split(spec).train, spec)


def _copy(data: XY, spec: DatasetSpec) -> XY:
    # Callers get their own arrays: the cached ones are read-only and shared.
    return XY(x=data.x.copy(), y=data.y.copy(), input_range=dataset_info(spec).input_range)


def _split(spec: DatasetSpec) -> _Split:
    # The partitioner does not change the data, so specs that differ only there share one entry.
    return _split_cached(spec.model_dump_json(exclude={"partitioner"}))


@lru_cache(maxsize=_SPLIT_CACHE_SIZE)
def _split_cached(data_key: str) -> _Split:
    spec = _DATASET_ADAPTER.validate_json(data_key)
    match spec:
        case DigitsSpec():
            split = _digits(spec)
        case SyntheticSpec():
            split = _synthetic(spec)
        case _:
            assert_never(spec)
    split = _carve_validation(split, spec)
    arrays = (split.train, split.validation, split.test)
    for arr in [a for xy in arrays for a in (xy.x, xy.y)] + [split.train_groups]:
        if arr is not None:
            arr.flags.writeable = False
    return split


def _carve_validation(split: _Split, spec: DigitsSpec | SyntheticSpec) -> _Split:
    """Move ``validation_fraction`` of each stratum of the training side into the validation
    split: strata are devices where the dataset has them (so that validation covers every
    device, as the test split does), labels otherwise. Every stratum keeps at least one training
    example (see :func:`holdout_indices`), so no device or class the partitioners rely on
    disappears."""
    train = split.train
    strata = split.train_groups if split.train_groups is not None else train.y
    # Its own stream: the test split and the data are drawn exactly as before validation existed.
    seed = derive_seed(spec.seed, VALIDATION_STREAM)
    val_idx = holdout_indices(strata, spec.validation_fraction, seed)
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    groups = split.train_groups[keep] if split.train_groups is not None else None
    return _Split(
        train=XY(train.x[keep], train.y[keep]),
        validation=XY(train.x[val_idx], train.y[val_idx]),
        test=split.test,
        train_groups=groups,
    )


@lru_cache(maxsize=_PARTITION_CACHE_SIZE)
def _partitions(spec_key: str, num_partitions: int) -> tuple[np.ndarray, ...]:
    spec = _DATASET_ADAPTER.validate_json(spec_key)
    split = _split(spec)
    parts = partition_indices(
        split.train.y, num_partitions, spec.partitioner, spec.seed, groups=split.train_groups
    )
    return tuple(parts)


def _digits(spec: DigitsSpec) -> _Split:
    # Imported here: scikit-learn takes most of a second to import, and the server and CLI import
    # this package for the specs alone.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are integers in [0, 16].
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=spec.test_fraction, random_state=spec.seed, stratify=y
    )
    empty = XY(x_train[:0], y_train[:0])
    return _Split(
        train=XY(x_train, y_train), validation=empty, test=XY(x_test, y_test), train_groups=None
    )


def _synthetic(spec: SyntheticSpec) -> _Split:
    rng = np.random.default_rng([spec.seed, _DATA_STREAM])
    d, c = spec.num_features, spec.num_classes
    feature_std = np.arange(1, d + 1, dtype=np.float64) ** (-1.2 / 2)
    sizes = rng.lognormal(spec.samples_mean, spec.samples_sigma, spec.num_devices).astype(np.int64)
    sizes = np.minimum(sizes + spec.min_samples, spec.max_samples)
    train_x, train_y, train_g, test_x, test_y = [], [], [], [], []
    for device, n in enumerate(sizes):
        u = rng.normal(0.0, spec.alpha)
        w = rng.normal(u, 1.0, size=(c, d))
        b = rng.normal(u, 1.0, size=c)
        v = rng.normal(rng.normal(0.0, spec.beta), 1.0, size=d)
        x = v + rng.standard_normal((n, d)) * feature_std
        # softmax is monotone, so the argmax of the logits is the argmax of the probabilities.
        y = np.argmax(x @ w.T + b, axis=1)
        # Keep at least one training example per device so every device can be a client.
        n_test = min(round(n * spec.test_fraction), n - 1)
        order = rng.permutation(n)
        test, train = order[:n_test], order[n_test:]
        train_x.append(x[train])
        train_y.append(y[train])
        train_g.append(np.full(len(train), device, dtype=np.int64))
        test_x.append(x[test])
        test_y.append(y[test])
    return _Split(
        train=XY(
            np.concatenate(train_x).astype(np.float32), np.concatenate(train_y).astype(np.int64)
        ),
        validation=XY(np.empty((0, d), np.float32), np.empty(0, np.int64)),
        test=XY(np.concatenate(test_x).astype(np.float32), np.concatenate(test_y).astype(np.int64)),
        train_groups=np.concatenate(train_g),
    )
