"""Model specs and the torch modules they build for a dataset's input shape and class count."""

from __future__ import annotations

import math
from typing import Annotated, Literal, assert_never

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from florist.datasets import DatasetInfo


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogRegSpec(_Spec):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    name: Literal["logreg"] = "logreg"


class MlpSpec(_Spec):
    """Fully connected ReLU network on the flattened input.

    Parameters
    ----------
    hidden : list[int], default [64]
        Width of each hidden layer, in order; empty gives logistic regression.
    dropout : float, default 0.0
        Dropout after each hidden activation; 0 adds no dropout layers.
    """

    name: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default=[64])
    dropout: float = Field(default=0.0, ge=0, lt=1)


class CnnSpec(_Spec):
    """Small conv net for small images: two 3x3 convs (padding 1), one 2x2 max-pool, an MLP head.

    Parameters
    ----------
    channels : int, default 16
        Channels of the first conv; the second has twice as many.
    hidden : int, default 64
        Width of the hidden layer of the head.
    """

    name: Literal["cnn"] = "cnn"
    channels: int = Field(default=16, ge=1)
    hidden: int = Field(default=64, ge=1)


ModelSpec = Annotated[LogRegSpec | MlpSpec | CnnSpec, Field(discriminator="name")]


def build_model(spec: ModelSpec, info: DatasetInfo) -> nn.Module:
    """A fresh, randomly initialised module mapping (batch, *input_shape) floats to class logits.

    Initialisation uses torch's global generator; seed it before calling for reproducible weights.

    Raises
    ------
    ValueError
        If the model cannot take the dataset's input (``cnn`` on non-image data).
    """
    match spec:
        case LogRegSpec():
            return _mlp(info, hidden=[], dropout=0.0)
        case MlpSpec():
            return _mlp(info, hidden=spec.hidden, dropout=spec.dropout)
        case CnnSpec():
            return _cnn(spec, info)
        case _:
            assert_never(spec)


def _mlp(info: DatasetInfo, hidden: list[int], dropout: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(info.input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, info.num_classes))
    return nn.Sequential(*layers)


def _cnn(spec: CnnSpec, info: DatasetInfo) -> nn.Module:
    if len(info.input_shape) != 3 or min(info.input_shape[1:]) < 2:
        raise ValueError(
            "model 'cnn' needs image input (C, H, W) with H, W >= 2;"
            f" dataset gives shape {info.input_shape}"
        )
    in_channels, height, width = info.input_shape
    out_channels = 2 * spec.channels
    return nn.Sequential(
        nn.Conv2d(in_channels, spec.channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(spec.channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(out_channels * (height // 2) * (width // 2), spec.hidden),
        nn.ReLU(),
        nn.Linear(spec.hidden, info.num_classes),
    )
