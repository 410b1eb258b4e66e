"""Unit tests for florist.datasets: specs, partitioners and loaders."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from florist.datasets import (
    XY,
    DatasetSpec,
    DigitsSpec,
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    PartitionerSpec,
    QuantitySkewPartitioner,
    ShardsPartitioner,
    SyntheticSpec,
    dataset_info,
    holdout_indices,
    load_partition,
    load_test,
    load_train,
    load_validation,
    partition_indices,
)
from florist.datasets.loaders import VALIDATION_STREAM
from florist.datasets.seeds import derive_seed

PARTITIONERS: list[PartitionerSpec] = [
    IidPartitioner(),
    DirichletPartitioner(alpha=0.5),
    ShardsPartitioner(classes_per_partition=2),
    QuantitySkewPartitioner(alpha=0.5),
]


def _digits_labels() -> np.ndarray:
    return load_train(DigitsSpec()).y


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for idx in parts:
        p = np.bincount(labels[idx]) / len(idx)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def _assert_exact_cover(parts: list[np.ndarray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


# --- partitioners -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", PARTITIONERS, ids=lambda s: s.name)
@pytest.mark.parametrize("num_partitions", [1, 7, 20])
def test_partitioner_covers_each_index_once(spec: PartitionerSpec, num_partitions: int) -> None:
    # Prepare
    labels = _digits_labels()
    if isinstance(spec, ShardsPartitioner) and num_partitions == 1:
        # One partition must hold all 10 classes, so it needs (at least) 10 class-pure shards.
        spec = ShardsPartitioner(classes_per_partition=10)

    # Execute
    parts = partition_indices(labels, num_partitions, spec, seed=3)

    # Assert
    _assert_exact_cover(parts, len(labels), num_partitions)


def test_natural_partitioner_covers_each_index_once() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 13, size=500)
    labels = rng.integers(0, 10, size=500)

    # Execute
    parts = partition_indices(labels, 5, NaturalPartitioner(), seed=0, groups=groups)

    # Assert
    _assert_exact_cover(parts, 500, 5)
    for p, idx in enumerate(parts):
        assert set(np.unique(groups[idx] % 5)) == {p}


@pytest.mark.parametrize("spec", PARTITIONERS, ids=lambda s: s.name)
def test_partitioner_is_deterministic_by_seed(spec: PartitionerSpec) -> None:
    # Prepare
    labels = _digits_labels()

    # Execute
    first = partition_indices(labels, 10, spec, seed=1)
    again = partition_indices(labels, 10, spec, seed=1)
    other = partition_indices(labels, 10, spec, seed=2)

    # Assert
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_dirichlet_small_alpha_is_more_label_skewed() -> None:
    # Prepare
    labels = _digits_labels()

    # Execute
    skewed = partition_indices(labels, 10, DirichletPartitioner(alpha=0.1), seed=0)
    mild = partition_indices(labels, 10, DirichletPartitioner(alpha=100.0), seed=0)

    # Assert
    skewed_entropy = _mean_label_entropy(labels, skewed)
    mild_entropy = _mean_label_entropy(labels, mild)
    assert skewed_entropy < 0.6 * mild_entropy
    assert mild_entropy > 0.95 * np.log(10)


def test_dirichlet_respects_min_partition_size() -> None:
    labels = _digits_labels()

    parts = partition_indices(labels, 20, DirichletPartitioner(alpha=0.1, min_partition_size=15), 0)

    assert min(len(p) for p in parts) >= 15


def test_dirichlet_infeasible_raises_clear_error() -> None:
    labels = _digits_labels()

    with pytest.raises(ValueError, match="min_partition_size"):
        partition_indices(labels, 100, DirichletPartitioner(min_partition_size=100), seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_gives_at_most_k_classes(k: int) -> None:
    # Prepare
    labels = _digits_labels()

    # Execute
    parts = partition_indices(labels, 10, ShardsPartitioner(classes_per_partition=k), seed=0)

    # Assert
    _assert_exact_cover(parts, len(labels), 10)
    assert all(len(np.unique(labels[idx])) <= k for idx in parts)


def test_shards_impossible_settings_raise() -> None:
    labels = np.repeat(np.arange(3), 4)

    with pytest.raises(ValueError, match="only 12 examples"):
        partition_indices(labels, 7, ShardsPartitioner(classes_per_partition=2), seed=0)
    with pytest.raises(ValueError, match="cannot cover 3 classes"):
        partition_indices(labels, 2, ShardsPartitioner(classes_per_partition=1), seed=0)


def test_quantity_skew_sizes_vary_labels_stay_iid() -> None:
    # Prepare
    labels = _digits_labels()
    spec = QuantitySkewPartitioner(alpha=0.5, min_partition_size=10)

    # Execute
    parts = partition_indices(labels, 5, spec, seed=0)

    # Assert
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10
    assert sizes.max() > 2 * sizes.min()
    # Partitions large enough to estimate a label distribution look like the whole set.
    overall = np.bincount(labels, minlength=10) / len(labels)
    for idx in parts:
        if len(idx) >= 200:
            local = np.bincount(labels[idx], minlength=10) / len(idx)
            assert np.abs(local - overall).max() < 0.06


def test_iid_partition_sizes_are_balanced() -> None:
    labels = _digits_labels()

    parts = partition_indices(labels, 7, IidPartitioner(), seed=0)

    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_natural_partitioner_without_groups_raises() -> None:
    with pytest.raises(ValueError, match="no per-device split"):
        partition_indices(_digits_labels(), 3, NaturalPartitioner(), seed=0)


@pytest.mark.parametrize("num_partitions", [0, -1])
def test_bad_num_partitions_raises(num_partitions: int) -> None:
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(np.zeros(10, dtype=np.int64), num_partitions, IidPartitioner(), seed=0)


def test_more_partitions_than_examples_raises() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        partition_indices(np.zeros(3, dtype=np.int64), 4, IidPartitioner(), seed=0)


# --- specs --------------------------------------------------------------------------------------


def test_spec_rejects_bad_partitioner_field() -> None:
    with pytest.raises(ValidationError) as err:
        DirichletPartitioner(name="dirichlet", alpha=-1)
    assert err.value.errors()[0]["loc"] == ("alpha",)


def test_spec_rejects_unknown_dataset_name() -> None:
    with pytest.raises(ValidationError) as err:
        TypeAdapter(DatasetSpec).validate_python({"name": "nope"})
    assert "digits" in str(err.value) and "synthetic" in str(err.value)


def test_spec_rejects_unknown_key() -> None:
    with pytest.raises(ValidationError) as err:
        TypeAdapter(DatasetSpec).validate_python({"name": "digits", "sed": 1})
    assert err.value.errors()[0]["loc"] == ("digits", "sed")


def test_spec_rejects_bad_nested_partitioner() -> None:
    with pytest.raises(ValidationError) as err:
        TypeAdapter(DatasetSpec).validate_python(
            {"name": "digits", "partitioner": {"name": "shards", "classes_per_partition": 0}}
        )
    assert err.value.errors()[0]["loc"] == (
        "digits",
        "partitioner",
        "shards",
        "classes_per_partition",
    )


def test_spec_round_trips_through_json() -> None:
    spec = SyntheticSpec(alpha=0.5, partitioner=DirichletPartitioner(alpha=0.3))

    again = TypeAdapter(DatasetSpec).validate_json(spec.model_dump_json())

    assert again == spec


def test_natural_partitioner_on_digits_raises() -> None:
    with pytest.raises(ValueError, match="natural"):
        DigitsSpec(partitioner=NaturalPartitioner())


# --- loaders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "shape", "num_classes"),
    [
        (DigitsSpec(), (1, 8, 8), 10),
        (SyntheticSpec(num_features=20, num_classes=5), (20,), 5),
    ],
    ids=["digits", "synthetic"],
)
def test_load_partition_shapes_and_dtypes(
    spec: DigitsSpec | SyntheticSpec, shape: tuple[int, ...], num_classes: int
) -> None:
    # Execute
    info = dataset_info(spec)
    parts = [load_partition(spec, p, 4) for p in range(4)]
    test = load_test(spec)

    # Assert
    assert info.input_shape == shape
    assert info.num_classes == num_classes
    for data in [*parts, test]:
        assert data.x.dtype == np.float32
        assert data.y.dtype == np.int64
        assert data.x.shape == (len(data), *shape)
        assert data.y.min() >= 0 and data.y.max() < num_classes
    assert sum(len(p) for p in parts) == len(load_train(spec))


def test_digits_values_are_scaled_to_unit_interval() -> None:
    data = load_train(DigitsSpec())

    assert data.x.min() == 0.0
    assert data.x.max() == 1.0


def test_digits_test_split_is_disjoint_from_train() -> None:
    # Prepare: tag each row with its index in the original dataset, found by hashing the pixels;
    # a few digit images are duplicated, so compare (hash, original index) pairs.
    from sklearn.datasets import load_digits

    original = (load_digits().data / 16.0).astype(np.float32)
    where: dict[str, list[int]] = {}
    for i, row in enumerate(original):
        where.setdefault(hashlib.sha1(row.tobytes()).hexdigest(), []).append(i)

    def origins(x: np.ndarray) -> list[int]:
        seen: dict[str, int] = {}
        out = []
        for row in x.reshape(len(x), -1):
            h = hashlib.sha1(row.tobytes()).hexdigest()
            out.append(where[h][seen.get(h, 0)])
            seen[h] = seen.get(h, 0) + 1
        return out

    spec = DigitsSpec(test_fraction=0.25, validation_fraction=0.1)

    # Execute
    train = origins(load_train(spec).x)
    validation = origins(load_validation(spec).x)
    test = origins(load_test(spec).x)

    # Assert: three disjoint splits that together are the dataset.
    assert set(train).isdisjoint(test)
    assert set(validation).isdisjoint(test)
    assert set(validation).isdisjoint(train)
    assert sorted(train + validation + test) == list(range(len(original)))
    assert len(test) == pytest.approx(0.25 * len(original), abs=1)
    # 10% of the training side, rounded per class (10 classes).
    assert len(validation) == pytest.approx(0.1 * (len(train) + len(validation)), abs=5)


def test_digits_test_split_is_stratified() -> None:
    test = load_test(DigitsSpec())

    counts = np.bincount(test.y, minlength=10)

    assert counts.max() - counts.min() <= 2


def test_test_split_does_not_depend_on_partitioner() -> None:
    a = load_test(DigitsSpec(partitioner=IidPartitioner()))
    b = load_test(DigitsSpec(partitioner=ShardsPartitioner()))

    np.testing.assert_array_equal(a.x, b.x)


def test_loaders_are_deterministic_and_seed_dependent() -> None:
    spec = SyntheticSpec(seed=5)

    first = load_partition(spec, 2, 5)
    again = load_partition(SyntheticSpec(seed=5), 2, 5)
    other = load_test(SyntheticSpec(seed=6))

    np.testing.assert_array_equal(first.x, again.x)
    assert len(other) != len(load_test(spec)) or not np.array_equal(other.x, load_test(spec).x)


def test_returned_arrays_do_not_alias_the_cache() -> None:
    spec = DigitsSpec()
    data = load_train(spec)

    data.x[:] = -1.0

    assert load_train(spec).x.min() == 0.0


def test_load_partition_rejects_bad_partition_id() -> None:
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 3\)"):
        load_partition(DigitsSpec(), 3, 3)
    with pytest.raises(ValueError, match="num_partitions"):
        load_partition(DigitsSpec(), 0, 0)


def test_synthetic_natural_partition_follows_devices() -> None:
    spec = SyntheticSpec(num_devices=6)

    sizes = [len(load_partition(spec, p, 6)) for p in range(6)]
    with pytest.raises(ValueError, match="get no device"):
        load_partition(spec, 0, 7)

    assert sum(sizes) == len(load_train(spec))
    assert len(set(sizes)) > 1


def test_synthetic_sample_counts_respect_bounds() -> None:
    spec = SyntheticSpec(num_devices=40, min_samples=50, max_samples=200, test_fraction=0.2)

    sizes = [len(load_partition(spec, p, 40)) for p in range(40)]

    # Each device keeps 80% of its samples on the training side, and 90% of those for training.
    assert min(sizes) >= 36
    assert max(sizes) <= 144


def test_synthetic_beta_drives_heterogeneity() -> None:
    # Prepare
    iid_like = SyntheticSpec(alpha=0.0, beta=0.0)
    hetero = SyntheticSpec(alpha=5.0, beta=5.0)

    def spread_and_entropy(spec: SyntheticSpec) -> tuple[float, float]:
        parts = [load_partition(spec, p, spec.num_devices) for p in range(spec.num_devices)]
        means = np.stack([p.x.mean(axis=0) for p in parts])
        labels = np.concatenate([p.y for p in parts])
        offsets = np.cumsum([0] + [len(p) for p in parts])
        idx = [np.arange(a, b) for a, b in itertools.pairwise(offsets)]
        return float(means.std(axis=0).mean()), _mean_label_entropy(labels, idx)

    # Execute
    iid_spread, iid_entropy = spread_and_entropy(iid_like)
    het_spread, het_entropy = spread_and_entropy(hetero)

    # Assert: device feature means drift apart and each device sees fewer classes.
    assert het_spread > 3 * iid_spread
    assert het_entropy < 0.5 * iid_entropy


def test_synthetic_alpha_does_not_change_labels() -> None:
    # u_k shifts every logit by the same amount (see SyntheticSpec); pin that down so nobody reads
    # alpha as a knob for label skew.
    a = load_train(SyntheticSpec(alpha=0.0))
    b = load_train(SyntheticSpec(alpha=5.0))

    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.x, b.x)


def test_synthetic_spec_rejects_inverted_sample_bounds() -> None:
    with pytest.raises(ValidationError, match="max_samples"):
        SyntheticSpec(min_samples=100, max_samples=60)


def _rows(data: XY) -> list[bytes]:
    # Features are continuous (synthetic) or compared with their label (digits), so a row's
    # bytes identify the example well enough to compare splits.
    return [x.tobytes() + bytes([int(y)]) for x, y in zip(data.x, data.y, strict=True)]


VALIDATION_SPECS = [
    DigitsSpec(partitioner=DirichletPartitioner(alpha=0.5)),
    SyntheticSpec(),
    SyntheticSpec(partitioner=IidPartitioner(), seed=3, validation_fraction=0.25),
]


@pytest.mark.parametrize("spec", VALIDATION_SPECS, ids=["digits", "synthetic", "synthetic-iid"])
def test_validation_is_disjoint_from_test_and_from_every_partition(
    spec: DigitsSpec | SyntheticSpec,
) -> None:
    # Execute
    validation = set(_rows(load_validation(spec)))
    test = set(_rows(load_test(spec)))
    partitions = [set(_rows(load_partition(spec, p, 5))) for p in range(5)]

    # Assert
    assert validation
    assert validation.isdisjoint(test)
    for rows in partitions:
        assert validation.isdisjoint(rows)


@pytest.mark.parametrize("spec", VALIDATION_SPECS, ids=["digits", "synthetic", "synthetic-iid"])
def test_partitions_plus_validation_are_the_old_training_side(
    spec: DigitsSpec | SyntheticSpec,
) -> None:
    # Prepare: the same data without a validation split.
    no_validation = spec.model_copy(update={"validation_fraction": 0.0})

    # Execute
    partitions = [row for p in range(5) for row in _rows(load_partition(spec, p, 5))]
    validation = _rows(load_validation(spec))

    # Assert: the validation rows moved out of the partitions, nothing else changed.
    assert sorted(partitions + validation) == sorted(_rows(load_train(no_validation)))
    assert sorted(partitions) == sorted(_rows(load_train(spec)))
    np.testing.assert_array_equal(load_test(spec).x, load_test(no_validation).x)


def test_holdout_is_deterministic_and_seeded() -> None:
    # Prepare
    strata = np.repeat(np.arange(5), 40)

    # Execute
    first = holdout_indices(strata, 0.25, seed=4)
    again = holdout_indices(strata, 0.25, seed=4)
    other = holdout_indices(strata, 0.25, seed=5)

    # Assert
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(np.bincount(strata[first]), [10] * 5)
    assert np.all(np.diff(first) > 0)


def test_holdout_never_empties_a_stratum() -> None:
    strata = np.array([0, 1, 1, 2, 2, 2])

    held = holdout_indices(strata, 0.9, seed=0)

    # round(1 * 0.9) = 1 would take stratum 0's only example; round(2 * 0.9) = 2 all of 1's.
    np.testing.assert_array_equal(np.bincount(strata[held], minlength=3), [0, 1, 2])
    assert len(holdout_indices(strata, 0.0, seed=0)) == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_validation_split_is_the_seeded_holdout_of_the_training_side(seed: int) -> None:
    # Prepare: the training side as it is without a validation split.
    spec = DigitsSpec(seed=seed)
    training_side = load_train(spec.model_copy(update={"validation_fraction": 0.0}))
    expected = holdout_indices(training_side.y, 0.1, derive_seed(seed, VALIDATION_STREAM))

    # Execute
    validation = load_validation(spec)
    again = load_validation(DigitsSpec(seed=seed))

    # Assert
    np.testing.assert_array_equal(validation.x, training_side.x[expected])
    np.testing.assert_array_equal(validation.y, again.y)
    np.testing.assert_array_equal(validation.x, again.x)


def test_validation_does_not_depend_on_partitioner() -> None:
    a = load_validation(DigitsSpec(partitioner=IidPartitioner()))
    b = load_validation(DigitsSpec(partitioner=ShardsPartitioner()))

    np.testing.assert_array_equal(a.x, b.x)


def test_validation_sizes_per_stratum() -> None:
    # Prepare
    digits = DigitsSpec(validation_fraction=0.2)
    synthetic = SyntheticSpec(num_devices=10, validation_fraction=0.2)
    no_validation = synthetic.model_copy(update={"validation_fraction": 0.0})

    # Execute
    digit_counts = np.bincount(load_validation(digits).y, minlength=10)
    train_counts = np.bincount(load_train(digits).y, minlength=10)
    device_sizes = [len(load_partition(no_validation, d, 10)) for d in range(10)]
    kept = [len(load_partition(synthetic, d, 10)) for d in range(10)]

    # Assert: a fifth of every class (digits) and of every device (synthetic), rounded.
    np.testing.assert_array_equal(
        digit_counts, np.round((digit_counts + train_counts) * 0.2).astype(int)
    )
    np.testing.assert_array_equal(
        np.array(device_sizes) - np.array(kept), np.round(np.array(device_sizes) * 0.2)
    )
    assert len(load_validation(synthetic)) == sum(device_sizes) - sum(kept)


def test_validation_keeps_one_training_example_per_device() -> None:
    # min_samples 2 and test_fraction 0.5 leave a single training example on many devices.
    spec = SyntheticSpec(
        num_devices=20, samples_mean=0.0, samples_sigma=0.0, min_samples=2, validation_fraction=0.9
    )

    sizes = [len(load_partition(spec, d, 20)) for d in range(20)]

    assert min(sizes) >= 1


@pytest.mark.parametrize(
    "spec", [DigitsSpec(validation_fraction=0), SyntheticSpec(validation_fraction=0)]
)
def test_zero_validation_fraction_gives_an_empty_split(spec: DigitsSpec | SyntheticSpec) -> None:
    validation = load_validation(spec)

    assert len(validation) == 0
    assert validation.x.shape[1:] == dataset_info(spec).input_shape
    assert validation.input_range == dataset_info(spec).input_range


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_validation_fraction_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ValidationError, match="validation_fraction"):
        DigitsSpec(validation_fraction=value)


def test_validation_carries_the_input_range() -> None:
    assert load_validation(DigitsSpec()).input_range == (0.0, 1.0)
    assert load_validation(SyntheticSpec()).input_range is None
