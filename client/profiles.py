"""Device profiles: how fast, how available and how reliable a SuperNode pretends to be.

A SuperNode gets its profile through its ``--node-config`` (``profile="slow"``, or explicit keys
``seconds-per-step``, ``availability``, ``period-s``, ``dropout``, ``bandwidth-mbps`` that override
the named profile's values). :func:`profile_mod`, a Flower ClientApp mod, applies it to every train
message, under the experiment's clock (``florist.clock`` in the message's ConfigRecord):

- **wall**: the task really takes the profile's time. The node first waits out an offline spell
  (if the task arrived while its availability trace says offline), trains, then sleeps until
  ``local-steps × seconds_per_step + bytes·8 / bandwidth`` has passed.
- **virtual**: no sleeping; the simulated duration is reported and the server orders by it.

Either way a successful train reply carries ``virtual-duration`` (seconds, in its MetricRecord
``"metrics"``): the offline wait plus the simulated work. A node that drops out answers with an
error reply (code :data:`DROPOUT_ERROR_CODE`, reason ``"dropped out (profile …)
virtual-duration=…"``, parsed by :func:`dropout_duration`) and never with the trained model.
Evaluate (and query) messages pass through unchanged: profiles model the cost of training, and
federated evaluation is off by default.

Random draws (dropout, the offline phase) are seeded by the experiment's seed (``florist.seed``),
the node's ``partition-id`` and ``server-round``, so a virtual-clock run is reproducible.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Clock = Literal["wall", "virtual"]

CLOCK_KEY = "florist.clock"
SEED_KEY = "florist.seed"
ROUND_KEY = "server-round"
# Optional: the server's virtual clock when it sent the task. Without it, where in its on/off
# cycle the node is when a task arrives is drawn from the seed instead.
VIRTUAL_TIME_KEY = "virtual-time"
DURATION_METRIC = "virtual-duration"
STEPS_METRIC = "local-steps"
# Flower's own ErrorCode values are 0–8; this one says "the device profile dropped the task".
DROPOUT_ERROR_CODE = 100


class DeviceProfile(BaseModel):
    """How a simulated device behaves. The defaults are the neutral profile: no slowdown."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds_per_step: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="0 = as fast as the machine."
    )
    availability: float = Field(
        default=1.0, gt=0, le=1, description="Share of time online (FedScale-style on/off trace)."
    )
    period_s: float = Field(
        default=60.0,
        gt=0,
        allow_inf_nan=False,
        description="Length of one on/off cycle: online availability·period_s, then offline.",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Probability a task is dropped.")
    bandwidth_mbps: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="None = infinite bandwidth."
    )


# Speeds span 12× between fast and slow, in the range of FedCompass's normal/exponential fleets,
# small enough that the demo (digits, ~30 steps a round) takes seconds a round on the slowest node.
PROFILES: dict[str, DeviceProfile] = {
    "neutral": DeviceProfile(),
    "fast": DeviceProfile(seconds_per_step=0.005),
    "normal": DeviceProfile(seconds_per_step=0.02),
    "slow": DeviceProfile(seconds_per_step=0.06),
    "flaky": DeviceProfile(seconds_per_step=0.02, dropout=0.2),
}

# node-config key -> DeviceProfile field
PROFILE_KEYS: dict[str, str] = {
    "seconds-per-step": "seconds_per_step",
    "availability": "availability",
    "period-s": "period_s",
    "dropout": "dropout",
    "bandwidth-mbps": "bandwidth_mbps",
}
NO_BANDWIDTH_LIMIT = ("none", "inf", "infinite", "")


class ProfileError(ValueError):
    """A SuperNode's node-config holds an unusable device profile."""


def profile_from_node_config(node_config: Mapping[str, Any]) -> DeviceProfile:
    """The profile a SuperNode's ``--node-config`` describes; no profile keys → neutral.

    ``profile`` names a base profile (:data:`PROFILES`); explicit keys override its values.
    ``bandwidth-mbps`` may be ``"none"`` or ``"inf"`` for no limit.
    """
    name = node_config.get("profile", "neutral")
    if not isinstance(name, str) or name not in PROFILES:
        raise ProfileError(f"profile: unknown profile {name!r}; known: {', '.join(PROFILES)}")
    values = PROFILES[name].model_dump()
    for key, field in PROFILE_KEYS.items():
        if key not in node_config:
            continue
        raw = node_config[key]
        if key == "bandwidth-mbps" and isinstance(raw, str) and raw.lower() in NO_BANDWIDTH_LIMIT:
            values[field] = None
        elif isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ProfileError(f"{key}: expected a number, got {raw!r}")
        else:
            values[field] = float(raw)
    try:
        return DeviceProfile.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0])
        key = next(k for k, f in PROFILE_KEYS.items() if f == field)
        raise ProfileError(f"{key}: {err['msg']} (got {err['input']!r})") from None


def describe(profile: DeviceProfile) -> str:
    """The profile's name if it is a named one, else its non-default values."""
    for name, named in PROFILES.items():
        if named == profile:
            return name
    return ", ".join(f"{k}={v}" for k, v in profile.model_dump(exclude_defaults=True).items())


def _rng(seed: int, node: int, server_round: int, purpose: str) -> random.Random:
    # A string seed goes through SHA-512: the same draw in every process, whatever PYTHONHASHSEED.
    return random.Random(f"{seed}:{node}:{server_round}:{purpose}")


def offline_wait(profile: DeviceProfile, now: float, seed: int, node: int) -> float:
    """Seconds until the node is online again at time ``now`` (0 if it is online).

    Each node cycles through ``period_s``: online for ``availability·period_s``, then offline,
    with a phase drawn once per (seed, node), as in FedScale's availability traces.
    """
    if profile.availability >= 1.0:
        return 0.0
    phase = _rng(seed, node, 0, "phase").uniform(0.0, profile.period_s)
    position = (now + phase) % profile.period_s
    online = profile.availability * profile.period_s
    return 0.0 if position < online else profile.period_s - position


def work_seconds(profile: DeviceProfile, steps: int, bytes_down: int, bytes_up: int) -> float:
    """Simulated compute plus transfer time of one task."""
    compute = steps * profile.seconds_per_step
    if profile.bandwidth_mbps is None:
        return compute
    return compute + (bytes_down + bytes_up) * 8 / (profile.bandwidth_mbps * 1e6)


def dropout_duration(error: Error) -> float | None:
    """The virtual time a dropped task ran before the node vanished (None: not a dropout)."""
    if error.code != DROPOUT_ERROR_CODE or error.reason is None:
        return None
    match = re.search(rf"{DURATION_METRIC}=([0-9.eE+-]+)", error.reason)
    return float(match.group(1)) if match else None


def _array_bytes(msg: Message) -> int:
    return sum(record.count_bytes() for record in msg.content.array_records.values())


def _int(values: Mapping[str, Any], key: str, default: int) -> int:
    value = values.get(key, default)
    return int(value) if isinstance(value, int | float) else default


# Module-level so tests can record sleeps instead of sleeping.
sleep: Callable[[float], None] = time.sleep
now: Callable[[], float] = time.time


def profile_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the node's device profile to a train message (see the module docstring)."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    profile = profile_from_node_config(context.node_config)
    config = msg.content.config_records.get("config", ConfigRecord())
    clock = config.get(CLOCK_KEY, "wall")
    if clock not in ("wall", "virtual"):
        raise ProfileError(f"{CLOCK_KEY}: expected 'wall' or 'virtual', got {clock!r}")
    seed = _int(config, SEED_KEY, 0)
    node = _int(context.node_config, "partition-id", context.node_id)
    # The event runtime may send a node the same round twice; "task-repeat" tells them apart.
    server_round = _int(config, ROUND_KEY, 0) * 1_000 + _int(config, "task-repeat", 0)

    if clock == "wall":
        arrived = now()
    elif isinstance(config.get(VIRTUAL_TIME_KEY), int | float):
        arrived = float(config[VIRTUAL_TIME_KEY])  # type: ignore[arg-type]
    else:
        arrived = _rng(seed, node, server_round, "arrival").uniform(0.0, profile.period_s)
    waited = offline_wait(profile, arrived, seed, node)
    if clock == "wall" and waited > 0:
        sleep(waited)

    started = time.monotonic()
    reply = call_next(msg, context)
    elapsed = time.monotonic() - started
    if reply.has_error():
        return reply

    metrics = reply.content.metric_records.get("metrics")
    steps = metrics.get(STEPS_METRIC, 0) if metrics is not None else 0
    steps = int(steps) if isinstance(steps, int | float) else 0
    work = work_seconds(profile, steps, _array_bytes(msg), _array_bytes(reply))

    draws = _rng(seed, node, server_round, "dropout")
    if draws.random() < profile.dropout:
        # The node vanishes part-way through its work.
        lasted = draws.random() * work
        if clock == "wall":
            sleep(max(0.0, lasted - elapsed))
        reason = (
            f"dropped out (profile {describe(profile)}) {DURATION_METRIC}={waited + lasted:.6f}"
        )
        return Message(Error(code=DROPOUT_ERROR_CODE, reason=reason), reply_to=msg)

    if clock == "wall":
        remaining = work - elapsed
        if remaining > 0 and math.isfinite(remaining):
            sleep(remaining)
    if metrics is None:
        metrics = MetricRecord()
        reply.content["metrics"] = metrics
    metrics[DURATION_METRIC] = waited + work
    return reply
