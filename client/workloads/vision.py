"""Built-in image workloads on local copies of MNIST, Fashion-MNIST, CIFAR-10 and FEMNIST."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from florist.client.models import Cnn2Spec, CnnSpec, LogRegSpec, MlpSpec, ResNet18GnSpec
from florist.datasets import (
    DatasetInfo,
    DirichletPartitioner,
    IidPartitioner,
    PartitionerSpec,
    QuantitySkewPartitioner,
    ShardsPartitioner,
)
from florist.datasets.files import (
    FEMNIST_CLASSES,
    Split,
    UserSplit,
    cifar10_expected,
    leaf_expected,
    mnist_expected,
    read_cifar10,
    read_femnist,
    read_mnist,
)
from florist.datasets.spec import NaturalPartitioner

from .realdata import RealDataConfig, RealDataset, plugin

# Image data has no per-device split: the natural partitioner is not offered.
LabelPartitioner = Annotated[
    IidPartitioner | DirichletPartitioner | ShardsPartitioner | QuantitySkewPartitioner,
    Field(discriminator="name"),
]
VisionModel = Annotated[
    Cnn2Spec | ResNet18GnSpec | CnnSpec | MlpSpec | LogRegSpec, Field(discriminator="name")
]
_PARTITIONER_HELP = "How the shared copy's training side is cut into the nodes' partitions."
_MODEL_HELP = "cnn2 (McMahan et al. 2017), resnet18-gn, cnn, mlp or logreg."


class MnistConfig(RealDataConfig):
    """MNIST (or Fashion-MNIST) in its IDX files; McMahan et al.'s CNN by default."""

    partitioner: LabelPartitioner = Field(default=IidPartitioner(), description=_PARTITIONER_HELP)
    model: VisionModel = Field(default=Cnn2Spec(), description=_MODEL_HELP)


class Cifar10Config(RealDataConfig):
    """CIFAR-10 (python version); ResNet-18 with GroupNorm by default."""

    partitioner: LabelPartitioner = Field(default=IidPartitioner(), description=_PARTITIONER_HELP)
    model: VisionModel = Field(default=ResNet18GnSpec(), description=_MODEL_HELP)


class FemnistConfig(RealDataConfig):
    """FEMNIST in LEAF's JSON; by default each writer is a device (natural split)."""

    partitioner: PartitionerSpec = Field(
        default=NaturalPartitioner(),
        description="natural (writer w goes to partition w % num-partitions, writers in sorted "
        "order), or iid/dirichlet/shards/quantity_skew over the pooled examples.",
    )
    model: VisionModel = Field(default=Cnn2Spec(), description=_MODEL_HELP)


def _mnist(folder: Path, split: Split, full: bool) -> UserSplit:
    return UserSplit(data=read_mnist(folder, split))


def _cifar10(folder: Path, split: Split, full: bool) -> UserSplit:
    return UserSplit(data=read_cifar10(folder, split, require_all=full))


def _femnist(folder: Path, split: Split, full: bool) -> UserSplit:
    return read_femnist(folder, split)


_GREY_28 = DatasetInfo(input_shape=(1, 28, 28), num_classes=10, input_range=(0.0, 1.0))

mnist = plugin(
    RealDataset("mnist", _GREY_28, _mnist, mnist_expected()),
    "MNIST handwritten digits (28x28, 10 classes) from a local copy of its IDX files.",
    MnistConfig,
    ("image", "classification"),
)
fashion_mnist = plugin(
    RealDataset("fashion-mnist", _GREY_28, _mnist, mnist_expected()),
    "Fashion-MNIST clothing images (28x28, 10 classes) from a local copy of its IDX files.",
    MnistConfig,
    ("image", "classification"),
)
cifar10 = plugin(
    RealDataset(
        "cifar10",
        DatasetInfo(input_shape=(3, 32, 32), num_classes=10, input_range=(0.0, 1.0)),
        _cifar10,
        cifar10_expected(),
    ),
    "CIFAR-10 colour images (32x32, 10 classes) from a local copy of the python version.",
    Cifar10Config,
    ("image", "classification"),
)
femnist = plugin(
    RealDataset(
        "femnist",
        DatasetInfo(input_shape=(1, 28, 28), num_classes=FEMNIST_CLASSES, input_range=(0.0, 1.0)),
        _femnist,
        leaf_expected(),
    ),
    "LEAF's FEMNIST (28x28 digits and letters, 62 classes), one device per writer.",
    FemnistConfig,
    ("image", "classification", "natural-split"),
)
