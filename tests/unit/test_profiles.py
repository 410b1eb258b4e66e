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
from pydantic import ValidationError

from florist.client import profiles
from florist.client.fleet import FleetError, load_fleet, load_traces
from florist.client.profiles import (
    PROFILES,
    AvailabilityTrace,
    DeviceProfile,
    ProfileError,
    TraceError,
    offline_wait,
    profile_from_node_config,
    profile_mod,
)
from florist.client.protocol import Dropout
from florist.server.recording import InMemoryRunRecorder
from florist.server.runtime.localgrid import LocalGrid
from florist.server.serverapp import run_experiment
from florist.server.spec import ExperimentSpec

EXAMPLE_FLEET = Path(__file__).parents[2] / "examples" / "fleet.toml"
EXAMPLE_TRACES = EXAMPLE_FLEET.with_name("availability-traces.toml")


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


# ---- availability traces -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "on", "period"),
    [
        ("0-120,300-500/600", ((0, 120), (300, 500)), 600),
        (" 0 - 120 , 300-500 / 600 ", ((0, 120), (300, 500)), 600),
        ("0.5-1.25/2.5", ((0.5, 1.25),), 2.5),
        ("10-20,20-30/30", ((10, 20), (20, 30)), 30),  # touching spells are fine
        ("0-60/60", ((0, 60),), 60),  # always online
        ("1e3-2e3/3.6e3", ((1000, 2000),), 3600),
    ],
)
def test_trace_parses(text: str, on: tuple[tuple[float, float], ...], period: float) -> None:
    trace = AvailabilityTrace.parse(text)
    assert trace.on == on and trace.period_s == period
    assert AvailabilityTrace.parse(str(trace)) == trace


def test_trace_prints_compactly() -> None:
    assert str(AvailabilityTrace(((0, 120), (300, 500)), 600)) == "0-120,300-500/600"
    assert str(AvailabilityTrace(((0.25, 1.5),), 2)) == "0.25-1.5/2"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0-120", "expected 'start-end"),
        ("0-120/", "expected 'start-end"),
        ("0-120/ten", "expected 'start-end"),
        ("/600", "at least one on-interval"),
        ("abc/600", "'abc' is not an on-interval"),
        ("0-120,,300-500/600", "'' is not an on-interval"),
        ("-5-3/10", "'-5-3' is not an on-interval"),
        ("120-0/600", "120-0 does not end after it starts"),
        ("5-5/600", "5-5 does not end after it starts"),
        ("0-700/600", "0-700 ends after the period 600"),
        ("0-200,100-300/600", "100-300 starts before the previous end 200"),
        ("300-500,0-120/600", "0-120 starts before the previous end 500"),
        ("0-1/0", "the period 0 is not a positive"),
        ("0-1/inf", "expected 'start-end"),
    ],
)
def test_bad_traces_name_the_key(text: str, match: str) -> None:
    with pytest.raises(ProfileError, match=f"^availability-trace: .*{match}") as info:
        profile_from_node_config({"availability-trace": text})
    assert repr(text) in str(info.value)  # and quote what was given


def test_a_trace_must_be_a_string_and_excludes_the_periodic_cycle() -> None:
    with pytest.raises(ProfileError, match=r"^availability-trace: expected .start-end"):
        profile_from_node_config({"availability-trace": 600})
    for key in ("availability", "period-s"):
        config = {"availability-trace": "0-10/20", key: 0.5}
        with pytest.raises(ProfileError, match=f"^availability-trace: .*or {key}, not both"):
            profile_from_node_config(config)
    with pytest.raises(ValidationError, match="availability-trace or availability"):
        DeviceProfile(availability=0.5, availability_trace="0-10/20")  # type: ignore[arg-type]


def test_trace_in_the_profile_model() -> None:
    profile = profile_from_node_config({"profile": "slow", "availability-trace": "0-120/600"})
    assert profile.seconds_per_step == 0.06
    assert profile.availability_trace == AvailabilityTrace(((0, 120),), 600)
    assert profile.availability_cycle() is profile.availability_trace
    # Dumped as the compact string, and read back from it.
    dumped = profile.model_dump()
    assert dumped["availability_trace"] == "0-120/600"
    assert DeviceProfile.model_validate(dumped) == profile
    assert profiles.describe(profile) == "seconds_per_step=0.06, availability_trace=0-120/600"


def test_the_periodic_cycle_is_the_degenerate_trace() -> None:
    profile = DeviceProfile(availability=0.25, period_s=100.0)
    assert profile.availability_cycle() == AvailabilityTrace.parse("0-25/100")
    assert DeviceProfile().availability_cycle() is None
    # Read with its seeded phase exactly as the periodic cycle always was: online while
    # (t + phase) mod period < availability·period, else wait for the period to come round.
    phase = profiles._rng(1, 2, (0, 0), "phase").uniform(0.0, 100.0)
    for t in np.arange(0, 200, 0.5):
        position = (t + phase) % 100.0
        expected = 0.0 if position < 25.0 else 100.0 - position
        assert offline_wait(profile, t, seed=1, node=2) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("t", "wait"),
    [
        (0.0, 0.0),
        (119.5, 0.0),
        (120.0, 180.0),  # an on-interval's end is already offline
        (200.0, 100.0),
        (300.0, 0.0),
        (499.0, 0.0),
        (500.0, 100.0),  # past the last spell: wraps to 0 of the next period
        (550.0, 50.0),
        (599.0, 1.0),
        (600.0, 0.0),
        (720.0, 180.0),  # the second period reads like the first
        (600.0 * 2_777_778 + 200.0, 100.0),  # Unix time, as the wall clock reads it
    ],
)
def test_trace_lookup(t: float, wait: float) -> None:
    trace = AvailabilityTrace.parse("0-120,300-500/600")
    assert trace.offline_wait(t) == pytest.approx(wait)


def test_trace_lookup_wraps_to_a_first_spell_that_starts_late() -> None:
    trace = AvailabilityTrace.parse("100-200/300")
    assert trace.offline_wait(0.0) == 100.0
    assert trace.offline_wait(250.0) == 150.0  # 50 s to the period's end, then 100 s more
    assert trace.offline_wait(1250.0) == 50.0  # 1250 = 4·300 + 50
    assert trace.online_share == pytest.approx(1 / 3)


def test_an_explicit_trace_is_read_without_a_phase() -> None:
    profile = DeviceProfile(availability_trace=AvailabilityTrace.parse("0-120,300-500/600"))
    for seed, node in [(0, 0), (1, 2), (7, 3)]:
        assert offline_wait(profile, 200.0, seed=seed, node=node) == 100.0
        assert offline_wait(profile, 550.0, seed=seed, node=node) == 50.0


@pytest.mark.parametrize(
    ("offset", "shifted"),
    [
        (0.0, "0-100,500-600/600"),
        (50.0, "0-150,550-600/600"),  # 500-600 wraps to 550-650: 550-600 and 0-50, joined to 0-100
        (550.0, "0-50,450-600/600"),
        (600.0, "0-100,500-600/600"),
        (-50.0, "0-50,450-600/600"),
        (37.746, "0-137.746,537.746-600/600"),
    ],
)
def test_shifted_trace(offset: float, shifted: str) -> None:
    trace = AvailabilityTrace.parse("0-100,500-600/600")
    moved = trace.shifted(offset)
    assert str(moved) == shifted
    assert moved.online_share == pytest.approx(trace.online_share)
    for t in np.arange(0, 1200, 7.5):
        assert moved.offline_wait(t + offset) == pytest.approx(trace.offline_wait(t))


def test_fedscale_trace() -> None:
    trace = AvailabilityTrace.from_fedscale([0, 300], [120, 500], 600)
    assert str(trace) == "0-120,300-500/600"
    with pytest.raises(TraceError, match="active has 2 times and inactive 1"):
        AvailabilityTrace.from_fedscale([0, 300], [120], 600)


# ---- fleet files ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_example_fleet_loads() -> None:
    fleet = load_fleet(EXAMPLE_FLEET)
    traces = load_traces(EXAMPLE_TRACES)
    assert len(fleet) == 5 and len(traces) == 3
    for i, entry in enumerate(fleet):
        profile = profile_from_node_config(entry)
        assert profile.seconds_per_step > 0 and profile.dropout == 0.05
        # Round robin, each shifted by a seeded time: the same share online as its trace.
        assert profile.availability_trace is not None
        share = traces[i % 3].online_share
        assert profile.availability_trace.online_share == pytest.approx(share)
    assert fleet[0]["availability-trace"] != fleet[3]["availability-trace"]  # not in lockstep


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


TRACES = """
[[trace]]
active = [0, 300]
inactive = [120, 500]
finish-time = 600

[[trace]]
active = [100]
inactive = [200]
finish-time = 300

[[trace]]
active = [0]
inactive = [50]
finish_time = 60  # FedScale's spelling
"""
TRACE_STRINGS = ["0-120,300-500/600", "100-200/300", "0-50/60"]
DRAWN = 'seed = 4\nnodes = 5\nspeed = { distribution = "exponential", mean = 0.05 }\n'


def traced_fleet(tmp_path: Path, fleet: str, traces: str = TRACES, name: str = "t.toml") -> Path:
    (tmp_path / name).write_text(traces)
    return write(tmp_path, fleet)


def trace_strings(fleet: list[dict[str, Any]]) -> list[Any]:
    return [entry.get("availability-trace") for entry in fleet]


def test_traces_are_assigned_round_robin(tmp_path: Path) -> None:
    fleet = load_fleet(traced_fleet(tmp_path, DRAWN + '[traces]\nfile = "t.toml"\n'))
    assert trace_strings(fleet) == [TRACE_STRINGS[i % 3] for i in range(5)]
    # Adding traces leaves the drawn speeds as they were.
    plain = load_fleet(write(tmp_path, DRAWN))
    assert [e["seconds-per-step"] for e in fleet] == [e["seconds-per-step"] for e in plain]
    for entry in fleet:
        assert profile_from_node_config(entry).availability_trace is not None


def test_round_robin_offset(tmp_path: Path) -> None:
    body = DRAWN + '[traces]\nfile = "t.toml"\noffset = 1\n'
    fleet = load_fleet(traced_fleet(tmp_path, body))
    assert trace_strings(fleet) == [TRACE_STRINGS[(1 + i) % 3] for i in range(5)]
    seeded = DRAWN + '[traces]\nfile = "t.toml"\noffset = "seeded"\n'
    first = trace_strings(load_fleet(traced_fleet(tmp_path, seeded)))
    assert first == trace_strings(load_fleet(traced_fleet(tmp_path, seeded)))
    start = TRACE_STRINGS.index(first[0])
    assert first == [TRACE_STRINGS[(start + i) % 3] for i in range(5)]


def test_shifted_traces_are_seeded(tmp_path: Path) -> None:
    body = DRAWN + '[traces]\nfile = "t.toml"\nshift = true\n'
    fleet = trace_strings(load_fleet(traced_fleet(tmp_path, body)))
    assert fleet == trace_strings(load_fleet(traced_fleet(tmp_path, body)))
    other = trace_strings(load_fleet(traced_fleet(tmp_path, body.replace("seed = 4", "seed = 5"))))
    assert fleet != other
    assert fleet[0] != fleet[3]  # the two nodes on trace 0 are not in lockstep
    for i, text in enumerate(fleet):
        trace, base = AvailabilityTrace.parse(text), AvailabilityTrace.parse(TRACE_STRINGS[i % 3])
        assert trace.period_s == base.period_s
        assert trace.online_share == pytest.approx(base.online_share)


def test_traces_by_index_and_explicit_nodes(tmp_path: Path) -> None:
    nodes = (
        '[[node]]\nprofile = "fast"\ntrace = 2\n'
        '[[node]]\nprofile = "slow"\n'
        '[[node]]\navailability-trace = "0-1/2"\n'
    )
    by_index = '[traces]\nfile = "t.toml"\nassign = "by-index"\n' + nodes
    fleet = load_fleet(traced_fleet(tmp_path, by_index))
    assert fleet == [
        {"profile": "fast", "availability-trace": "0-50/60"},
        {"profile": "slow"},
        {"availability-trace": "0-1/2"},
    ]
    # Round robin gives the entries without a trace of their own theirs, by position.
    round_robin = '[traces]\nfile = "t.toml"\n' + nodes + "[[node]]\navailability = 0.5\n"
    fleet = load_fleet(traced_fleet(tmp_path, round_robin))
    assert trace_strings(fleet) == ["0-50/60", "100-200/300", "0-1/2", None]
    assert fleet[3] == {"availability": 0.5}


def test_json_trace_file(tmp_path: Path) -> None:
    traces = '{"trace": [{"active": [0, 30], "inactive": [25, 60], "finish_time": 60}]}'
    path = traced_fleet(tmp_path, DRAWN + '[traces]\nfile = "t.json"\n', traces, "t.json")
    assert trace_strings(load_fleet(path)) == ["0-25,30-60/60"] * 5


@pytest.mark.parametrize(
    ("fleet", "traces", "match"),
    [
        ('[traces]\nfile = "missing.toml"\n', TRACES, "missing.toml"),
        ("[traces]\n", TRACES, "traces.file"),
        ('[traces]\nfile = "t.toml"\nassign = "random"\n', TRACES, "traces.assign"),
        ('[traces]\nfile = "t.toml"\nassign = "by-index"\n', TRACES, "by-index.*trace = k"),
        ('[traces]\nfile = "t.toml"\noffset = -1\n', TRACES, "offset must be >= 0"),
        ('availability = 0.5\n[traces]\nfile = "t.toml"\n', TRACES, "not both"),
        ('[traces]\nfile = "t.toml"\n', "", "t.toml: trace: Field required"),
        ('[traces]\nfile = "t.toml"\n', "[[trace]]\nactive = [0]\n", "trace.0.inactive"),
        (
            '[traces]\nfile = "t.toml"\n',
            "[[trace]]\nactive=[0]\ninactive=[5]\nfinish-time=9\nmodel='x'\n",
            "trace.0.model",
        ),
        (
            '[traces]\nfile = "t.toml"\n',
            TRACES + "[[trace]]\nactive = [0, 10]\ninactive = [20]\nfinish-time = 30\n",
            "t.toml: trace 3: active has 2 times and inactive 1",
        ),
        (
            '[traces]\nfile = "t.toml"\n',
            "[[trace]]\nactive = [50]\ninactive = [20]\nfinish-time = 60\n",
            "t.toml: trace 0: on-interval 50-20 does not end after it starts",
        ),
        (
            '[traces]\nfile = "t.toml"\n',
            "[[trace]]\nactive = [0]\ninactive = [90]\nfinish-time = 60\n",
            "trace 0: on-interval 0-90 ends after the period 60",
        ),
    ],
)
def test_bad_trace_files(tmp_path: Path, fleet: str, traces: str, match: str) -> None:
    with pytest.raises(FleetError, match=match):
        load_fleet(traced_fleet(tmp_path, DRAWN + fleet, traces))


@pytest.mark.parametrize(
    ("nodes", "match"),
    [
        ("[[node]]\ntrace = 3\n", "node 0: trace 3: the trace file has 3"),
        ('[[node]]\ntrace = "first"\n', "node 0: trace: expected an index"),
        ("[[node]]\ntrace = 0\navailability = 0.5\n", "node 0: availability-trace: .*not both"),
        ('[[node]]\navailability-trace = "0-9/5"\n', "node 0: availability-trace: .*period 5"),
    ],
)
def test_bad_trace_assignments(tmp_path: Path, nodes: str, match: str) -> None:
    with pytest.raises(FleetError, match=match):
        load_fleet(traced_fleet(tmp_path, '[traces]\nfile = "t.toml"\n' + nodes))


def test_a_trace_index_needs_a_trace_file(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match=r"node 0: trace = k needs a \[traces\] table"):
        load_fleet(write(tmp_path, "[[node]]\ntrace = 1\n"))


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


def train_message(
    clock: str | None = "virtual",
    seed: int = 0,
    server_round: int = 1,
    virtual_time: float | None = None,
) -> Message:
    config: dict[str, Any] = {
        "florist.seed": seed,
        "server-round": server_round,
        "model-version": 0,
    }
    if clock is not None:
        config["florist.clock"] = clock
    if virtual_time is not None:
        config["virtual-time"] = virtual_time
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


TRACE = "0-120,300-500/600"


@pytest.mark.parametrize(
    ("virtual_time", "wait"),
    [(0.0, 0.0), (200.0, 100.0), (450.0, 0.0), (550.0, 50.0), (1250.0, 0.0), (1320.0, 180.0)],
)
def test_virtual_clock_reads_the_trace_at_the_servers_virtual_time(
    sleeps: list[float], virtual_time: float, wait: float
) -> None:
    ctx = context(seconds_per_step=0.01, availability_trace=TRACE)
    msg = train_message("virtual", virtual_time=virtual_time)
    assert duration(profile_mod(msg, ctx, trainer(steps=10))) == pytest.approx(wait + 0.1)
    assert sleeps == []


def test_virtual_clock_without_virtual_time_draws_an_arrival_within_the_trace(
    sleeps: list[float],
) -> None:
    ctx = context(seconds_per_step=0.01, availability_trace="0-100/1000")
    waits = [
        duration(profile_mod(train_message("virtual", 2, r), ctx, trainer(steps=10))) - 0.1
        for r in range(1, 41)
    ]
    assert any(w == pytest.approx(0.0, abs=1e-9) for w in waits)
    assert sum(w > 1e-9 for w in waits) > 25  # offline 90% of the trace
    assert max(waits) <= 900.0 + 1e-9
    assert sleeps == []


@pytest.mark.parametrize(
    ("position", "wait"),
    [(200.0, 100.0), (550.0, 50.0), (50.0, 0.0)],  # in a gap, past the last spell, online
)
def test_wall_clock_waits_for_the_traces_next_online_time(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch, position: float, wait: float
) -> None:
    monkeypatch.setattr(profiles, "now", lambda: 600.0 * 2_777_778 + position)  # Unix time
    ticks = iter([0.0, 0.0])
    monkeypatch.setattr(profiles.time, "monotonic", lambda: next(ticks))
    ctx = context(seconds_per_step=0.01, availability_trace=TRACE)
    reply = profile_mod(train_message("wall"), ctx, trainer(steps=10))
    assert sleeps == ([pytest.approx(wait)] if wait else []) + [pytest.approx(0.1)]
    assert duration(reply) == pytest.approx(wait + 0.1)


def test_a_bad_trace_fails_the_task_with_the_key(sleeps: list[float]) -> None:
    ctx = context(availability_trace="0-120")
    with pytest.raises(ProfileError, match=r"^availability-trace:"):
        profile_mod(train_message("virtual"), ctx, trainer(steps=10))


def test_dropout_is_an_error_reply_and_deterministic(sleeps: list[float]) -> None:
    ctx = context(profile="normal", dropout=1 - 1e-9)
    reply = profile_mod(train_message("virtual", seed=3), ctx, trainer(steps=50))
    assert reply.has_error() and not reply.has_content()
    dropout = Dropout.from_error(reply.error)
    assert dropout is not None
    assert reply.error.reason is not None and reply.error.reason.startswith("dropped out")
    lasted = dropout.after_s
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
    assert len(sleeps) == 1 and sleeps[0] == pytest.approx(Dropout.from_error(reply.error).after_s)  # type: ignore[union-attr]


def test_dropout_rate_is_seeded_and_zero_never_drops(sleeps: list[float]) -> None:
    flaky, steady = context(profile="flaky"), context(profile="normal")

    def dropped(ctx: Context, seed: int) -> list[bool]:
        return [
            profile_mod(train_message("virtual", seed, r), ctx, trainer(10)).has_error()
            for r in range(1, 201)
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
