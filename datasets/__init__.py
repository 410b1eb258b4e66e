"""Florist datasets: validated specs, partitioners and cached loaders for client and server data."""

from florist.datasets.loaders import (
    XY,
    DatasetInfo,
    InputRange,
    data_extent,
    dataset_info,
    load_partition,
    load_test,
    load_train,
    load_validation,
)
from florist.datasets.partition import holdout_indices, partition_indices
from florist.datasets.spec import (
    DatasetSpec,
    DigitsSpec,
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    PartitionerSpec,
    QuantitySkewPartitioner,
    ShardsPartitioner,
    SyntheticSpec,
)

__all__ = [
    "XY",
    "DatasetInfo",
    "DatasetSpec",
    "DigitsSpec",
    "DirichletPartitioner",
    "IidPartitioner",
    "InputRange",
    "NaturalPartitioner",
    "PartitionerSpec",
    "QuantitySkewPartitioner",
    "ShardsPartitioner",
    "SyntheticSpec",
    "data_extent",
    "dataset_info",
    "holdout_indices",
    "load_partition",
    "load_test",
    "load_train",
    "load_validation",
    "partition_indices",
]
