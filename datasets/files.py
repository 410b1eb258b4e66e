"""Readers for datasets people keep on disk: IDX (MNIST), CIFAR-10 pickles, LEAF JSON, npz, CSV."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from florist.datasets.loaders import XY

Split = Literal["train", "test"]

# Pixels are scaled from 8-bit integers to [0, 1].
PIXEL_RANGE = (0.0, 1.0)

# IDX: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
# dimension. Type codes from the format's definition (LeCun's MNIST page).
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# MNIST and Fashion-MNIST share file names and sizes.
MNIST_FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_SHAPE = (1, 28, 28)

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_SHAPE = (3, 32, 32)

FEMNIST_PIXELS = 28 * 28
FEMNIST_CLASSES = 62  # 10 digits, 26 upper-case and 26 lower-case letters
# LEAF's Shakespeare vocabulary: a character's id is its position in this string.
SHAKESPEARE_VOCAB = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
SHAKESPEARE_SEQ_LEN = 80
_CHAR_ID = {c: i for i, c in enumerate(SHAKESPEARE_VOCAB)}


class DataFileError(ValueError):
    """A dataset file is missing or not in the expected format; the message names the path."""


@dataclass(frozen=True)
class UserSplit:
    """Examples with the LEAF user (writer, speaker) each one belongs to: ``users[i]`` is the
    name of the user of example ``i``; None for data without users."""

    data: XY
    users: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def find_file(folder: Path, name: str) -> Path:
    """``folder/name`` or, failing that, ``folder/name.gz``."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFileError(f"{folder / name}[.gz] does not exist")


def read_idx(path: Path) -> np.ndarray:
    """The array in an IDX file (gzipped if the name ends in ``.gz``), in native byte order."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataFileError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'}"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path} is truncated: its header needs {header} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFileError(
            f"{path} has {len(raw) - header} bytes of data but its header {shape} needs"
            f" {expected} (truncated or not an IDX file)"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def read_mnist(folder: Path, split: Split) -> XY:
    """MNIST or Fashion-MNIST ``split`` from its four IDX files in ``folder`` (each may be
    gzipped): images as float32 (n, 1, 28, 28) in [0, 1], labels int64 in 0..9."""
    _require_folder(folder, "an MNIST-format folder", mnist_expected())
    images_name, labels_name = MNIST_FILES[split]
    missing = [n for n in (images_name, labels_name) if not _exists_maybe_gz(folder / n)]
    if missing:
        raise DataFileError(
            f"{', '.join(f'{folder / n}[.gz]' for n in missing)} missing; an MNIST-format folder"
            f" holds {mnist_expected()}"
        )
    images_path = find_file(folder, images_name)
    labels_path = find_file(folder, labels_name)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != MNIST_SHAPE[1:] or images.dtype != np.uint8:
        raise DataFileError(
            f"{images_path} holds {images.dtype} {images.shape}, expected uint8 (n, 28, 28)"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataFileError(f"{labels_path} holds {labels.dtype} {labels.shape}, expected (n,)")
    if len(labels) != len(images):
        raise DataFileError(
            f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images"
        )
    _check_labels(labels, 10, labels_path)
    x = (images.astype(np.float32) / 255.0).reshape(-1, *MNIST_SHAPE)
    return XY(x=x, y=labels.astype(np.int64), input_range=PIXEL_RANGE)


def mnist_expected() -> str:
    return ", ".join(f"{n}[.gz]" for pair in MNIST_FILES.values() for n in pair)


def _exists_maybe_gz(path: Path) -> bool:
    return path.is_file() or path.with_name(f"{path.name}.gz").is_file()


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (the "python version")


def cifar10_folder(folder: Path) -> Path:
    """The folder holding the batch files: ``folder`` itself or its ``cifar-10-batches-py``."""
    nested = folder / CIFAR10_FOLDER
    return nested if nested.is_dir() else folder


def read_cifar10(folder: Path, split: Split, require_all: bool = True) -> XY:
    """CIFAR-10 ``split`` from the python-version batch files in ``folder`` (or in its
    ``cifar-10-batches-py``): images float32 (n, 3, 32, 32) in [0, 1], labels int64 in 0..9.

    ``require_all``: the training side needs all of ``data_batch_1..5`` (the full copy);
    otherwise the ``data_batch_*`` files present, at least one (a node's own share).
    """
    _require_folder(folder, "a CIFAR-10 folder", cifar10_expected())
    batches = cifar10_folder(folder)
    if split == "test":
        names: Sequence[str] = (CIFAR10_TEST_BATCH,)
    elif require_all:
        names = CIFAR10_TRAIN_BATCHES
    else:
        names = sorted(p.name for p in batches.glob("data_batch_*") if p.is_file())
    missing = [n for n in names if not (batches / n).is_file()] if names else ["data_batch_*"]
    if missing:
        raise DataFileError(
            f"{batches} lacks {', '.join(missing)}; a CIFAR-10 folder holds {cifar10_expected()}"
        )
    xs, ys = [], []
    for name in names:
        x, y = _read_cifar_batch(batches / name)
        xs.append(x)
        ys.append(y)
    x_all = (np.concatenate(xs).astype(np.float32) / 255.0).reshape(-1, *CIFAR10_SHAPE)
    return XY(x=x_all, y=np.concatenate(ys), input_range=PIXEL_RANGE)


def cifar10_expected() -> str:
    files = ", ".join((*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH))
    return f"{CIFAR10_FOLDER}/ with {files} (the CIFAR-10 python version)"


class _ArrayUnpickler(pickle.Unpickler):
    # The batches are pickles; unpickling runs whatever a pickle names, so only the names a
    # pickled numpy array needs are resolved, and anything else in the file is refused.
    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            # How a Python 3 pickle of protocol 2 spells a bytes object.
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 1 wrote it; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            # The official files were written by Python 2: strings are bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataFileError(f"{path} is not a CIFAR-10 batch (a pickled dict): {exc}") from exc
    if not isinstance(batch, dict):
        raise DataFileError(f"{path} holds a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFileError(f"{path} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != math.prod(CIFAR10_SHAPE):
        raise DataFileError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (n, 3072)")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {len(data)} images"
        )
    _check_labels(labels, 10, path)
    return data, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# LEAF JSON (FEMNIST, Shakespeare)


def read_leaf(folder: Path, split: Split) -> tuple[list[Any], list[Any], list[str]]:
    """The raw examples of a LEAF split: every ``folder/<split>/*.json`` (sorted by name) with
    ``users``, ``num_samples`` and ``user_data: {user: {"x": [...], "y": [...]}}``. Returns
    ``(x, y, user)``, one entry per example."""
    split_dir = folder / split
    files = sorted(split_dir.glob("*.json")) if split_dir.is_dir() else []
    if not files:
        raise DataFileError(f"{split_dir} has no *.json files; {leaf_expected()}")
    xs: list[Any] = []
    ys: list[Any] = []
    users: list[str] = []
    for path in files:
        try:
            with path.open("rb") as f:
                doc = json.load(f)
            names, counts, user_data = doc["users"], doc["num_samples"], doc["user_data"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DataFileError(
                f"{path} is not a LEAF data file ({leaf_expected()}): {exc!r}"
            ) from exc
        if len(names) != len(counts):
            raise DataFileError(f"{path}: {len(names)} users but {len(counts)} num_samples entries")
        try:
            per_user = [
                (u, c, user_data[u]["x"], user_data[u]["y"])
                for u, c in zip(names, counts, strict=True)
            ]
        except (KeyError, TypeError) as exc:
            raise DataFileError(f"{path}: user_data has no x and y for user {exc}") from exc
        for user, count, x, y in per_user:
            if not len(x) == len(y) == count:
                raise DataFileError(
                    f"{path}: user {user!r} has {len(x)} x, {len(y)} y, num_samples {count}"
                )
            xs.extend(x)
            ys.extend(y)
            users.extend([str(user)] * count)
    return xs, ys, users


def leaf_expected() -> str:
    return (
        "a LEAF folder holds train/*.json and test/*.json, each with 'users', 'num_samples' and"
        " 'user_data' (LEAF's preprocess.sh output, data/<dataset>/data/)"
    )


def read_femnist(folder: Path, split: Split) -> UserSplit:
    """FEMNIST in LEAF's JSON: images float32 (n, 1, 28, 28) in [0, 1], labels int64 in 0..61,
    and each example's writer."""
    xs, ys, users = read_leaf(folder, split)
    try:
        x = np.asarray(xs, dtype=np.float32).reshape(len(xs), -1)
        y = np.asarray(ys, dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise DataFileError(f"{folder / split}: FEMNIST x must be lists of numbers: {exc}") from exc
    if x.shape[1:] != (FEMNIST_PIXELS,) and len(xs):
        raise DataFileError(
            f"{folder / split}: FEMNIST images have {x.shape[1]} values, expected {FEMNIST_PIXELS}"
        )
    if x.size and (x.min() < 0 or x.max() > 1):
        raise DataFileError(f"{folder / split}: FEMNIST pixel values must lie in [0, 1]")
    _check_labels(y, FEMNIST_CLASSES, folder / split)
    data = XY(x=x.reshape(-1, 1, 28, 28), y=y, input_range=PIXEL_RANGE)
    return UserSplit(data=data, users=np.asarray(users, dtype=str))


def encode_chars(text: str, where: Path) -> np.ndarray:
    """The LEAF vocabulary ids of ``text``'s characters (int64)."""
    try:
        return np.fromiter((_CHAR_ID[c] for c in text), dtype=np.int64, count=len(text))
    except KeyError as exc:
        raise DataFileError(
            f"{where}: character {exc.args[0]!r} is not in LEAF's Shakespeare vocabulary"
        ) from exc


def read_shakespeare(folder: Path, split: Split) -> UserSplit:
    """Shakespeare in LEAF's JSON: x the int64 vocabulary ids of 80-character strings, shape
    (n, 80); y the id of the character that follows; and each example's speaker."""
    xs, ys, users = read_leaf(folder, split)
    where = folder / split
    x = np.empty((len(xs), SHAKESPEARE_SEQ_LEN), dtype=np.int64)
    y = np.empty(len(ys), dtype=np.int64)
    for i, (text, target) in enumerate(zip(xs, ys, strict=True)):
        if not isinstance(text, str) or len(text) != SHAKESPEARE_SEQ_LEN:
            raise DataFileError(
                f"{where}: example {i} x is not a string of {SHAKESPEARE_SEQ_LEN} characters"
            )
        if not isinstance(target, str) or len(target) != 1:
            raise DataFileError(f"{where}: example {i} y is not one character")
        x[i] = encode_chars(text, where)
        y[i] = encode_chars(target, where)[0]
    return UserSplit(data=XY(x=x, y=y), users=np.asarray(users, dtype=str))


# ---------------------------------------------------------------------------------------------
# Generic node-local files


def read_npz(path: Path) -> XY:
    """Arrays ``x`` (numeric, (n, ...)) and ``y`` (integer labels, (n,)) from a ``.npz`` file;
    x as float32 without rescaling, y as int64."""
    if not path.is_file():
        raise DataFileError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise DataFileError(
                    f"{path} holds arrays {sorted(npz.files)}; expected 'x' and 'y'"
                    " (np.savez(path, x=features, y=labels))"
                )
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{path} is not a readable .npz file: {exc}") from exc
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 1:
        raise DataFileError(f"{path}: x is {x.dtype} {x.shape}, expected numbers, shape (n, ...)")
    return XY(x=x.astype(np.float32), y=_integer_labels(y, len(x), path))


def read_csv(path: Path, label_column: str = "label") -> XY:
    """A CSV file with a header row: the ``label_column`` holds integer labels, every other
    column a numeric feature. x float32 (n, features), y int64."""
    if not path.is_file():
        raise DataFileError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM would end up in the first name
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{path} is not a readable text file: {exc}") from exc
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        raise DataFileError(f"{path} is empty; expected a header row naming the columns")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise DataFileError(f"{path}: no {label_column!r} column in the header {header}")
    label_at = header.index(label_column)
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataFileError(f"{path} line {line}: {len(row)} fields, header has {len(header)}")
        try:
            values[line - 2] = [float(v) for v in row]
        except ValueError as exc:
            raise DataFileError(f"{path} line {line}: not a number ({exc})") from exc
    x = np.delete(values, label_at, axis=1).astype(np.float32)
    return XY(x=x, y=_integer_labels(values[:, label_at], len(x), path))


# ---------------------------------------------------------------------------------------------
# Shared checks


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataFileError(f"cannot read {path}: {exc}") from exc


def _require_folder(folder: Path, what: str, expected: str) -> None:
    if not folder.is_dir():
        raise DataFileError(f"{folder} is not a folder; {what} holds {expected}")


def _check_labels(labels: np.ndarray, num_classes: int, where: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFileError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}], expected"
            f" 0..{num_classes - 1}"
        )


def _integer_labels(y: np.ndarray, n: int, path: Path) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise DataFileError(f"{path}: y has shape {y.shape}, expected ({n},) to match x")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.mod(y, 1) == 0):
        raise DataFileError(f"{path}: labels must be integers")
    if y.size and y.min() < 0:
        raise DataFileError(f"{path}: labels must be >= 0, got {y.min()}")
    return y.astype(np.int64)
