"""Byzantine attack mods: a SuperNode whose node-config sets ``attack`` sends a poisoned update.

Set with ``--node-config 'attack=NAME attack-strength=S'`` (the keys are echoed with every reply, so
the server records them with the node and the dashboard marks it). With Δ the node's honest
update (its trained model minus the model it was sent) and s the strength:

=============  ========================================================  ==========
attack         what the node sends instead of x_sent + Δ                  default s
=============  ========================================================  ==========
sign-flip      x_sent − s·Δ                                               1
scale          x_sent + s·Δ (boosting, model replacement)                 10
noise          x_sent + s·ξ, ξ ~ N(0, I) seeded per node and round        1
label-flip     honest training on labels y → C − 1 − y for a share s of   1
               the examples (C: the model's number of outputs)
alie           x_sent + μ − s·σ ("A little is enough", Baruch et al.,     1
               NeurIPS 2019)
ipm            x_sent − s·μ (inner-product manipulation, Xie et al.,      0.1
               UAI 2020)
=============  ========================================================  ==========

ALIE and IPM are colluding attacks: in the papers the attackers know the coordinate-wise mean μ
and standard deviation σ of the honest updates. A node here knows only its own data, so it
estimates them: it trains ``attack-samples`` times (default 3 for ALIE, 1 for IPM) from the
model it was sent, each run on its own minibatch order (the task's seed stream, shifted per
run), and takes μ, σ over those runs. Its run state (momentum, control variates) is restored
after the extra runs, so they leave no trace in later rounds. This is weaker than the
omniscient attack: σ from one node's reruns is smaller than the spread across non-IID nodes, and
μ leans toward the attacker's own data; raise the strength to compensate.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from florist.client.protocol import TrainInstruction
from florist.client.task import task_from_config
from florist.datasets import XY
from florist.datasets.seeds import derive_seed

ATTACK_KEY = "attack"
STRENGTH_KEY = "attack-strength"
SAMPLES_KEY = "attack-samples"
AttackName = Literal["sign-flip", "scale", "label-flip", "alie", "ipm", "noise"]
DEFAULT_STRENGTH: dict[str, float] = {
    "sign-flip": 1.0,
    "scale": 10.0,
    "label-flip": 1.0,
    "alie": 1.0,
    "ipm": 0.1,
    "noise": 1.0,
}
DEFAULT_SAMPLES = {"alie": 3, "ipm": 1}
# Task repeats of the estimation runs start here, far from any repeat the loop sends.
_ESTIMATE_REPEAT = 1_000_000


class AttackError(ValueError):
    """A node-config's attack keys are unusable; the message names the key."""


class Attack(BaseModel):
    """One node's attack, read from its node-config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AttackName
    strength: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    samples: int = Field(default=1, ge=1, le=100)


def attack_from_node_config(node_config: Mapping[str, Any]) -> Attack | None:
    """The node's attack, or None when its node-config sets none (raises AttackError)."""
    name = node_config.get(ATTACK_KEY)
    if name in (None, "", "none"):
        for key in (STRENGTH_KEY, SAMPLES_KEY):
            if key in node_config:
                raise AttackError(f"{key}: set without {ATTACK_KEY}")
        return None
    if not isinstance(name, str) or name not in DEFAULT_STRENGTH:
        raise AttackError(
            f"{ATTACK_KEY}: unknown attack {name!r}; known: {', '.join(DEFAULT_STRENGTH)}"
        )
    raw: dict[str, Any] = {
        "name": name,
        "strength": node_config.get(STRENGTH_KEY, DEFAULT_STRENGTH[name]),
        "samples": node_config.get(SAMPLES_KEY, DEFAULT_SAMPLES.get(name, 1)),
    }
    for key, field in ((STRENGTH_KEY, "strength"), (SAMPLES_KEY, "samples")):
        if isinstance(raw[field], bool) or not isinstance(raw[field], int | float):
            raise AttackError(f"{key}: expected a number, got {raw[field]!r}")
    if name == "alie" and raw["samples"] < 2:
        raise AttackError(f"{SAMPLES_KEY}: ALIE needs at least 2 runs to estimate σ")
    try:
        return Attack.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = STRENGTH_KEY if err["loc"][0] == "strength" else SAMPLES_KEY
        raise AttackError(f"{key}: {err['msg']} (got {err['input']!r})") from None


# --- pure maths on one model's arrays -----------------------------------------------------------

Weights = dict[str, np.ndarray]


def _floating(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def poisoned_update(
    attack: Attack, sent: Weights, honest: list[Weights], rng: np.random.Generator
) -> Weights:
    """The model an attacking node sends, from the model it was sent and its honest model(s).

    ``honest[0]`` is its real honest run; the others are the estimation runs of ALIE and IPM.
    Integer arrays (counters) are sent as trained.
    """
    s = attack.strength
    out: Weights = {}
    for key, x0 in sent.items():
        trained = honest[0][key]
        if not _floating(trained):
            out[key] = trained
            continue
        deltas = np.stack([h[key].astype(np.float64) - x0 for h in honest])
        delta = deltas[0]
        if attack.name == "sign-flip":
            bad = -s * delta
        elif attack.name == "scale":
            bad = s * delta
        elif attack.name == "noise":
            bad = s * rng.standard_normal(x0.shape)
        elif attack.name == "alie":
            bad = deltas.mean(axis=0) - s * deltas.std(axis=0)
        elif attack.name == "ipm":
            bad = -s * deltas.mean(axis=0)
        else:  # label-flip poisons the data, not the update
            bad = delta
        out[key] = (x0 + bad).astype(trained.dtype)
    return out


def flip_labels(data: XY, num_classes: int, share: float, seed: int) -> XY:
    """``data`` with y → C − 1 − y on a seeded share of its examples (all of them at share 1)."""
    y = data.y.copy()
    count = round(min(share, 1.0) * len(y))
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), size=count, replace=False) if count < len(y) else np.arange(len(y))
    y[idx] = num_classes - 1 - y[idx]
    return XY(x=data.x, y=y, input_range=data.input_range)


def num_outputs(model: torch.nn.Module, data: XY) -> int:
    """The number of classes a classifier scores: its output width on one example."""
    with torch.no_grad():
        device = next(model.parameters()).device
        out = model(torch.from_numpy(data.x[:1]).to(device))
    return int(out.shape[-1])


def poison_data(data: XY, node_config: Mapping[str, Any], model: torch.nn.Module, seed: int) -> XY:
    """The training data a node uses: label-flipped if its attack says so, else as it is."""
    attack = attack_from_node_config(node_config)
    if attack is None or attack.name != "label-flip" or len(data) == 0:
        return data
    return flip_labels(data, num_outputs(model, data), attack.strength, seed)


# --- the mod ------------------------------------------------------------------------------------


def _weights(record: ArrayRecord) -> Weights:
    return {k: v.numpy() for k, v in record.items()}


def _estimates(
    msg: Message, context: Context, call_next: ClientAppCallable, runs: int
) -> list[Weights]:
    """``runs`` extra honest models for ALIE/IPM; the message and the node's run state are left
    as they were."""
    config = msg.content.config_records["config"]
    key = TrainInstruction.key("task_repeat")
    original = config.get(key)
    out: list[Weights] = []
    try:
        for j in range(runs):
            # Another task repeat trains on other minibatches (the ClientApp's seed stream). The
            # message itself is reused: a ClientApp may not build messages of its own.
            config[key] = _ESTIMATE_REPEAT + j
            saved = copy.deepcopy(context.state)
            reply = call_next(msg, context)
            context.state = saved
            if not reply.has_error():
                out.append(_weights(reply.content.array_records["arrays"]))
    finally:
        if original is None:
            del config[key]
        else:
            config[key] = original
    return out


def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Poison this node's training reply as its node-config's ``attack`` says."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    attack = attack_from_node_config(context.node_config)
    if attack is None or attack.name == "label-flip":  # label-flip acts in the ClientApp's data
        return call_next(msg, context)
    extra: list[Weights] = []
    if attack.name in ("alie", "ipm") and attack.samples > 1:
        extra = _estimates(msg, context, call_next, attack.samples - 1)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    config = msg.content.config_records.get("config", ConfigRecord())
    instruction = TrainInstruction.from_record_dict(config)
    pid = context.node_config.get("partition-id")
    node = int(pid) if isinstance(pid, int | float) else context.node_id
    seed = derive_seed(
        task_from_config(config).seed,
        "attack",
        node,
        instruction.server_round,
        instruction.task_repeat,
    )
    sent = _weights(msg.content.array_records["arrays"])
    honest = [_weights(reply.content.array_records["arrays"]), *extra]
    bad = poisoned_update(attack, sent, honest, np.random.default_rng(seed))
    reply.content["arrays"] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in bad.items()}
    )
    return reply
