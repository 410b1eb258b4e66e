"""Model specs and the torch modules they build for a dataset's input shape and class count."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal, assert_never

import torch
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


class Cnn2Spec(_Spec):
    """The CNN of McMahan et al. 2017 (https://arxiv.org/abs/1602.05629) for MNIST: two 5x5
    convs (32 and 64 channels, padding 2), each followed by a 2x2 max-pool, a 512-unit ReLU
    layer and a linear layer to the class logits (softmax is in the loss). 1,663,370
    parameters on 28x28x1 input with 10 classes."""

    name: Literal["cnn2"] = "cnn2"


class ResNet18GnSpec(_Spec):
    """ResNet-18 for 32x32 images (He et al. 2016, CIFAR stem: one 3x3 conv, no max-pool) with
    GroupNorm instead of BatchNorm, as in Hsieh et al. 2020 (https://arxiv.org/abs/1910.00189):
    batch statistics differ from client to client and do not average well.

    Parameters
    ----------
    groups : int, default 2
        GroupNorm groups in every normalisation layer (the paper's setting).
    """

    name: Literal["resnet18-gn"] = "resnet18-gn"
    groups: int = Field(default=2, ge=1, le=64)


class LstmSpec(_Spec):
    """LEAF's next-character model (Caldas et al. 2018, https://arxiv.org/abs/1812.01097):
    token ids -> an embedding -> stacked LSTM layers -> a linear layer from the last step's
    hidden state to the vocabulary. The vocabulary is the dataset's class count (the targets
    are the next character).

    Parameters
    ----------
    embedding_dim : int, default 8
    hidden : int, default 256
    layers : int, default 2
    """

    name: Literal["lstm"] = "lstm"
    embedding_dim: int = Field(default=8, ge=1)
    hidden: int = Field(default=256, ge=1)
    layers: int = Field(default=2, ge=1, le=8)


ModelSpec = Annotated[LogRegSpec | MlpSpec | CnnSpec, Field(discriminator="name")]
# Every model build_model knows: the generic ones above plus the papers' models, which the
# real-data workloads offer (client/workloads/vision.py, text.py).
AnyModelSpec = LogRegSpec | MlpSpec | CnnSpec | Cnn2Spec | ResNet18GnSpec | LstmSpec


def build_model(spec: AnyModelSpec, info: DatasetInfo) -> nn.Module:
    """A fresh, randomly initialised module mapping (batch, *input_shape) floats to class logits.

    Initialisation uses torch's global generator; seed it before calling for reproducible weights.

    Raises
    ------
    ValueError
        If the model cannot take the dataset's input (a conv net on non-image data, an LSTM on
        anything but token sequences).
    """
    match spec:
        case LogRegSpec():
            return _mlp(info, hidden=[], dropout=0.0)
        case MlpSpec():
            return _mlp(info, hidden=spec.hidden, dropout=spec.dropout)
        case CnnSpec():
            return _cnn(spec, info)
        case Cnn2Spec():
            return _cnn2(info)
        case ResNet18GnSpec():
            return _resnet18_gn(spec, info)
        case LstmSpec():
            return _CharLstm(spec, info)
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


def _image_shape(model: str, info: DatasetInfo, min_side: int) -> tuple[int, int, int]:
    if len(info.input_shape) != 3 or min(info.input_shape[1:]) < min_side:
        raise ValueError(
            f"model {model!r} needs image input (C, H, W) with H, W >= {min_side};"
            f" dataset gives shape {info.input_shape}"
        )
    c, h, w = info.input_shape
    return c, h, w


def _cnn2(info: DatasetInfo) -> nn.Module:
    in_channels, height, width = _image_shape("cnn2", info, 4)
    # "same" padding keeps each conv's size; each pool halves it (28 -> 14 -> 7).
    flat = 64 * (height // 2 // 2) * (width // 2 // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, info.num_classes),
    )


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 conv on the shortcut where the shape
    changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.GroupNorm(groups, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet18_gn(spec: ResNet18GnSpec, info: DatasetInfo) -> nn.Module:
    in_channels, _, _ = _image_shape("resnet18-gn", info, 8)
    widths: Sequence[int] = (64, 128, 256, 512)
    if any(w % spec.groups for w in widths):
        raise ValueError(f"resnet18-gn: groups={spec.groups} must divide 64")
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 3, 1, padding=1, bias=False),
        nn.GroupNorm(spec.groups, 64),
        nn.ReLU(),
    ]
    channels = 64
    for stage, width in enumerate(widths):
        # Every stage after the first halves the resolution in its first block.
        stride = 1 if stage == 0 else 2
        layers += [
            _BasicBlock(channels, width, stride, spec.groups),
            _BasicBlock(width, width, 1, spec.groups),
        ]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, info.num_classes)]
    return nn.Sequential(*layers)


class _CharLstm(nn.Module):
    def __init__(self, spec: LstmSpec, info: DatasetInfo) -> None:
        super().__init__()
        if len(info.input_shape) != 1:
            raise ValueError(
                f"model 'lstm' needs token sequences (seq_len,); dataset gives {info.input_shape}"
            )
        self.embedding = nn.Embedding(info.num_classes, spec.embedding_dim)
        self.lstm = nn.LSTM(spec.embedding_dim, spec.hidden, spec.layers, batch_first=True)
        self.head = nn.Linear(spec.hidden, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token ids arrive as float32 (XY's x dtype; ids < 2**24 are exact) and index the
        # embedding as integers.
        out, _ = self.lstm(self.embedding(x.long()))
        return self.head(out[:, -1])
