"""One way to derive a seed from its parts: numpy's SeedSequence, no arithmetic that collides."""

from __future__ import annotations

import hashlib

import numpy as np

_MASK_32 = 0xFFFF_FFFF
_INT, _STR = 0, 1


def _words(part: int | str) -> list[int]:
    # A type tag and a fixed width per part: (1, 2) and (12,) or ("1", 1) and (1, 1) never meet.
    if isinstance(part, bool) or not isinstance(part, int | str):
        raise TypeError(f"a seed part is an int or a str, not {type(part).__name__}")
    if isinstance(part, str):
        digest = int.from_bytes(hashlib.sha256(part.encode()).digest()[:8], "big")
        return [_STR, digest >> 32, digest & _MASK_32]
    if not 0 <= part < 2**64:
        raise ValueError(f"a seed part must be in [0, 2**64), got {part}")
    return [_INT, part >> 32, part & _MASK_32]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed for the stream named by ``parts`` (e.g. the experiment's seed, a purpose,
    a partition id, a round): every part matters, and different tuples give independent streams,
    unlike ``seed * 1000 + partition``, where seed 0 / partition 1000 meets seed 1 / partition 0.
    Fits every consumer: ``torch.manual_seed``, ``random.Random``, ``np.random.default_rng``.
    """
    entropy = [len(parts)] + [w for part in parts for w in _words(part)]
    (state,) = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return int(state) >> 1
