"""Attack mods (client/attacks.py): poisoned updates, node-config keys, the ClientApp path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from florist.client.attacks import (
    Attack,
    AttackError,
    _estimates,
    attack_from_node_config,
    flip_labels,
    poisoned_update,
)
from florist.datasets import XY
from florist.server.metrics import ACCURACY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec

SENT = {"w": np.array([1.0, 1.0], dtype=np.float32), "n": np.array([4], dtype=np.int64)}
HONEST = {"w": np.array([2.0, 3.0], dtype=np.float32), "n": np.array([5], dtype=np.int64)}
RNG = np.random.default_rng(0)


def poison(name: str, strength: float, honest: list[dict[str, np.ndarray]] | None = None) -> Any:
    attack = Attack(name=name, strength=strength, samples=len(honest or [HONEST]))  # type: ignore[arg-type]
    return poisoned_update(attack, SENT, honest or [HONEST], np.random.default_rng(0))


def test_sign_flip_and_scale_act_on_the_delta_not_the_model() -> None:
    # Δ = (1, 2). Flipping the model itself would give (−2, −3).
    np.testing.assert_allclose(poison("sign-flip", 1.0)["w"], [0.0, -1.0])
    np.testing.assert_allclose(poison("sign-flip", 2.0)["w"], [-1.0, -3.0])
    np.testing.assert_allclose(poison("scale", 10.0)["w"], [11.0, 21.0])
    out = poison("scale", 10.0)
    assert out["w"].dtype == np.float32
    # Counters are sent as trained.
    np.testing.assert_array_equal(out["n"], [5])


def test_alie_and_ipm_use_the_mean_and_spread_of_the_runs() -> None:
    runs = [
        {"w": np.array([2.0, 3.0], dtype=np.float32), "n": np.array([5])},
        {"w": np.array([4.0, 3.0], dtype=np.float32), "n": np.array([5])},
        {"w": np.array([0.0, 3.0], dtype=np.float32), "n": np.array([5])},
    ]
    # Deltas (1,2), (3,2), (−1,2): μ = (1, 2), σ = (√(8/3), 0).
    alie = poison("alie", 1.0, runs)
    np.testing.assert_allclose(alie["w"], [1 + 1 - np.sqrt(8 / 3), 3.0], rtol=1e-6)
    ipm = poison("ipm", 0.5, runs)
    np.testing.assert_allclose(ipm["w"], [0.5, 0.0])


def test_noise_is_seeded_gaussian_of_the_strength() -> None:
    sent = {"w": np.zeros(20_000, dtype=np.float32)}
    attack = Attack(name="noise", strength=3.0)
    a = poisoned_update(attack, sent, [sent], np.random.default_rng(1))
    b = poisoned_update(attack, sent, [sent], np.random.default_rng(1))
    np.testing.assert_array_equal(a["w"], b["w"])
    assert abs(float(a["w"].std()) - 3.0) < 0.1


def test_label_flip_maps_y_to_c_minus_1_minus_y_on_a_share() -> None:
    data = XY(x=np.zeros((4, 1), dtype=np.float32), y=np.array([0, 1, 2, 9]))
    np.testing.assert_array_equal(flip_labels(data, 10, 1.0, 0).y, [9, 8, 7, 0])
    half = flip_labels(data, 10, 0.5, 0)
    assert int((half.y != data.y).sum()) == 2
    np.testing.assert_array_equal(data.y, [0, 1, 2, 9])  # the node's cached data is untouched


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"attack": "flip"}, "attack:"),
        ({"attack": "scale", "attack-strength": -1}, "attack-strength"),
        ({"attack": "scale", "attack-strength": "big"}, "attack-strength"),
        ({"attack": "alie", "attack-samples": 1}, "attack-samples"),
        ({"attack-strength": 2.0}, "attack-strength"),
    ],
)
def test_bad_node_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(AttackError, match=key):
        attack_from_node_config(config)


def test_node_config_defaults() -> None:
    assert attack_from_node_config({"profile": "fast"}) is None
    assert attack_from_node_config({"attack": "ipm"}) == Attack(name="ipm", strength=0.1, samples=1)
    assert attack_from_node_config({"attack": "alie", "attack-strength": 2}) == Attack(
        name="alie", strength=2.0, samples=3
    )


def _spec(strategy: str, config: dict[str, Any], rounds: int) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": "attack",
            "strategy": {"name": strategy, "config": config},
            "dataset": {"name": "digits", "partitioner": {"name": "iid"}, "seed": 0},
            "model": {"name": "logreg"},
            "training": {"lr": 0.1, "batch_size": 32, "local_epochs": 1, "momentum": 0.0},
            "rounds": rounds,
            "clients": {"min": 5},
            "seed": 0,
            "reply_checks": {"norm_bound": {"kind": "none"}},
        }
    )


def _replies(node_configs: list[dict[str, Any]]) -> dict[int, tuple[Message, Message]]:
    seen: dict[int, tuple[Message, Message]] = {}

    def tamper(node: int, request: Message, reply: Message) -> Message:
        seen[node] = (request, reply)
        return reply

    run_local(_spec("fedavg", {}, 1), 5, tamper=tamper, node_configs=node_configs)
    return seen


def _arrays(msg: Message) -> np.ndarray:
    record = msg.content.array_records["arrays"]
    return np.concatenate([v.numpy().ravel() for v in record.values()])


def test_the_clientapp_sends_the_flipped_update_of_the_honest_run() -> None:
    clean = _replies([{} for _ in range(5)])
    attacked = _replies([{"attack": "sign-flip"}, *({} for _ in range(4))])
    sent = _arrays(attacked[1000][0])
    honest = _arrays(clean[1000][1])
    np.testing.assert_allclose(_arrays(attacked[1000][1]), 2 * sent - honest, atol=1e-6)
    # The other nodes are untouched, and the attacker's node-config goes back with its reply.
    np.testing.assert_array_equal(_arrays(attacked[1001][1]), _arrays(clean[1001][1]))
    echoed = attacked[1000][1].content.config_records["node-config"]
    assert echoed["attack"] == "sign-flip"


def test_ipm_and_alie_through_the_clientapp() -> None:
    clean = _replies([{} for _ in range(5)])
    ipm = _replies([{"attack": "ipm", "attack-strength": 0.5}, *({} for _ in range(4))])
    sent = _arrays(ipm[1000][0])
    honest = _arrays(clean[1000][1])
    np.testing.assert_allclose(_arrays(ipm[1000][1]), sent - 0.5 * (honest - sent), atol=1e-6)
    # ALIE's three runs differ in their minibatches: μ − σ is not the honest Δ, and σ > 0.
    alie = _replies([{"attack": "alie", "attack-strength": 1.0}, *({} for _ in range(4))])
    bad = _arrays(alie[1000][1]) - sent
    assert not np.allclose(bad, honest - sent, atol=1e-4)
    assert float(np.abs(bad).sum()) > 0


def test_robust_median_resists_scaled_attackers_where_fedavg_does_not() -> None:
    configs = [{"attack": "sign-flip", "attack-strength": 20.0}] * 2 + [{}] * 3
    _, fedavg = run_local(_spec("fedavg", {}, 6), 5, node_configs=configs)
    _, median = run_local(_spec("robust-median", {"num_byzantine": 2}, 6), 5, node_configs=configs)
    fedavg_acc = fedavg.rounds(1)[-1].metrics[ACCURACY]
    median_acc = median.rounds(1)[-1].metrics[ACCURACY]
    assert median_acc > 0.5 > 0.2 > fedavg_acc
    # The recorder keeps the attack with the node, for the dashboard.
    assert median.node_configs[1000]["attack"] == "sign-flip"


def test_estimation_runs_restore_the_message_and_the_run_state() -> None:
    # Prepare: a stand-in for the rest of the ClientApp that writes state and echoes the repeat.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    msg = Message(
        content=RecordDict({"config": ConfigRecord({"task-repeat": 2, "server-round": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    seen: list[int] = []

    def call_next(m: Message, ctx: Context) -> Message:
        repeat = int(m.content.config_records["config"]["task-repeat"])  # type: ignore[arg-type]
        seen.append(repeat)
        ctx.state["written"] = MetricRecord({"x": 1.0})
        arrays = ArrayRecord({"w": Array(np.array([float(repeat)]))})
        return Message(RecordDict({"arrays": arrays}), reply_to=m)

    # Execute
    out = _estimates(msg, context, call_next, 2)
    # Assert: two runs on other repeats, nothing left behind.
    assert seen == [1_000_000, 1_000_001]
    assert [float(w["w"][0]) for w in out] == [1_000_000.0, 1_000_001.0]
    assert msg.content.config_records["config"]["task-repeat"] == 2
    assert "written" not in context.state
