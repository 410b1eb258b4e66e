"""Built-in text workload on a local copy of LEAF's Shakespeare: next-character prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from florist.client.models import LstmSpec
from florist.datasets import XY, DatasetInfo, PartitionerSpec
from florist.datasets.files import (
    SHAKESPEARE_SEQ_LEN,
    SHAKESPEARE_VOCAB,
    Split,
    UserSplit,
    leaf_expected,
    read_shakespeare,
)
from florist.datasets.spec import NaturalPartitioner

from .realdata import RealDataConfig, RealDataset, plugin


class ShakespeareConfig(RealDataConfig):
    """LEAF's Shakespeare; by default each speaking role is a device (natural split)."""

    partitioner: PartitionerSpec = Field(
        default=NaturalPartitioner(),
        description="natural (speaker s goes to partition s % num-partitions, speakers in sorted"
        " order), or iid/dirichlet/shards/quantity_skew over the pooled examples.",
    )
    model: LstmSpec = Field(
        default=LstmSpec(), description="LEAF's 2-layer LSTM (embedding 8, 256 units)."
    )


def _shakespeare(folder: Path, split: Split, full: bool) -> UserSplit:
    raw = read_shakespeare(folder, split)
    # XY's x is float32: token ids (< 80) are exact in it; the model turns them back to integers.
    data = XY(x=raw.data.x.astype(np.float32), y=raw.data.y)
    return UserSplit(data=data, users=raw.users)


shakespeare = plugin(
    RealDataset(
        "shakespeare",
        DatasetInfo(input_shape=(SHAKESPEARE_SEQ_LEN,), num_classes=len(SHAKESPEARE_VOCAB)),
        _shakespeare,
        leaf_expected(),
        images=False,
    ),
    "LEAF's Shakespeare: the next character after 80, one device per speaking role.",
    ShakespeareConfig,
    ("text", "classification", "natural-split"),
)
