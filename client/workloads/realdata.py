"""The shared half of the real-data workloads: where a local copy is, its validation carve-out,
partitions and node-local files, every file parsed once per path."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field
from torch import nn

from florist.client.models import AnyModelSpec, build_model
from florist.datasets import XY, DatasetInfo, InputRange, holdout_indices, partition_indices
from florist.datasets.files import DataFileError, Split, UserSplit, read_csv, read_npz
from florist.datasets.loaders import VALIDATION_STREAM
from florist.datasets.seeds import derive_seed
from florist.datasets.spec import VALIDATION_FRACTION, NaturalPartitioner, PartitionerSpec

from . import ClientData, WorkloadConfig, WorkloadDataError, WorkloadPlugin

DATA_DIR_ENV = "FLORIST_DATA_DIR"
# Parsed files and carve-outs kept per path: a few datasets, each read once per process.
_READ_CACHE_SIZE = 8
_PARTITION_CACHE_SIZE = 32


def default_data_dir(name: str) -> Path:
    """``$FLORIST_DATA_DIR/<name>`` if that is set, else ``~/.florist/data/<name>``."""
    root = os.environ.get(DATA_DIR_ENV)
    return (Path(root) if root else Path.home() / ".florist" / "data") / name


class RealDataConfig(WorkloadConfig):
    """Settings every real-data workload has; each adds its ``partitioner`` and ``model``."""

    data_dir: str | None = Field(
        default=None,
        description="Folder of the dataset's local copy (docs/datasets.md). Default: "
        "$FLORIST_DATA_DIR/<workload> if FLORIST_DATA_DIR is set, else ~/.florist/data/<workload>"
        " (resolved where the data is read). A node started with data-path reads its own folder "
        "instead.",
    )
    seed: int = Field(default=0, ge=0, description="Seeds the validation carve-out and partitions.")
    validation_fraction: float = Field(
        default=VALIDATION_FRACTION,
        ge=0,
        lt=1,
        description="Share of the training files held out (stratified by label, or by user where "
        "the data has users) as the server's validation split; partitions are cut from the rest.",
    )
    if TYPE_CHECKING:
        # Declared by every workload with its own choices and default.
        partitioner: PartitionerSpec
        model: AnyModelSpec

    def folder(self, name: str) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir(name)


@dataclass(frozen=True, eq=False)
class RealDataset:
    """One on-disk dataset: how to read a split of a folder, and what it looks like.

    ``read(folder, split, full)``: ``full`` is True for the shared copy (every file of the
    official release required) and False for a node's own folder (the files it has).
    """

    name: str
    info: DatasetInfo
    read: Callable[[Path, Split, bool], UserSplit]
    expected: str  # the files a folder must hold, for error messages
    # Pixel data: integers in 0..255 from a node's npz/CSV are scaled to [0, 1].
    images: bool = True


@contextmanager
def data_errors() -> Iterator[None]:
    """Reader errors as the workload contract's WorkloadDataError (the node reports it)."""
    try:
        yield
    except DataFileError as exc:
        raise WorkloadDataError(str(exc)) from exc


@dataclass(frozen=True)
class _Shared:
    train: XY
    validation: XY
    # User id of every training example (index into user_names); None without users.
    train_groups: np.ndarray | None
    user_names: np.ndarray | None


Stamp = tuple[int, int]


def _stamp(folder: Path) -> Stamp:
    """How many entries the folder and its subfolders (two levels: LEAF's train/ and test/,
    cifar-10-batches-py/) hold and their latest modification: part of every cache key, so a copy
    replaced on disk is read again."""
    latest, count = 0, 0
    level = [folder]
    for depth in range(3):
        below: list[Path] = []
        for path in level:
            try:
                stat = path.stat()
                # Not below the files' level: a folder such as LEAF's raw_data/ is large.
                if depth < 2 and path.is_dir():
                    below += path.iterdir()
            except OSError:
                continue
            latest, count = max(latest, stat.st_mtime_ns), count + 1
        level = below
    return latest, count


@lru_cache(maxsize=_READ_CACHE_SIZE)
def _read(dataset: RealDataset, folder: Path, split: Split, full: bool, stamp: Stamp) -> UserSplit:
    with data_errors():
        if not folder.exists():
            raise DataFileError(f"{folder} does not exist; put {dataset.expected} there")
        read = _read_node_file(dataset, folder, split) if not full else None
        result = read if read is not None else dataset.read(folder, split, full)
    for arr in (result.data.x, result.data.y, result.users):
        if arr is not None:
            arr.flags.writeable = False
    return result


def _read_node_file(dataset: RealDataset, folder: Path, split: Split) -> UserSplit | None:
    """A node's ``<split>.npz`` or ``<split>.csv`` (generic formats), if it has one."""
    for path, reader in ((folder / f"{split}.npz", read_npz), (folder / f"{split}.csv", read_csv)):
        if path.is_file():
            data = _fit(reader(path), dataset, path)
            return UserSplit(data=data)
    return None


def _fit(data: XY, dataset: RealDataset, path: Path) -> XY:
    """Generic arrays shaped and scaled as the dataset's own reader gives them."""
    shape = dataset.info.input_shape
    per_example = math.prod(data.x.shape[1:])
    if per_example != math.prod(shape):
        raise DataFileError(
            f"{path}: each example has {per_example} values; {dataset.name} needs {shape}"
        )
    x = data.x.reshape(-1, *shape)
    if x.size and dataset.images and (x.min() < 0 or x.max() > 1):
        if x.min() < 0 or x.max() > 255 or np.any(np.mod(x, 1)):
            raise DataFileError(f"{path}: pixel values must be in [0, 1] (or integers 0..255)")
        x = x / np.float32(255.0)  # 8-bit pixels
    vocab = dataset.info.num_classes  # next-token data: the targets are tokens too
    if x.size and not dataset.images and (np.any(np.mod(x, 1)) or x.min() < 0 or x.max() >= vocab):
        raise DataFileError(f"{path}: x must hold integer token ids in 0..{vocab - 1}")
    if data.y.size and data.y.max() >= dataset.info.num_classes:
        raise DataFileError(
            f"{path}: label {data.y.max()} >= {dataset.name}'s {dataset.info.num_classes} classes"
        )
    return XY(x=x.astype(np.float32), y=data.y, input_range=_range(dataset))


def _range(dataset: RealDataset) -> InputRange:
    return (0.0, 1.0) if dataset.images else None


@lru_cache(maxsize=_READ_CACHE_SIZE)
def _shared(
    dataset: RealDataset, folder: Path, stamp: Stamp, seed: int, fraction: float
) -> _Shared:
    # Not through _read's cache: the carved-out copies below are what is kept.
    full = _read.__wrapped__(dataset, folder, "train", True, stamp)
    train = full.data
    names, groups = None, None
    if full.users is not None:
        names, groups = np.unique(full.users, return_inverse=True)
        groups = groups.astype(np.int64)
    strata = groups if groups is not None else train.y
    # The same stream as the built-in datasets' validation split (datasets/loaders.py).
    val_idx = holdout_indices(strata, fraction, derive_seed(seed, VALIDATION_STREAM))
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    rng = _range(dataset)
    shared = _Shared(
        train=XY(train.x[keep], train.y[keep], rng),
        validation=XY(train.x[val_idx], train.y[val_idx], rng),
        train_groups=groups[keep] if groups is not None else None,
        user_names=names,
    )
    for arr in (shared.train.x, shared.train.y, shared.validation.x, shared.validation.y):
        arr.flags.writeable = False
    return shared


@lru_cache(maxsize=_PARTITION_CACHE_SIZE)
def _partitions(
    dataset: RealDataset,
    folder: Path,
    stamp: Stamp,
    seed: int,
    fraction: float,
    partitioner: PartitionerSpec,
    num_partitions: int,
) -> tuple[np.ndarray, ...]:
    shared = _shared(dataset, folder, stamp, seed, fraction)
    try:
        parts = partition_indices(
            shared.train.y, num_partitions, partitioner, seed, groups=shared.train_groups
        )
    except ValueError as exc:
        raise WorkloadDataError(f"{dataset.name} at {folder}: {exc}") from exc
    return tuple(parts)


def _copy(data: XY) -> XY:
    # Callers get their own arrays: the cached ones are read-only and shared.
    return XY(x=data.x.copy(), y=data.y.copy(), input_range=data.input_range)


def load_train(dataset: RealDataset, config: RealDataConfig, client: ClientData) -> XY:
    """A node's own training files (``data-path``, all of them), else its partition of the
    shared copy's training side."""
    if client.data_path is not None:
        path = client.require_path(dataset.name)
        return _copy(_read(dataset, path, "train", False, _stamp(path)).data)
    pid, num = client.require_partition(dataset.name)
    folder = config.folder(dataset.name)
    stamp = _stamp(folder)
    shared = _shared(dataset, folder, stamp, config.seed, config.validation_fraction)
    idx = _partitions(
        dataset, folder, stamp, config.seed, config.validation_fraction, config.partitioner, num
    )[pid]
    return XY(x=shared.train.x[idx], y=shared.train.y[idx], input_range=_range(dataset))


def load_test(dataset: RealDataset, config: RealDataConfig) -> XY:
    """The shared copy's test files (the server's held-out split)."""
    folder = config.folder(dataset.name)
    return _copy(_read(dataset, folder, "test", True, _stamp(folder)).data)


def load_validation(dataset: RealDataset, config: RealDataConfig) -> XY:
    """The validation carve-out of the shared copy's training files."""
    folder = config.folder(dataset.name)
    shared = _shared(dataset, folder, _stamp(folder), config.seed, config.validation_fraction)
    return _copy(shared.validation)


def load_local_test(dataset: RealDataset, config: RealDataConfig, client: ClientData) -> XY:
    """A node's own test files, else its share of the shared test split: the test examples of
    its users under the natural split, every ``num``-th example otherwise."""
    if client.data_path is not None:
        path = client.require_path(dataset.name)
        return _copy(_read(dataset, path, "test", False, _stamp(path)).data)
    pid, num = client.require_partition(dataset.name)
    folder = config.folder(dataset.name)
    stamp = _stamp(folder)
    test = _read(dataset, folder, "test", True, stamp)
    shared = _shared(dataset, folder, stamp, config.seed, config.validation_fraction)
    natural = isinstance(config.partitioner, NaturalPartitioner)
    if natural and shared.user_names is not None and test.users is not None:
        names = shared.user_names
        at = np.clip(np.searchsorted(names, test.users), 0, len(names) - 1)
        known = names[at] == test.users
        # A user only in the test files gets an id after the training users'.
        _, unknown_rank = np.unique(test.users[~known], return_inverse=True)
        ids = at.astype(np.int64)
        ids[~known] = len(names) + unknown_rank
        mine = np.flatnonzero(ids % num == pid)
    else:
        mine = np.arange(pid, len(test.data), num)
    return XY(x=test.data.x[mine], y=test.data.y[mine], input_range=_range(dataset))


def plugin(
    dataset: RealDataset, summary: str, config_model: type[RealDataConfig], tags: tuple[str, ...]
) -> WorkloadPlugin:
    """The workload plugin reading ``dataset``."""

    def model(config: RealDataConfig) -> nn.Module:
        return build_model(config.model, dataset.info)

    return WorkloadPlugin(
        name=dataset.name,
        summary=summary,
        config_model=config_model,
        build_model=model,
        load_train=lambda config, client: load_train(dataset, config, client),
        load_test=lambda config: load_test(dataset, config),
        load_validation=lambda config: load_validation(dataset, config),
        load_local_test=lambda config, client: load_local_test(dataset, config, client),
        input_range=lambda config: _range(dataset),
        tags=("real-data", *tags),
    )
