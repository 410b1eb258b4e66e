"""Device profiles: parsing, fleet files, the ClientApp mod under both clocks, and end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from florist.client import profiles
from florist.client.fleet import FleetError, load_fleet
from florist.client.profiles import (
    DROPOUT_ERROR_CODE,
    PROFILES,
    DeviceProfile,
    ProfileError,
    dropout_duration,
    offline_wait,
    profile_from_node_config,
    profile_mod,
)
from florist.server.localgrid import LocalGrid
from florist.server.recorder import InMemoryRunRecorder
from florist.server.serverapp import run_experiment
from florist.server.spec import ExperimentSpec

EXAMPLE_FLEET = Path(__file__).parents[2] / "examples" / "fleet.toml"


@pytest.fixture(autouse=True)
def task_identity() -> None:
    # Flower stamps every Message with the process's run id; the SuperLink sets it for real.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(profiles, "sleep", recorded.append)
    return recorded


# ---- parsing -------------------------------------------------------------------------------


def test_no_profile_keys_is_neutral() -> None:
    profile = profile_from_node_config({"partition-id": 0, "num-partitions": 3})
    assert profile == DeviceProfile()
    assert profile.seconds_per_step == 0 and profile.availability == 1
    assert profile.dropout == 0 and profile.bandwidth_mbps is None


@pytest.mark.parametrize("name", ["fast", "normal", "slow", "flaky"])
def test_named_profile(name: str) -> None:
    assert profile_from_node_config({"profile": name}) == PROFILES[name]


def test_named_profiles_numbers() -> None:
    assert [PROFILES[n].seconds_per_step for n in ("fast", "normal", "slow")] == [
        0.005,
        0.02,
        0.06,
    ]
    assert PROFILES["flaky"].seconds_per_step == 0.02 and PROFILES["flaky"].dropout == 0.2


def test_explicit_keys() -> None:
    profile = profile_from_node_config(
        {
            "seconds-per-step": 0.1,
            "availability": 0.5,
            "period-s": 10,
            "dropout": 0.3,
            "bandwidth-mbps": 8,
        }
    )
    assert profile == DeviceProfile(
        seconds_per_step=0.1, availability=0.5, period_s=10, dropout=0.3, bandwidth_mbps=8
    )


def test_explicit_keys_override_the_named_profile() -> None:
    profile = profile_from_node_config({"profile": "flaky", "seconds-per-step": 0.5})
    assert profile.seconds_per_step == 0.5 and profile.dropout == 0.2
    unlimited = profile_from_node_config({"bandwidth-mbps": 5, "profile": "slow"})
    assert unlimited.bandwidth_mbps == 5
    assert profile_from_node_config({"bandwidth-mbps": "inf"}).bandwidth_mbps is None


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"profile": "turbo"}, "profile"),
        ({"seconds-per-step": -1.0}, "seconds-per-step"),
        ({"seconds-per-step": "fast"}, "seconds-per-step"),
        ({"availability": 0.0}, "availability"),
        ({"availability": 1.5}, "availability"),
        ({"dropout": 1.0}, "dropout"),
        ({"bandwidth-mbps": 0}, "bandwidth-mbps"),
        ({"period-s": -5}, "period-s"),
        ({"profile": "slow", "dropout": True}, "dropout"),
    ],
)
def test_bad_values_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ProfileError, match=f"^{key}:"):
        profile_from_node_config(config)


def test_offline_wait_follows_a_seeded_cycle() -> None:
    profile = DeviceProfile(availability=0.25, period_s=100.0)
    waits = [offline_wait(profile, t, seed=1, node=2) for t in np.arange(0, 100, 0.5)]
    # Online a quarter of the cycle, and the wait counts down to the next online spell.
    assert np.mean([w == 0 for w in waits]) == pytest.approx(0.25, abs=0.01)
    assert max(waits) <= 75.0
    assert waits == [offline_wait(profile, t, seed=1, node=2) for t in np.arange(0, 100, 0.5)]
    assert waits != [offline_wait(profile, t, seed=1, node=3) for t in np.arange(0, 100, 0.5)]
    assert offline_wait(DeviceProfile(), 12.3, seed=1, node=2) == 0.0


# ---- fleet files ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_example_fleet_loads() -> None:
    fleet = load_fleet(EXAMPLE_FLEET)
    assert len(fleet) == 5
    for entry in fleet:
        profile = profile_from_node_config(entry)
        assert profile.seconds_per_step > 0
        assert profile.availability == 0.9 and profile.dropout == 0.05


def test_normal_draws_are_deterministic_by_seed(tmp_path: Path) -> None:
    body = 'nodes = 200\n[speed]\ndistribution = "normal"\nmean = 0.02\nsd = 0.02\n'
    first = load_fleet(write(tmp_path, "seed = 1\n" + body))
    again = load_fleet(write(tmp_path, "seed = 1\n" + body))
    other = load_fleet(write(tmp_path, "seed = 2\n" + body))
    assert first == again and first != other
    speeds = np.array([float(e["seconds-per-step"]) for e in first])
    assert (speeds > 0).all()  # truncated to positive values
    # A normal truncated at one sd below the mean has a mean above the untruncated one.
    assert 0.02 < speeds.mean() < 0.035


def test_exponential_draws(tmp_path: Path) -> None:
    body = (
        'seed = 3\nnodes = 400\ndropout = 0.1\n[speed]\ndistribution = "exponential"\nmean = 0.05\n'
    )
    fleet = load_fleet(write(tmp_path, body))
    assert fleet == load_fleet(write(tmp_path, body))
    speeds = np.array([float(e["seconds-per-step"]) for e in fleet])
    assert speeds.mean() == pytest.approx(0.05, rel=0.15)
    assert np.median(speeds) < speeds.mean()  # skewed, as an exponential is
    assert all(e["dropout"] == 0.1 for e in fleet)


def test_explicit_fleet(tmp_path: Path) -> None:
    body = (
        '[[node]]\nprofile = "fast"\n'
        '[[node]]\nprofile = "slow"\nbandwidth-mbps = 20.0\n'
        "[[node]]\nseconds-per-step = 0.03\ndropout = 0.2\n"
    )
    fleet = load_fleet(write(tmp_path, body))
    assert fleet == [
        {"profile": "fast"},
        {"profile": "slow", "bandwidth-mbps": 20.0},
        {"seconds-per-step": 0.03, "dropout": 0.2},
    ]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('nodes = 3\n[speed]\ndistribution = "normal"\nmean = 0.02\n', "sd"),
        ('nodes = 3\n[speed]\ndistribution = "gamma"\nmean = 1\n', "speed.distribution"),
        ("nodes = 3\n", "nodes and speed"),
        ('[[node]]\nprofile = "turbo"\n', "node 0: profile"),
        ("[[node]]\nspeed = 3\n", "unknown key 'speed'"),
        ('nodes = 2\ndropout = 1.5\n[speed]\ndistribution = "exponential"\nmean = 1\n', "dropout"),
        ('nodes = 2\ncolour = "red"\n', "colour"),
    ],
)
def test_bad_fleet_files(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(FleetError, match=match):
        load_fleet(write(tmp_path, body))


# ---- the mod -------------------------------------------------------------------------------

WEIGHTS = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})


def train_message(clock: str | None = "virtual", seed: int = 0, server_round: int = 1) -> Message:
    config: dict[str, Any] = {"florist.seed": seed, "server-round": server_round}
    if clock is not None:
        config["florist.clock"] = clock
    content = RecordDict({"arrays": WEIGHTS, "config": ConfigRecord(config)})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def context(**node_config: Any) -> Context:
    config = {"partition-id": 1, "num-partitions": 3}
    config.update({k.replace("_", "-"): v for k, v in node_config.items()})
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def trainer(steps: int) -> Any:
    calls: list[int] = []

    def call_next(msg: Message, ctx: Context) -> Message:
        calls.append(1)
        metrics = MetricRecord({"local-steps": steps, "num-examples": 10})
        return Message(RecordDict({"arrays": WEIGHTS, "metrics": metrics}), reply_to=msg)

    call_next.calls = calls  # type: ignore[attr-defined]
    return call_next


def duration(reply: Message) -> float:
    value = reply.content.metric_records["metrics"]["virtual-duration"]
    assert isinstance(value, float)
    return value


def test_virtual_clock_reports_the_duration_without_sleeping(sleeps: list[float]) -> None:
    reply = profile_mod(train_message("virtual"), context(profile="slow"), trainer(steps=50))
    assert duration(reply) == pytest.approx(50 * 0.06)
    assert reply.content.metric_records["metrics"]["local-steps"] == 50
    assert sleeps == []


def test_bandwidth_adds_transfer_time(sleeps: list[float]) -> None:
    reply = profile_mod(
        train_message("virtual"),
        context(seconds_per_step=0.01, bandwidth_mbps=2.0),
        trainer(steps=10),
    )
    both_ways = 2 * WEIGHTS.count_bytes()
    assert duration(reply) == pytest.approx(10 * 0.01 + both_ways * 8 / 2e6)
    assert sleeps == []


def test_wall_clock_sleeps_the_difference(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter([100.0, 100.5])  # training itself took 0.5 s
    monkeypatch.setattr(profiles.time, "monotonic", lambda: next(ticks))
    reply = profile_mod(train_message("wall"), context(profile="slow"), trainer(steps=50))
    assert sleeps == [pytest.approx(3.0 - 0.5)]
    assert duration(reply) == pytest.approx(3.0)


def test_wall_clock_is_the_default_and_never_sleeps_when_training_was_slower(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter([100.0, 110.0])
    monkeypatch.setattr(profiles.time, "monotonic", lambda: next(ticks))
    reply = profile_mod(train_message(clock=None), context(profile="fast"), trainer(steps=50))
    assert sleeps == []
    assert duration(reply) == pytest.approx(50 * 0.005)


def test_neutral_profile_adds_a_zero_duration(sleeps: list[float]) -> None:
    reply = profile_mod(train_message("wall"), context(), trainer(steps=50))
    assert duration(reply) == 0.0 and sleeps == []


def test_offline_node_waits_until_online(sleeps: list[float]) -> None:
    ctx = context(seconds_per_step=0.01, availability=0.2, period_s=100.0)
    waits = []
    for server_round in range(1, 41):
        msg = train_message("virtual", seed=5, server_round=server_round)
        waits.append(duration(profile_mod(msg, ctx, trainer(steps=10))) - 0.1)
    assert sleeps == []
    assert any(w == pytest.approx(0.0, abs=1e-9) for w in waits)  # sometimes online
    assert sum(w > 1e-9 for w in waits) > 20  # offline 80% of the time, then it waits
    assert max(waits) <= 80.0 + 1e-9
    again = [
        duration(profile_mod(train_message("virtual", 5, r), ctx, trainer(steps=10))) - 0.1
        for r in range(1, 41)
    ]
    assert waits == again


def test_wall_clock_waits_out_an_offline_spell_before_training(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = DeviceProfile(seconds_per_step=0.01, availability=0.5, period_s=10.0)
    offline_at = next(t for t in np.arange(0, 10, 0.25) if offline_wait(profile, t, 0, 1) > 0)
    monkeypatch.setattr(profiles, "now", lambda: float(offline_at))
    ticks = iter([0.0, 0.0])
    monkeypatch.setattr(profiles.time, "monotonic", lambda: next(ticks))
    ctx = context(seconds_per_step=0.01, availability=0.5, period_s=10.0)
    reply = profile_mod(train_message("wall", seed=0), ctx, trainer(steps=10))
    wait = offline_wait(profile, float(offline_at), 0, 1)
    assert sleeps == [pytest.approx(wait), pytest.approx(0.1)]
    assert duration(reply) == pytest.approx(wait + 0.1)


def test_dropout_is_an_error_reply_and_deterministic(sleeps: list[float]) -> None:
    ctx = context(profile="normal", dropout=1 - 1e-9)
    reply = profile_mod(train_message("virtual", seed=3), ctx, trainer(steps=50))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == DROPOUT_ERROR_CODE
    assert reply.error.reason is not None and reply.error.reason.startswith("dropped out")
    lasted = dropout_duration(reply.error)
    assert lasted is not None and 0 <= lasted <= 50 * 0.02
    again = profile_mod(train_message("virtual", seed=3), ctx, trainer(steps=50))
    assert again.error.reason == reply.error.reason
    assert sleeps == []


def test_dropout_on_the_wall_clock_sleeps_a_plausible_time(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter([0.0, 0.0])
    monkeypatch.setattr(profiles.time, "monotonic", lambda: next(ticks))
    ctx = context(profile="normal", dropout=1 - 1e-9)
    reply = profile_mod(train_message("wall", seed=3), ctx, trainer(steps=50))
    assert reply.has_error()
    assert len(sleeps) == 1 and sleeps[0] == pytest.approx(dropout_duration(reply.error))


def test_dropout_rate_is_seeded_and_zero_never_drops(sleeps: list[float]) -> None:
    flaky, steady = context(profile="flaky"), context(profile="normal")

    def dropped(ctx: Context, seed: int) -> list[bool]:
        return [
            profile_mod(train_message("virtual", seed, r), ctx, trainer(10)).has_error()
            for r in range(200)
        ]

    pattern = dropped(flaky, seed=0)
    assert pattern == dropped(flaky, seed=0)
    assert pattern != dropped(flaky, seed=1)
    assert 0.1 < np.mean(pattern) < 0.3
    assert not any(dropped(steady, seed=0))


def test_evaluate_passes_through(sleeps: list[float]) -> None:
    msg = Message(
        RecordDict({"config": ConfigRecord({"florist.clock": "wall"})}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )
    reply = Message(RecordDict({"metrics": MetricRecord({"eval-loss": 1.0})}), reply_to=msg)
    out = profile_mod(msg, context(profile="slow", dropout=0.99), lambda m, c: reply)
    assert out is reply and "virtual-duration" not in out.content.metric_records["metrics"]


def test_a_failed_task_passes_through(sleeps: list[float]) -> None:
    from flwr.app import Error

    msg = train_message("wall")
    failed = Message(Error(code=2, reason="boom"), reply_to=msg)
    assert profile_mod(msg, context(profile="slow"), lambda m, c: failed) is failed


# ---- end to end, in process ----------------------------------------------------------------


def test_replies_carry_virtual_duration_end_to_end(sleeps: list[float]) -> None:
    spec = ExperimentSpec.model_validate(
        {
            "name": "profiles",
            "strategy": {"name": "fedavg", "config": {}},
            "dataset": {"name": "digits", "partitioner": {"name": "iid"}},
            "model": {"name": "logreg"},
            "training": {"local_steps": 5},
            "rounds": 2,
            "clients": {"min": 3},
            "clock": "virtual",
        }
    )
    replies: dict[int, list[Message]] = {}

    def keep(node: int, msg: Message, reply: Message) -> Message:
        replies.setdefault(node, []).append(reply)
        return reply

    grid = LocalGrid(3, tamper=keep)
    speeds = {1000: "fast", 1001: "normal", 1002: "slow"}
    for nid, name in speeds.items():
        grid.contexts[nid].node_config["profile"] = name
    run_experiment(
        grid, spec, InMemoryRunRecorder(), experiment_id=1, flwr_run_id=1, poll_interval=0
    )

    assert sleeps == []
    assert set(replies) == set(speeds)
    for nid, name in speeds.items():
        assert len(replies[nid]) == 2
        for reply in replies[nid]:
            metrics = reply.content.metric_records["metrics"]
            assert metrics["local-steps"] == 5
            assert metrics["virtual-duration"] == pytest.approx(5 * PROFILES[name].seconds_per_step)
