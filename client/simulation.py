"""Virtual clients on Flower's Simulation Engine: a device profile for each, from a declared mix.

A virtual client has no ``--node-config`` of its own: the engine gives it only ``partition-id``
and ``num-partitions``. A simulation-mode run carries its experiment's profile mix in the run
config (``virtual-profiles``, e.g. ``"fast:1,normal:1,slow:1"``); :func:`virtual_node_mod`
adds the profile drawn for the node to the node-config the rest of the ClientApp reads, so
:func:`~florist.client.profiles.profile_mod` applies it on either clock and the reply's
node-config echo tells the server (and the dashboard) which profile the node had. A deployment
run's config leaves the key empty and the mod passes every message on unchanged.

The draw is a low-discrepancy (golden-ratio) sequence over partition ids with a phase derived
from the experiment's seed: node ``p`` falls in the mix's bin containing
``frac(phase + p·(√5 − 1)/2)``. Any run of consecutive ids then holds each profile in its share
to within a few nodes, whatever the mix, and the same seed gives every node the same profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from pydantic import ValidationError

from florist.client.profiles import PROFILES
from florist.client.protocol import TaskClock
from florist.datasets.seeds import derive_seed

# The run-config key holding a simulation run's profile mix (server/flwr_app/pyproject.toml).
RUN_CONFIG_KEY = "virtual-profiles"
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class ProfileMixError(ValueError):
    """A profile mix that names an unknown profile or has no positive weight."""


def check_entry(name: str, weight: float) -> None:
    """Refuse one entry of a mix: an unknown profile, or a weight that is not a number ≥ 0."""
    if name not in PROFILES:
        raise ProfileMixError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
        raise ProfileMixError(f"the weight of {name!r} must be a number ≥ 0, got {weight!r}")


def check_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """The mix as given, refused when an entry is (:func:`check_entry`) or no weight is
    positive."""
    for name, weight in mix.items():
        check_entry(name, weight)
    if not any(weight > 0 for weight in mix.values()):
        raise ProfileMixError("at least one profile needs a positive weight")
    return dict(mix)


def encode_mix(mix: Mapping[str, float]) -> str:
    """The run-config form of a mix: ``name:weight`` pairs, comma-separated, in the mix's order."""
    return ",".join(f"{name}:{weight!r}" for name, weight in check_mix(mix).items())


def decode_mix(text: str) -> dict[str, float]:
    """The mix :func:`encode_mix` wrote (empty text: no mix)."""
    if not text.strip():
        return {}
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, colon, weight = part.partition(":")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ProfileMixError(f"{part!r} is not 'name:weight'") from None
        if not colon:
            raise ProfileMixError(f"{part!r} is not 'name:weight'")
    return check_mix(mix)


def profile_position(seed: int, partition_id: int) -> float:
    """Where in [0, 1) virtual node ``partition_id`` falls for an experiment's ``seed``."""
    phase = derive_seed(seed, "virtual-profile") / 2.0**63
    return (phase + partition_id * _GOLDEN) % 1.0


def virtual_profile(mix: Mapping[str, float], seed: int, partition_id: int) -> str:
    """The profile name virtual node ``partition_id`` gets from ``mix`` (see the module doc)."""
    total = sum(mix.values())
    position = profile_position(seed, partition_id) * total
    upper = 0.0
    chosen = ""
    for name, weight in mix.items():
        if weight <= 0:
            continue
        chosen = name
        upper += weight
        if position < upper:
            break
    return chosen  # the last positive bin also takes a position rounded up to the total


def virtual_node_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Give a virtual client of a simulation run its profile (see the module docstring)."""
    text = context.run_config.get(RUN_CONFIG_KEY, "")
    if not isinstance(text, str) or not text or "profile" in context.node_config:
        return call_next(msg, context)
    partition = context.node_config.get("partition-id")
    if not isinstance(partition, int) or isinstance(partition, bool):
        return call_next(msg, context)
    config = msg.content.config_records.get("config", ConfigRecord())
    try:
        seed = TaskClock.from_config(config).seed
    except ValidationError:
        seed = 0  # the ClientApp itself refuses the unreadable task with its own error
    profile = virtual_profile(decode_mix(text), seed, partition)
    # A copy: the node's stored context keeps its state (shared) but not the drawn profile.
    node = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config={**context.node_config, "profile": profile},
        state=context.state,
        run_config=context.run_config,
    )
    return call_next(msg, node)
