"""Real-dataset readers, paper models and workloads, on fixture files in the real formats."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from florist.client.models import Cnn2Spec, LstmSpec, ResNet18GnSpec, build_model
from florist.client.workloads import ClientData, WorkloadDataError, default_workloads
from florist.client.workloads.realdata import DATA_DIR_ENV
from florist.datasets import DatasetInfo
from florist.datasets.files import (
    SHAKESPEARE_VOCAB,
    DataFileError,
    read_cifar10,
    read_csv,
    read_femnist,
    read_idx,
    read_mnist,
    read_npz,
    read_shakespeare,
)
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from tests.fixtures.realdata import (
    write_cifar10,
    write_femnist,
    write_idx,
    write_mnist,
    write_shakespeare,
)


def pixels(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats back to the uint8 values they were scaled from."""
    return np.rint(x * 255).astype(np.uint8)


def rows(x: np.ndarray) -> list[bytes]:
    """One hashable key per example (the fixtures' noise makes every example unique)."""
    return [r.tobytes() for r in np.ascontiguousarray(x).reshape(len(x), -1)]


def workload(name: str, **config: Any) -> tuple[Any, Any]:
    plugin = default_workloads().get(name)
    return plugin, plugin.parse_config(config)


# ---------------------------------------------------------------------------------------------
# Readers: what the fixture writers wrote comes back exactly


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzipped"])
def test_mnist_reader_round_trips_the_idx_files(tmp_path: Path, compress: bool) -> None:
    written = write_mnist(tmp_path, compress=compress)

    train, test = read_mnist(tmp_path, "train"), read_mnist(tmp_path, "test")

    assert train.x.dtype == np.float32 and train.x.shape == (60, 1, 28, 28)
    assert train.y.dtype == np.int64 and test.x.shape == (20, 1, 28, 28)
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0 and train.input_range == (0.0, 1.0)
    np.testing.assert_array_equal(pixels(train.x[:, 0]), written.train_x)
    np.testing.assert_array_equal(train.y, written.train_y)
    np.testing.assert_array_equal(pixels(test.x[:, 0]), written.test_x)
    np.testing.assert_array_equal(test.y, written.test_y)


def test_idx_reader_reads_any_shape_and_type(tmp_path: Path) -> None:
    # A big-endian int32 array: the type code and byte order come from the header.
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    header = bytes([0, 0, 0x0C, 3]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (tmp_path / "a.idx").write_bytes(header + array.astype(">i4").tobytes())

    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), array)


def test_cifar10_reader_round_trips_the_python_batches(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)

    train, test = read_cifar10(tmp_path, "train"), read_cifar10(tmp_path, "test")

    assert train.x.dtype == np.float32 and train.x.shape == (250, 3, 32, 32)
    assert test.x.shape == (50, 3, 32, 32) and test.y.dtype == np.int64
    # The 3072 bytes of a row are the red, then green, then blue 32x32 planes.
    np.testing.assert_array_equal(pixels(train.x).reshape(250, 3072), written.train_x)
    np.testing.assert_array_equal(train.y, written.train_y)
    np.testing.assert_array_equal(pixels(test.x).reshape(50, 3072), written.test_x)
    np.testing.assert_array_equal(test.y, written.test_y)
    # The folder itself or its parent: both name the same copy.
    np.testing.assert_array_equal(read_cifar10(tmp_path / "cifar-10-batches-py", "test").y, test.y)


def test_femnist_reader_round_trips_leaf_json_with_writers(tmp_path: Path) -> None:
    written = write_femnist(tmp_path)

    train, test = read_femnist(tmp_path, "train"), read_femnist(tmp_path, "test")

    assert train.data.x.shape == (60, 1, 28, 28) and train.data.x.dtype == np.float32
    np.testing.assert_array_equal(train.data.x.reshape(60, 784), written.train_x.astype(np.float32))
    np.testing.assert_array_equal(train.data.y, written.train_y)
    assert train.users is not None and list(train.users) == written.train_users
    np.testing.assert_array_equal(test.data.y, written.test_y)
    assert test.users is not None and list(test.users) == written.test_users


def test_shakespeare_reader_maps_characters_to_leaf_vocabulary_ids(tmp_path: Path) -> None:
    written = write_shakespeare(tmp_path)

    train = read_shakespeare(tmp_path, "train")

    assert train.data.x.shape == (36, 80) and train.data.x.dtype == np.int64
    expected_x = [[SHAKESPEARE_VOCAB.index(c) for c in s] for s in written.train_x]
    np.testing.assert_array_equal(train.data.x, expected_x)
    np.testing.assert_array_equal(
        train.data.y, [SHAKESPEARE_VOCAB.index(c) for c in written.train_y]
    )
    assert train.users is not None and list(train.users) == written.train_users


def test_leaf_shakespeare_vocabulary_has_80_distinct_characters() -> None:
    assert len(SHAKESPEARE_VOCAB) == 80 == len(set(SHAKESPEARE_VOCAB))
    assert SHAKESPEARE_VOCAB.index("\n") == 0 and SHAKESPEARE_VOCAB.index("}") == 79


def test_npz_reader_round_trips_and_checks_its_arrays(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((7, 3)).astype(np.float32)
    y = np.arange(7) % 2
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    np.savez(tmp_path / "no_y.npz", x=x, labels=y)
    np.savez(tmp_path / "short_y.npz", x=x, y=y[:5])
    np.savez(tmp_path / "float_y.npz", x=x, y=y + 0.5)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")

    data = read_npz(tmp_path / "ok.npz")

    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    assert data.y.dtype == np.int64
    for name, words in [
        ("no_y.npz", "expected 'x' and 'y'"),
        ("short_y.npz", r"shape \(5,\)"),
        ("float_y.npz", "integers"),
        ("junk.npz", "not a readable .npz"),
        ("missing.npz", "does not exist"),
    ]:
        with pytest.raises(DataFileError, match=words) as info:
            read_npz(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_csv_reader_round_trips_and_checks_its_rows(tmp_path: Path) -> None:
    (tmp_path / "ok.csv").write_text("a,label,b\n0.5,1,2\n-1,0,3\n")
    (tmp_path / "ragged.csv").write_text("a,label\n1,0\n2\n")
    (tmp_path / "text.csv").write_text("a,label\n1,0\nx,1\n")
    (tmp_path / "nolabel.csv").write_text("a,b\n1,0\n")
    (tmp_path / "empty.csv").write_text("")

    data = read_csv(tmp_path / "ok.csv")

    np.testing.assert_array_equal(data.x, np.array([[0.5, 2], [-1, 3]], dtype=np.float32))
    np.testing.assert_array_equal(data.y, [1, 0])
    assert read_csv(tmp_path / "ok.csv", label_column="b").y.tolist() == [2, 3]
    for name, words in [
        ("ragged.csv", "line 3: 1 fields"),
        ("text.csv", "line 3: not a number"),
        ("nolabel.csv", "no 'label' column"),
        ("empty.csv", "empty"),
    ]:
        with pytest.raises(DataFileError, match=words) as info:
            read_csv(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Malformed or missing files: a WorkloadDataError naming the path


def _wrong_magic(folder: Path) -> Path:
    path = folder / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x42
    path.write_bytes(bytes(raw))
    return path


def _truncated(folder: Path) -> Path:
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _labels_images_mismatch(folder: Path) -> Path:
    labels = read_idx(folder / "t10k-labels-idx1-ubyte")
    return write_idx(folder / "t10k-labels-idx1-ubyte", labels[:-1])


def _missing(folder: Path) -> Path:
    (folder / "t10k-labels-idx1-ubyte").unlink()
    return folder / "t10k-labels-idx1-ubyte"


def _bad_gzip(folder: Path) -> Path:
    path = folder / "t10k-images-idx3-ubyte"
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes())[:50])
    path.unlink()
    return gz


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_wrong_magic, "bad magic number"),
        (_truncated, "truncated"),
        (_labels_images_mismatch, "19 labels but"),
        (_missing, "t10k-labels-idx1-ubyte"),
        (_bad_gzip, "cannot read"),
    ],
    ids=["wrong-magic", "truncated", "count-mismatch", "missing", "bad-gzip"],
)
def test_malformed_mnist_files_are_a_workload_data_error_naming_the_path(
    tmp_path: Path, damage: Any, words: str
) -> None:
    write_mnist(tmp_path)
    path = damage(tmp_path)
    plugin, config = workload("mnist", data_dir=str(tmp_path))

    with pytest.raises(WorkloadDataError, match=words) as info:
        assert plugin.load_test is not None
        plugin.load_test(config)

    assert str(path) in str(info.value)


def test_missing_folder_says_which_files_to_put_where(tmp_path: Path) -> None:
    plugin, config = workload("cifar10", data_dir=str(tmp_path / "nowhere"))

    with pytest.raises(WorkloadDataError) as info:
        plugin.load_train(config, ClientData(partition_id=0, num_partitions=2))

    assert str(tmp_path / "nowhere") in str(info.value)
    assert "data_batch_1" in str(info.value) and "test_batch" in str(info.value)


def _cifar_missing_batch(folder: Path) -> Path:
    path = folder / "cifar-10-batches-py" / "data_batch_3"
    path.unlink()
    return path.parent


def _cifar_truncated(folder: Path) -> Path:
    path = folder / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _cifar_wrong_shape(folder: Path) -> Path:
    path = folder / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    return path


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def _cifar_code_in_pickle(folder: Path) -> Path:
    path = folder / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    return path


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_cifar_missing_batch, "lacks data_batch_3"),
        (_cifar_truncated, "not a CIFAR-10 batch"),
        (_cifar_wrong_shape, r"expected uint8 \(n, 3072\)"),
        (_cifar_code_in_pickle, "refusing to load"),
    ],
    ids=["missing-batch", "truncated", "wrong-shape", "code-in-pickle"],
)
def test_malformed_cifar10_files_are_a_workload_data_error_naming_the_path(
    tmp_path: Path, damage: Any, words: str
) -> None:
    write_cifar10(tmp_path, per_batch=10, n_test=10)
    path = damage(tmp_path)
    plugin, config = workload("cifar10", data_dir=str(tmp_path))

    with pytest.raises(WorkloadDataError, match=words) as info:
        assert plugin.load_validation is not None
        plugin.load_validation(config)

    assert str(path) in str(info.value)


def _leaf_count_mismatch(folder: Path) -> Path:
    path = sorted((folder / "train").glob("*.json"))[0]
    doc = json.loads(path.read_text())
    doc["num_samples"][0] += 1
    path.write_text(json.dumps(doc))
    return path


def _leaf_not_json(folder: Path) -> Path:
    path = sorted((folder / "train").glob("*.json"))[1]
    path.write_text('{"users": [')
    return path


def _leaf_no_files(folder: Path) -> Path:
    for path in (folder / "train").glob("*.json"):
        path.unlink()
    return folder / "train"


def _leaf_bad_character(folder: Path) -> Path:
    path = sorted((folder / "train").glob("*.json"))[0]
    doc = json.loads(path.read_text())
    user = doc["users"][0]
    doc["user_data"][user]["y"][0] = "~"
    path.write_text(json.dumps(doc))
    return folder / "train"


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_leaf_count_mismatch, "num_samples"),
        (_leaf_not_json, "not a LEAF data file"),
        (_leaf_no_files, r"no \*.json files"),
        (_leaf_bad_character, "not in LEAF's Shakespeare vocabulary"),
    ],
    ids=["count-mismatch", "not-json", "no-files", "bad-character"],
)
def test_malformed_leaf_files_are_a_workload_data_error_naming_the_path(
    tmp_path: Path, damage: Any, words: str
) -> None:
    write_shakespeare(tmp_path)
    path = damage(tmp_path)
    plugin, config = workload("shakespeare", data_dir=str(tmp_path))

    with pytest.raises(WorkloadDataError, match=words) as info:
        plugin.load_train(config, ClientData(partition_id=0, num_partitions=2))

    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Models


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cnn2_is_mcmahans_mnist_cnn() -> None:
    model = build_model(Cnn2Spec(), DatasetInfo(input_shape=(1, 28, 28), num_classes=10))

    out = model(torch.zeros(3, 1, 28, 28))

    assert out.shape == (3, 10)
    # conv 5x5x1x32 + 32, conv 5x5x32x64 + 64, dense 7*7*64 -> 512, dense 512 -> 10.
    assert _params(model) == (25 * 32 + 32) + (25 * 32 * 64 + 64) + (3136 * 512 + 512) + 5130
    assert 1.65e6 < _params(model) < 1.67e6


def test_resnet18_gn_has_groupnorm_and_resnet18s_size() -> None:
    model = build_model(ResNet18GnSpec(), DatasetInfo(input_shape=(3, 32, 32), num_classes=10))

    out = model(torch.zeros(2, 3, 32, 32))

    assert out.shape == (2, 10)
    assert 11.1e6 < _params(model) < 11.3e6
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 2 for m in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_lstm_is_leafs_next_character_model() -> None:
    model = build_model(LstmSpec(), DatasetInfo(input_shape=(80,), num_classes=80))
    # Token ids as XY carries them: float32.
    ids = torch.randint(0, 80, (4, 80)).float()

    out = model(ids)

    assert out.shape == (4, 80)
    # Embedding 80x8; LSTM 4 gates x 256 x (in + 256 + 2 biases) per layer; dense 256 -> 80.
    lstm = 4 * 256 * (8 + 256 + 2) + 4 * 256 * (256 + 256 + 2)
    assert _params(model) == 80 * 8 + lstm + 256 * 80 + 80


def test_paper_models_refuse_inputs_they_cannot_take() -> None:
    with pytest.raises(ValueError, match="cnn2"):
        build_model(Cnn2Spec(), DatasetInfo(input_shape=(80,), num_classes=80))
    with pytest.raises(ValueError, match="lstm"):
        build_model(LstmSpec(), DatasetInfo(input_shape=(1, 28, 28), num_classes=10))
    with pytest.raises(ValueError, match="groups"):
        build_model(ResNet18GnSpec(groups=3), DatasetInfo((3, 32, 32), 10))


# ---------------------------------------------------------------------------------------------
# Workloads: config, where the data is, partitions


def test_workload_configs_default_to_the_papers_models_and_splits() -> None:
    defaults = {
        name: default_workloads().get(name).parse_config({})
        for name in ("mnist", "fashion-mnist", "cifar10", "femnist", "shakespeare")
    }

    assert {n: c.model.name for n, c in defaults.items()} == {  # type: ignore[attr-defined]
        "mnist": "cnn2",
        "fashion-mnist": "cnn2",
        "cifar10": "resnet18-gn",
        "femnist": "cnn2",
        "shakespeare": "lstm",
    }
    partitioners = {n: c.partitioner.name for n, c in defaults.items()}  # type: ignore[attr-defined]
    assert partitioners == {
        "mnist": "iid",
        "fashion-mnist": "iid",
        "cifar10": "iid",
        "femnist": "natural",
        "shakespeare": "natural",
    }
    plugin = default_workloads().get("mnist")
    with pytest.raises(ValidationError, match="natural"):
        plugin.parse_config({"partitioner": {"name": "natural"}})
    with pytest.raises(ValidationError, match="data_dri"):
        plugin.parse_config({"data_dri": "/x"})
    with pytest.raises(ValidationError, match="lstm"):
        plugin.parse_config({"model": {"name": "lstm"}})


def test_data_dir_defaults_to_florist_data_dir_then_home_resolved_when_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin, config = workload("fashion-mnist")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(WorkloadDataError, match=str(tmp_path / "home/.florist/data/fashion-mnist")):
        plugin.load_test(config)

    # Set after the config was made: read where the data is loaded.
    write_mnist(tmp_path / "shared" / "fashion-mnist")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "shared"))

    assert len(plugin.load_test(config)) == 20


def test_a_node_with_data_path_reads_only_its_own_folder(tmp_path: Path) -> None:
    own = write_mnist(tmp_path / "node", n_train=30, n_test=10, seed=7)
    # The shared copy does not exist: nothing may read it.
    plugin, config = workload("mnist", data_dir=str(tmp_path / "no-shared-copy"))
    client = ClientData(data_path=tmp_path / "node", partition_id=1, num_partitions=3)

    train = plugin.load_train(config, client)
    local_test = plugin.load_local_test(config, client)

    # All of its training files, in order: no partitioning, no validation carve-out.
    np.testing.assert_array_equal(pixels(train.x[:, 0]), own.train_x)
    np.testing.assert_array_equal(train.y, own.train_y)
    np.testing.assert_array_equal(local_test.y, own.test_y)


def test_a_cifar10_node_may_hold_only_some_batches(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path / "node", per_batch=6, n_test=4, batches=2)
    plugin, config = workload("cifar10", data_dir=str(tmp_path / "elsewhere"))

    train = plugin.load_train(config, ClientData(data_path=tmp_path / "node"))

    np.testing.assert_array_equal(pixels(train.x).reshape(-1, 3072), written.train_x)


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_a_node_may_keep_its_data_as_npz_or_csv(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(3)
    pix = rng.integers(0, 256, size=(5, 784))
    y = np.array([3, 1, 4, 1, 5])
    if fmt == "npz":
        np.savez(tmp_path / "train.npz", x=pix.reshape(5, 28, 28).astype(np.uint8), y=y)
    else:
        header = "label," + ",".join(f"p{i}" for i in range(784))
        body = "\n".join(
            f"{label}," + ",".join(map(str, r)) for label, r in zip(y, pix, strict=True)
        )
        (tmp_path / "train.csv").write_text(f"{header}\n{body}\n")
    plugin, config = workload("mnist")

    train = plugin.load_train(config, ClientData(data_path=tmp_path))

    # 8-bit pixels are scaled as the IDX reader scales them.
    assert train.x.shape == (5, 1, 28, 28) and train.x.dtype == np.float32
    np.testing.assert_array_equal(pixels(train.x).reshape(5, 784), pix)
    np.testing.assert_array_equal(train.y, y)


def test_a_shakespeare_node_may_keep_vocabulary_ids_as_npz(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 80, size=(4, 80))
    np.savez(tmp_path / "train.npz", x=ids, y=ids[:, 0])
    np.savez(tmp_path / "test.npz", x=ids + 1, y=ids[:, 0])  # an id past the vocabulary
    plugin, config = workload("shakespeare")
    client = ClientData(data_path=tmp_path)

    train = plugin.load_train(config, client)

    np.testing.assert_array_equal(train.x, ids)
    with pytest.raises(WorkloadDataError, match=r"token ids in 0\.\.79"):
        plugin.load_local_test(config, client)


def test_node_npz_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", x=np.zeros((3, 3, 32, 32)), y=np.zeros(3, int))
    plugin, config = workload("mnist")

    with pytest.raises(WorkloadDataError, match=r"3072 values; mnist needs \(1, 28, 28\)"):
        plugin.load_train(config, ClientData(data_path=tmp_path))


@pytest.mark.parametrize(
    "partitioner",
    [
        {"name": "iid"},
        {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 2},
        {"name": "shards", "classes_per_partition": 4},
    ],
    ids=["iid", "dirichlet", "shards"],
)
def test_partitions_of_the_shared_copy_are_disjoint_and_cover_the_train_split(
    tmp_path: Path, partitioner: dict[str, Any]
) -> None:
    written = write_mnist(tmp_path)
    plugin, config = workload(
        "mnist", data_dir=str(tmp_path), partitioner=partitioner, validation_fraction=0.2
    )

    parts = [
        plugin.load_train(config, ClientData(partition_id=p, num_partitions=3)) for p in range(3)
    ]
    validation = plugin.load_validation(config)

    keys = [k for part in parts for k in rows(part.x)]
    assert len(keys) == len(set(keys))  # disjoint
    # round(6 * 0.2) of each class's 6 examples.
    assert len(validation) == 10 and not set(keys) & set(rows(validation.x))
    # Partitions and validation together are exactly the training files.
    assert sorted(keys + rows(validation.x)) == sorted(rows(written.train_x / np.float32(255)))
    labels = dict(zip(rows(written.train_x / np.float32(255)), written.train_y, strict=True))
    assert all(labels[k] == y for part in parts for k, y in zip(rows(part.x), part.y, strict=True))


def test_femnist_natural_split_gives_each_writer_to_one_partition(tmp_path: Path) -> None:
    written = write_femnist(tmp_path, num_users=4)
    plugin, config = workload("femnist", data_dir=str(tmp_path))
    writer = dict(zip(rows(written.train_x.astype(np.float32)), written.train_users, strict=True))
    test_writer = dict(
        zip(rows(written.test_x.astype(np.float32)), written.test_users, strict=True)
    )

    parts = [
        plugin.load_train(config, ClientData(partition_id=p, num_partitions=2)) for p in range(2)
    ]
    tests = [
        plugin.load_local_test(config, ClientData(partition_id=p, num_partitions=2))
        for p in range(2)
    ]

    # Writers in sorted order; writer w goes to partition w % 2.
    writers = sorted(set(written.train_users or []))
    for p, (part, test) in enumerate(zip(parts, tests, strict=True)):
        mine = {writers[w] for w in range(len(writers)) if w % 2 == p}
        assert {writer[k] for k in rows(part.x)} == mine
        # Federated evaluation: the test examples of the same writers, all of them.
        assert [test_writer[k] for k in rows(test.x)] == [
            u for u in written.test_users or [] if u in mine
        ]


def test_parsed_files_are_cached_per_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path, per_batch=4, n_test=4)
    plugin, config = workload("cifar10", data_dir=str(tmp_path))
    calls: list[str] = []

    def counting(folder: Path, split: Any, require_all: bool = True) -> Any:
        calls.append(split)
        return read_cifar10(folder, split, require_all)

    monkeypatch.setattr("florist.client.workloads.vision.read_cifar10", counting)

    first = plugin.load_test(config)
    again = plugin.load_test(config)
    for p in range(2):  # the training side too: read once for every partition and round
        plugin.load_train(config, ClientData(partition_id=p, num_partitions=2))
    plugin.load_validation(config)

    assert calls == ["test", "train"]
    # The caller's arrays are its own: the cached ones stay as read.
    again.x[:] = 0
    np.testing.assert_array_equal(plugin.load_test(config).x, first.x)


def test_a_copy_replaced_on_disk_is_read_again(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "node", per_batch=4, n_test=4, batches=1)
    plugin, config = workload("cifar10")
    client = ClientData(data_path=tmp_path / "node")
    before = plugin.load_train(config, client)

    replaced = write_cifar10(tmp_path / "node", per_batch=4, n_test=4, batches=1, seed=1)
    batch = tmp_path / "node" / "cifar-10-batches-py" / "data_batch_1"
    # Past the file system's timestamp granularity, as a later copy would be.
    later = batch.stat().st_mtime_ns + 10**9
    os.utime(batch, ns=(later, later))

    after = plugin.load_train(config, client)
    np.testing.assert_array_equal(pixels(after.x).reshape(-1, 3072), replaced.train_x)
    assert not np.array_equal(after.x, before.x)


# ---------------------------------------------------------------------------------------------
# Training through the in-process grid


def _run(name: str, config: dict[str, Any], rounds: int, training: dict[str, Any]) -> Any:
    body = {
        "name": f"{name}-fixture",
        "strategy": {"name": "fedavg", "config": {}},
        "workload": {"name": name, "config": config},
        "training": {"batch_size": 16, "lr": 0.05, **training},
        "rounds": rounds,
        "clients": {"min": 2},
    }
    result, _ = run_local(ExperimentSpec.model_validate(body), 2)
    assert len(result.history) == rounds
    assert all(u.status == "accepted" for r in result.history for u in r.updates)
    assert [r.num_updates for r in result.history] == [2] * rounds
    return result


def test_mnist_format_files_load_partition_and_train_for_two_rounds(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    config = {"data_dir": str(tmp_path), "partitioner": {"name": "dirichlet", "alpha": 1.0}}

    result = _run("mnist", config, rounds=2, training={"local_steps": 5})

    # cnn2 by default; the class blocks are learnable: well above chance (0.1) after 2 rounds.
    assert result.history[-1].metrics["accuracy"] >= 0.5
    assert result.history[-1].metrics["loss"] < result.initial_metrics["loss"]


def test_cifar10_format_files_load_partition_and_train_for_two_rounds(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    config = {
        "data_dir": str(tmp_path),
        "model": {"name": "cnn"},
        "partitioner": {"name": "dirichlet", "alpha": 1.0},
    }

    result = _run("cifar10", config, rounds=2, training={"local_steps": 5})

    assert result.history[-1].metrics["accuracy"] > 0.2
    assert result.history[-1].metrics["loss"] < result.initial_metrics["loss"]


# 3 s on an idle 2-core machine, 5 s with the machine busy: an 11M-parameter model is copied
# into and out of every message.
@pytest.mark.slow
def test_cifar10_resnet18_gn_trains_for_two_rounds(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=8, n_test=10)
    config = {"data_dir": str(tmp_path)}  # resnet18-gn by default
    started = time.perf_counter()

    result = _run(
        "cifar10", config, rounds=2, training={"local_steps": 1, "batch_size": 4, "lr": 0.01}
    )

    assert np.isfinite(result.history[-1].metrics["loss"])
    assert time.perf_counter() - started < 60


def test_femnist_natural_split_trains_one_round(tmp_path: Path) -> None:
    write_femnist(tmp_path, num_users=4)

    result = _run("femnist", {"data_dir": str(tmp_path)}, rounds=1, training={"local_steps": 3})

    assert np.isfinite(result.history[-1].metrics["loss"])


def test_shakespeare_natural_split_trains_one_round(tmp_path: Path) -> None:
    write_shakespeare(tmp_path, num_users=3)
    config = {"data_dir": str(tmp_path)}  # LEAF's LSTM by default

    result = _run("shakespeare", config, rounds=1, training={"local_steps": 3})

    assert np.isfinite(result.history[-1].metrics["loss"])
    assert result.initial_metrics["accuracy"] <= 1.0
