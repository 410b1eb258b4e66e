"""Model artefacts: a global model as safetensors bytes (or a torch ``.pt``), and which
checkpoints a retention policy keeps."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


class CheckpointPolicy(BaseModel):
    """Which rounds' global models an experiment keeps (the latest one always: it is the final
    model when the run ends, and where a resumed run starts).

    Parameters
    ----------
    every : int, default 1
        Keep the model of every k-th round (k, 2k, …).
    keep_last : int or None, default 5
        Of those, keep only the most recent n; None keeps them all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(default=1, ge=1, le=1_000_000, description="Keep every k-th round's model.")
    keep_last: int | None = Field(
        default=5,
        ge=1,
        le=1_000_000,
        description="Keep at most this many of those (the latest round's is kept besides); "
        "null keeps all.",
    )


def rounds_to_drop(kept: Sequence[int], new_round: int, policy: CheckpointPolicy) -> list[int]:
    """The kept rounds to delete once ``new_round``'s model is stored beside ``kept``.

    A round stays if it is the newest, or on the ``every`` grid and among the ``keep_last``
    newest of the grid's rounds.
    """
    rounds = sorted({*kept, new_round})
    on_grid = [r for r in rounds if r % policy.every == 0]
    keep = set(on_grid if policy.keep_last is None else on_grid[-policy.keep_last :])
    keep.add(rounds[-1])
    return [r for r in rounds if r not in keep]


def to_safetensors(
    weights: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> bytes:
    """The weights as a safetensors file (keys as in the model's state_dict)."""
    # safetensors wants C-contiguous arrays it owns no view into.
    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    return bytes(st_save(arrays, metadata=metadata))


def from_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The weights a safetensors file holds."""
    return dict(st_load(data))


def to_torch_file(data: bytes) -> bytes:
    """A safetensors file as a torch ``.pt`` state_dict (``torch.load(…, weights_only=True)``)."""
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in from_safetensors(data).items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def digest(data: bytes) -> str:
    """The artefact's content address."""
    return hashlib.sha256(data).hexdigest()
