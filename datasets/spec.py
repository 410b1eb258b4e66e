"""Validated specs naming a dataset and how its training split is cut into client partitions."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Default share of the training side kept back as the validation split.
VALIDATION_FRACTION = 0.1


class _Spec(BaseModel):
    # Specs are values: refuse unknown keys (a typo must not fall back to a default) and mutation.
    model_config = ConfigDict(extra="forbid", frozen=True)


class IidPartitioner(_Spec):
    """Shuffle the examples and split them into partitions of (almost) equal size."""

    name: Literal["iid"] = "iid"


class DirichletPartitioner(_Spec):
    """Label skew: each class is split over the partitions by proportions ~ Dir(alpha).

    Parameters
    ----------
    alpha : float, default 0.5
        Concentration; small values give each partition few classes, large values approach IID.
    min_partition_size : int, default 10
        Draws are repeated (a bounded number of times) until every partition has at least this
        many examples (and at least one: empty partitions are never returned).
    """

    name: Literal["dirichlet"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    min_partition_size: int = Field(default=10, ge=0)


class ShardsPartitioner(_Spec):
    """Pathological k-class split (McMahan et al., 2017): each partition gets k label-sorted shards.

    Parameters
    ----------
    classes_per_partition : int, default 2
        Shards per partition (k). Shards are cut within one class, so a partition sees at most k
        classes.
    """

    name: Literal["shards"] = "shards"
    classes_per_partition: int = Field(default=2, ge=1)


class QuantitySkewPartitioner(_Spec):
    """Quantity skew: IID labels, partition sizes drawn from Dir(alpha).

    Parameters
    ----------
    alpha : float, default 0.5
        Concentration of the size proportions; small values give very unequal sizes.
    min_partition_size : int, default 10
        Every partition gets this many examples before the rest is split by the drawn proportions.
    """

    name: Literal["quantity_skew"] = "quantity_skew"
    alpha: float = Field(default=0.5, gt=0)
    min_partition_size: int = Field(default=10, ge=1)


class NaturalPartitioner(_Spec):
    """The dataset's own per-device split: device d goes to partition d % num_partitions."""

    name: Literal["natural"] = "natural"


PartitionerSpec = Annotated[
    IidPartitioner
    | DirichletPartitioner
    | ShardsPartitioner
    | QuantitySkewPartitioner
    | NaturalPartitioner,
    Field(discriminator="name"),
]


class DigitsSpec(_Spec):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; ships with the package).

    Parameters
    ----------
    partitioner : PartitionerSpec, default IidPartitioner()
        How the training split is cut into client partitions. ``natural`` is refused: digits has
        no per-device split.
    seed : int, default 0
        Seeds the train/test split and the partitioner.
    test_fraction : float, default 0.2
        Share of the examples held out (stratified by label) for server-side evaluation.
    validation_fraction : float, default 0.1
        Share of the *training* side (what is left after the test split) held out, stratified by
        label and seeded, as the validation split: rounds and settings are chosen on it, never
        on the test split. The clients' partitions are cut from the rest. 0 means no validation
        split (nothing is then chosen on held-out data).
    """

    name: Literal["digits"] = "digits"
    partitioner: PartitionerSpec = Field(default=IidPartitioner())
    seed: int = Field(default=0, ge=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    validation_fraction: float = Field(default=VALIDATION_FRACTION, ge=0, lt=1)

    @model_validator(mode="after")
    def _no_natural_split(self) -> Self:
        if isinstance(self.partitioner, NaturalPartitioner):
            raise ValueError(
                "partitioner 'natural' needs a dataset with a per-device split (e.g. 'synthetic');"
                " 'digits' has none: use 'iid', 'dirichlet', 'shards' or 'quantity_skew'"
            )
        return self


class SyntheticSpec(_Spec):
    """LEAF's Synthetic(alpha, beta) (Li et al., 2020, https://arxiv.org/abs/1812.06127).

    Device k has its own softmax-regression model and feature distribution:
    u_k ~ N(0, alpha^2), W_k, b_k ~ N(u_k, 1); B_k ~ N(0, beta^2), v_k ~ N(B_k, 1) per feature;
    x ~ N(v_k, diag(j^-1.2)); y = argmax(W_k x + b_k). As in LEAF's generator, alpha and beta are
    standard deviations.

    Note that u_k shifts every entry of W_k and b_k alike, which adds the same amount to every
    logit: alpha changes no label, so the observable heterogeneity (label and feature skew
    across devices) comes from beta and from each device drawing its own W_k.

    Parameters
    ----------
    alpha : float, default 1.0
        Spread of the device models (model heterogeneity).
    beta : float, default 1.0
        Spread of the device feature means (feature heterogeneity).
    num_devices : int, default 30
    num_features : int, default 60
    num_classes : int, default 10
    samples_mean, samples_sigma : float, default 4.0 and 2.0
        Samples per device are ``min(int(lognormal(samples_mean, samples_sigma)) + min_samples,
        max_samples)``, as in LEAF (which has no cap).
    min_samples : int, default 50
    max_samples : int, default 1000
        Cap, so one heavy-tailed draw does not dominate the dataset.
    partitioner : PartitionerSpec, default NaturalPartitioner()
        ``natural`` gives device d to partition d % num_partitions.
    seed : int, default 0
        Seeds generation, the train/test split and the partitioner.
    test_fraction : float, default 0.2
        Share of each device's samples held out; the held-out samples are pooled into one test set.
    validation_fraction : float, default 0.1
        Share of each device's *training* samples (what is left after the test split) held out,
        seeded, and pooled into the validation split; every device keeps at least one training
        sample. The clients' partitions are cut from the rest. 0 means no validation split.
    """

    name: Literal["synthetic"] = "synthetic"
    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=1.0, ge=0)
    num_devices: int = Field(default=30, ge=1)
    num_features: int = Field(default=60, ge=1)
    num_classes: int = Field(default=10, ge=2)
    samples_mean: float = 4.0
    samples_sigma: float = Field(default=2.0, ge=0)
    min_samples: int = Field(default=50, ge=2)
    max_samples: int = Field(default=1000, ge=2)
    partitioner: PartitionerSpec = Field(default=NaturalPartitioner())
    seed: int = Field(default=0, ge=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    validation_fraction: float = Field(default=VALIDATION_FRACTION, ge=0, lt=1)

    @model_validator(mode="after")
    def _sample_bounds(self) -> Self:
        if self.max_samples < self.min_samples:
            raise ValueError(
                f"max_samples ({self.max_samples}) must be >= min_samples ({self.min_samples})"
            )
        return self


DatasetSpec = Annotated[DigitsSpec | SyntheticSpec, Field(discriminator="name")]
