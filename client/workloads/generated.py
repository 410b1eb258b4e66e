"""The built-in workloads on data every node can generate: scikit-learn's digits and LEAF's
synthetic task, each node training on its partition (``partition-id`` of ``num-partitions``)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from florist.client.models import MlpSpec, ModelSpec, build_model
from florist.datasets import (
    XY,
    DigitsSpec,
    InputRange,
    SyntheticSpec,
    data_extent,
    dataset_info,
    load_partition,
    load_test,
    load_validation,
)

from . import ClientData, WorkloadConfig, WorkloadPlugin


class _Generated(WorkloadConfig):
    """A dataset spec's settings plus the model trained on it."""

    model: ModelSpec = Field(
        # An instance, not a factory: the JSON schema then shows the default (specs are frozen).
        default=MlpSpec(name="mlp"),
        description="logreg, mlp (hidden widths, dropout) or cnn (image data only).",
    )

    def dataset(self) -> DigitsSpec | SyntheticSpec:
        raise NotImplementedError


class DigitsConfig(DigitsSpec, _Generated):
    """scikit-learn's 8x8 digits (ships with the package), split by a partitioner."""

    def dataset(self) -> DigitsSpec:
        return DigitsSpec.model_validate(self.model_dump(exclude={"model"}))


class SyntheticConfig(SyntheticSpec, _Generated):
    """LEAF's Synthetic(α, β), device d going to partition d % num_partitions by default."""

    def dataset(self) -> SyntheticSpec:
        return SyntheticSpec.model_validate(self.model_dump(exclude={"model"}))


def _model(config: _Generated) -> nn.Module:
    return build_model(config.model, dataset_info(config.dataset()))


def _train(config: _Generated, client: ClientData) -> XY:
    pid, num = client.require_partition(config.dataset().name)
    return load_partition(config.dataset(), pid, num)


def _local_test(config: _Generated, client: ClientData) -> XY:
    # Federated evaluation: each node takes every num-th example of the held-out test split.
    pid, num = client.require_partition(config.dataset().name)
    test = load_test(config.dataset())
    return XY(x=test.x[pid::num], y=test.y[pid::num], input_range=test.input_range)


def _test(config: _Generated) -> XY:
    return load_test(config.dataset())


def _validation(config: _Generated) -> XY:
    return load_validation(config.dataset())


def _input_range(config: _Generated) -> InputRange:
    return dataset_info(config.dataset()).input_range


def _extent(config: _Generated) -> tuple[float, float]:
    return data_extent(config.dataset())


def _plugin(name: str, summary: str, config_model: type[_Generated]) -> WorkloadPlugin:
    return WorkloadPlugin(
        name=name,
        summary=summary,
        config_model=config_model,
        build_model=_model,
        load_train=_train,
        load_test=_test,
        load_validation=_validation,
        load_local_test=_local_test,
        input_range=_input_range,
        data_extent=_extent,
        tags=("generated", "classification"),
    )


digits = _plugin(
    "digits",
    "scikit-learn's 8x8 handwritten digits (10 classes), partitioned across the nodes.",
    DigitsConfig,
)
synthetic = _plugin(
    "synthetic",
    "LEAF's Synthetic(α, β) softmax-regression task with a per-device split.",
    SyntheticConfig,
)
