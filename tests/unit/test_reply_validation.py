"""Reply validation at the runtime's edge: malformed replies are rejected, recorded, harmless."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from florist.server.api.app import create_app
from florist.server.db.engine import make_engine, make_session_factory
from florist.server.db.repository import get_experiment
from florist.server.recording import InMemoryRunRecorder, UpdateRecord
from florist.server.runtime import NO_REPLY, NOT_AGGREGATED
from florist.server.runtime.localgrid import run_local
from florist.server.serverapp import RunResult
from florist.server.settings import Settings
from florist.server.spec import ExperimentSpec
from florist.strategies.events import Arrival, DropoutPolicy, DropoutPolicyError, Weights
from florist.strategies.fedasync import FedAsync
from florist.strategies.rounds import AggregationError, RoundAggregator, SyncRounds
from florist.strategies.validation import (
    MalformedReply,
    ReplyChecks,
    UpdateNorms,
    check_example_count,
    check_metrics,
    check_records,
    check_train_reply,
    common_metric_keys,
    parse_evaluate_reply,
)

BAD = 1001  # the node whose replies are tampered with; 1000 and 1002 stay honest
Change = Callable[[RecordDict, RecordDict], RecordDict]  # (reply content, request) -> content

STRATEGIES = {"fedavg": 2, "fedasync": 6, "fedbuff": 3}  # strategy -> aggregations


def make_spec(strategy: str, **overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "replies",
        "strategy": {"name": strategy, "config": {}},
        "workload": {
            "name": "digits",
            "config": {"partitioner": {"name": "iid"}, "model": {"name": "logreg"}},
        },
        "training": {"local_epochs": 1},
        "rounds": STRATEGIES[strategy],
        "clients": {"min": 3},
    }
    return ExperimentSpec.model_validate(body | overrides)


def weights(result: RunResult) -> Weights:
    assert result.final_arrays is not None
    return {k: v.numpy() for k, v in result.final_arrays.items()}


def tamper_with(change: Change, message_type: str = MessageType.TRAIN) -> Any:
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node != BAD or request.metadata.message_type != message_type or reply.has_error():
            return reply
        reply.content = change(RecordDict(dict(reply.content.items())), request.content)
        return reply

    return tamper


def drop(message_type: str = MessageType.TRAIN) -> Any:
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == BAD and request.metadata.message_type == message_type:
            return Message(Error(code=0, reason="dropped"), reply_to=request)
        return reply

    return tamper


@cache
def reference(strategy: str, kind: str, evaluate: bool = False) -> tuple[Weights, Any]:
    """The final model and evaluation metrics of an honest run (``kind`` "honest") or of a run
    where the bad node's replies are simply dropped ("dropped")."""
    spec = make_spec(strategy, clients={"min": 3, "fraction_evaluate": 1.0 if evaluate else 0})
    message_type = MessageType.EVALUATE if evaluate else MessageType.TRAIN
    result, recorder = run_local(spec, 3, drop(message_type) if kind == "dropped" else None)
    assert recorder.experiments[1].status == "completed"
    return weights(result), [r.evaluate_metrics for r in recorder.rounds(1)]


def bad_updates(recorder: InMemoryRunRecorder) -> list[UpdateRecord]:
    """The bad node's updates that came back (a task still out when the run ended is failed)."""
    return [u for _, u in recorder.updates(1) if u.node_id == BAD and u.reason != NO_REPLY]


# --- what a tamper does to a reply -------------------------------------------------------------


def set_metric(key: str, value: Any) -> Change:
    def change(content: RecordDict, request: RecordDict) -> RecordDict:
        metrics = dict(content.metric_records["metrics"])
        if value is None:
            metrics.pop(key, None)
        else:
            metrics[key] = value
        content["metrics"] = MetricRecord(metrics)
        return content

    return change


def map_arrays(fn: Callable[[str, np.ndarray, np.ndarray], np.ndarray]) -> Change:
    def change(content: RecordDict, request: RecordDict) -> RecordDict:
        sent = request.array_records["arrays"]
        arrays = content.array_records["arrays"]
        content["arrays"] = ArrayRecord(
            {k: Array(fn(k, v.numpy(), sent[k].numpy())) for k, v in arrays.items()}
        )
        return content

    return change


def add_record(name: str, record: Any) -> Change:
    def change(content: RecordDict, request: RecordDict) -> RecordDict:
        content[name] = record
        return content

    return change


def remove_record(name: str) -> Change:
    def change(content: RecordDict, request: RecordDict) -> RecordDict:
        if name in content:
            del content[name]
        return content

    return change


def _one_nan(k: str, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    out = v.copy()
    out.flat[0] = np.nan
    return out


MALFORMED_TRAIN: dict[str, tuple[Change, str]] = {
    "extra ArrayRecord": (
        add_record("extra", ArrayRecord({"x": Array(np.ones(2, np.float32))})),
        "unexpected ArrayRecord 'extra'",
    ),
    "extra ConfigRecord": (add_record("extra", ConfigRecord({"a": 1})), "unexpected ConfigRecord"),
    "extra MetricRecord": (add_record("more", MetricRecord({"a": 1.0})), "unexpected MetricRecord"),
    "no arrays": (remove_record("arrays"), "no ArrayRecord 'arrays'"),
    "extra array": (
        map_arrays(lambda k, v, s: v),
        "",  # replaced below: an ArrayRecord with one more key
    ),
    "NaN": (map_arrays(_one_nan), "NaN"),
    "1e38": (map_arrays(lambda k, v, s: np.full_like(v, 1e38)), "update norm"),
    "wrong shape": (map_arrays(lambda k, v, s: np.zeros(v.size + 1, v.dtype)), "shape"),
    "wrong dtype": (map_arrays(lambda k, v, s: v.astype(np.float64)), "float64"),
    "num-examples 0.5": (set_metric("num-examples", 0.5), "not an integer"),
    "num-examples 0": (set_metric("num-examples", 0), "out of range"),
    "num-examples -1": (set_metric("num-examples", -1), "out of range"),
    "num-examples 1e9": (set_metric("num-examples", 10**9), "out of range"),
    "num-examples float 1e9": (set_metric("num-examples", 1e9), "not an integer"),
    "no num-examples": (set_metric("num-examples", None), "not an integer"),
    "NaN metric": (set_metric("train-loss", math.nan), "'train-loss' is not finite"),
    "huge metric": (set_metric("train-loss", 1e300), "beyond"),
    "list metric": (set_metric("train-loss", [1.0, 2.0]), "not a number"),
    "negative local-steps": (set_metric("local-steps", -3), "local-steps"),
}


def _extra_array(content: RecordDict, request: RecordDict) -> RecordDict:
    arrays = dict(content.array_records["arrays"].items())
    content["arrays"] = ArrayRecord({**arrays, "bias2": Array(np.zeros(3, np.float32))})
    return content


MALFORMED_TRAIN["extra array"] = (_extra_array, "unexpected ['bias2']")

HARMLESS_TRAIN: dict[str, Change] = {
    "extra metric key": set_metric("my-own-metric", 0.25),
    "one metric fewer": set_metric("train-loss", None),
    "no node-config": remove_record("node-config"),
}


# --- the malformed-reply matrix on synchronous and asynchronous strategies -------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", list(MALFORMED_TRAIN))
def test_a_malformed_train_reply_is_rejected_and_leaves_the_model_untouched(
    strategy: str, case: str
) -> None:
    # Prepare
    change, reason = MALFORMED_TRAIN[case]

    # Execute
    result, recorder = run_local(make_spec(strategy), 3, tamper_with(change))

    # Assert: the run completes, every reply of the bad node is rejected with its reason, and
    # the model is the one a run without that node's replies makes, bit for bit.
    assert recorder.experiments[1].status == "completed"
    bad = bad_updates(recorder)
    assert bad and all(u.status == "rejected" for u in bad), [u.reason for u in bad]
    assert all(reason in (u.reason or "") for u in bad), [u.reason for u in bad]
    dropped, _ = reference(strategy, "dropped")
    for key, value in weights(result).items():
        np.testing.assert_array_equal(value, dropped[key])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", list(HARMLESS_TRAIN))
def test_a_harmless_difference_is_accepted_and_aggregates(strategy: str, case: str) -> None:
    # Execute: one node's metrics differ from the others' (Flower's FedAvg alone would raise
    # InconsistentMessageReplies), or it leaves out its optional node-config.
    result, recorder = run_local(make_spec(strategy), 3, tamper_with(HARMLESS_TRAIN[case]))

    # Assert: accepted, and the model is the honest run's.
    assert recorder.experiments[1].status == "completed"
    bad = bad_updates(recorder)
    assert any(u.status == "accepted" for u in bad)
    assert all(u.status == "accepted" or u.reason == NOT_AGGREGATED for u in bad)
    honest, _ = reference(strategy, "honest")
    for key, value in weights(result).items():
        np.testing.assert_array_equal(value, honest[key])


MALFORMED_EVALUATE: dict[str, tuple[Change, str]] = {
    "NaN metric": (set_metric("eval-loss", math.nan), "'eval-loss' is not finite"),
    "num-examples -1e9": (set_metric("num-examples", -(10**9)), "out of range"),
    "num-examples float -1e9": (set_metric("num-examples", -1e9), "not an integer"),
    "num-examples 0.5": (set_metric("num-examples", 0.5), "not an integer"),
    "extra ArrayRecord": (
        add_record("arrays", ArrayRecord({"x": Array(np.ones(2, np.float32))})),
        "unexpected ArrayRecord 'arrays'",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_EVALUATE))
def test_a_malformed_evaluate_reply_is_rejected_recorded_and_not_aggregated(case: str) -> None:
    # Prepare: FedAvg with federated evaluation on every node after every round.
    change, reason = MALFORMED_EVALUATE[case]
    spec = make_spec("fedavg", clients={"min": 3, "fraction_evaluate": 1.0})

    # Execute
    result, recorder = run_local(spec, 3, tamper_with(change, MessageType.EVALUATE))

    # Assert: one rejection event per round naming the node and the reason; the rounds'
    # federated metrics are those of a run where the node's evaluation is dropped.
    assert recorder.experiments[1].status == "completed"
    rejected = [e for e in recorder.events if e.kind == "evaluate-rejected"]
    assert len(rejected) == STRATEGIES["fedavg"]
    assert all((e.data or {})["node_id"] == str(BAD) for e in rejected)
    assert all(reason in (e.data or {})["reason"] for e in rejected)
    _, dropped_metrics = reference("fedavg", "dropped", evaluate=True)
    assert [r.evaluate_metrics for r in recorder.rounds(1)] == dropped_metrics
    assert all(math.isfinite(v) for m in dropped_metrics for v in m.values())
    honest, _ = reference("fedavg", "honest")
    for key, value in weights(result).items():
        np.testing.assert_array_equal(value, honest[key])


def test_an_evaluate_reply_with_its_own_metric_is_aggregated_on_the_shared_keys() -> None:
    spec = make_spec("fedavg", clients={"min": 3, "fraction_evaluate": 1.0})
    change = tamper_with(set_metric("eval-extra", 1.0), MessageType.EVALUATE)
    _, recorder = run_local(spec, 3, change)
    assert recorder.experiments[1].status == "completed"
    assert not [e for e in recorder.events if e.kind.startswith("evaluate-")]
    assert all("eval-extra" not in r.evaluate_metrics for r in recorder.rounds(1))
    _, honest_metrics = reference("fedavg", "honest", evaluate=True)
    assert [r.evaluate_metrics for r in recorder.rounds(1)] == honest_metrics


# --- a strategy that fails on a reply does not fail the run ------------------------------------


def test_an_async_strategy_raising_on_an_arrival_rejects_only_that_arrival(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = FedAsync.on_arrival

    def choking(self: FedAsync, arrival: Arrival, weights: Weights) -> Any:
        if arrival.node_id == BAD:
            raise ZeroDivisionError("float division by zero")
        return original(self, arrival, weights)

    monkeypatch.setattr(FedAsync, "on_arrival", choking)
    result, recorder = run_local(make_spec("fedasync"), 3)

    assert recorder.experiments[1].status == "completed"
    bad = bad_updates(recorder)
    assert bad and all(u.status == "rejected" for u in bad)
    assert all("the strategy could not use it: ZeroDivisionError" in (u.reason or "") for u in bad)
    assert [e for e in recorder.events if e.kind == "strategy-error"]
    dropped, _ = reference("fedasync", "dropped")
    for key, value in weights(result).items():
        np.testing.assert_array_equal(value, dropped[key])


def test_a_broken_new_model_is_not_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    original = FedAsync.on_arrival

    def overflowing(self: FedAsync, arrival: Arrival, weights: Weights) -> Any:
        decision = original(self, arrival, weights)
        if arrival.node_id != BAD or decision.weights is None:
            return decision
        return replace(decision, weights={k: v * np.inf for k, v in decision.weights.items()})

    monkeypatch.setattr(FedAsync, "on_arrival", overflowing)
    result, recorder = run_local(make_spec("fedasync"), 3)

    # The run completes on finite models; the update that made the broken one is rejected.
    assert recorder.experiments[1].status == "completed"
    assert all(np.isfinite(v).all() for v in weights(result).values())
    bad = bad_updates(recorder)
    assert bad and all(u.status == "rejected" for u in bad)
    assert all("their aggregate was refused: array" in (u.reason or "") for u in bad)
    assert [e for e in recorder.events if e.kind == "aggregate-refused"]


def test_a_strategy_whose_every_model_is_broken_ends_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = FedAsync.on_arrival

    def broken(self: FedAsync, arrival: Arrival, weights: Weights) -> Any:
        decision = original(self, arrival, weights)
        return replace(decision, weights={k: v[:0] for k, v in weights.items()})

    monkeypatch.setattr(FedAsync, "on_arrival", broken)
    with pytest.raises(AggregationError, match="new models in a row refused"):
        run_local(make_spec("fedasync"), 3)


class FailsOnce(RoundAggregator):
    """Averages, except that its first aggregation raises."""

    def __init__(self) -> None:
        self.calls = 0

    def select(self, server_round: int, weights: Weights, nodes: Any) -> dict[int, Any]:
        return {n: {} for n in nodes}

    def aggregate(
        self, server_round: int, weights: Weights, updates: Any
    ) -> tuple[Weights | None, dict[str, float]]:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("a reply's content it could not use")
        return dict(updates[0].weights), {}


class FailsAlways(FailsOnce):
    def aggregate(
        self, server_round: int, weights: Weights, updates: Any
    ) -> tuple[Weights | None, dict[str, float]]:
        raise ValueError("never")


def test_a_failing_aggregation_skips_the_round_and_refuses_its_updates() -> None:
    w = {"w": np.zeros(2, np.float32)}
    rounds = SyncRounds(FailsOnce())
    assert rounds.begin([1, 2], w).dispatch == (1, 2)

    def arrival(node: int) -> Arrival:
        return Arrival(node, {"w": np.ones(2, np.float32)}, w, 0, 0, 5, 1, {}, 0.0)

    rounds.on_arrival(arrival(1), w)
    decision = rounds.on_arrival(arrival(2), w)

    # Skipped: no model, both updates refused with the error, the round sampled again.
    assert decision.weights is None and decision.dispatch == (1, 2)
    assert set(decision.refused) == {1, 2}
    assert all("aggregation failed (KeyError" in r for r in decision.refused.values())
    assert any("aggregation failed" in n.message for n in decision.notes)
    rounds.on_arrival(arrival(1), w)
    assert rounds.on_arrival(arrival(2), w).weights is not None


def test_a_strategy_whose_every_aggregation_fails_ends_the_run_after_max_skips() -> None:
    w = {"w": np.zeros(2, np.float32)}
    rounds = SyncRounds(FailsAlways(), DropoutPolicy(max_skips=2))
    rounds.begin([1], w)
    update = Arrival(1, {"w": np.ones(2, np.float32)}, w, 0, 0, 5, 1, {}, 0.0)
    for _ in range(2):
        assert rounds.on_arrival(update, w).refused
    with pytest.raises(DropoutPolicyError, match="skipped 3 times in a row"):
        rounds.on_arrival(update, w)


# --- the pure checks --------------------------------------------------------------------------


def test_the_norm_bound_warms_up_then_follows_the_recent_median() -> None:
    checks = ReplyChecks.model_validate(
        {"norm_bound": {"kind": "median_multiple", "factor": 10, "window": 3, "warmup": 2}}
    )
    norms = UpdateNorms(checks.norm_bound)
    assert norms.limit() == (1e6, "the absolute ceiling")  # warm-up: the ceiling only
    norms.observe(1.0)
    norms.observe(0.0)  # a zero norm says nothing about scale
    assert norms.limit() == (1e6, "the absolute ceiling")
    for n in (3.0, 2.0):
        norms.observe(n)
    limit = norms.limit()
    assert limit is not None and limit[0] == pytest.approx(20.0)  # 10 × median(1, 3, 2)
    norms.observe(100.0)  # the window holds the last three: 3, 2, 100
    limit = norms.limit()
    assert limit is not None and limit[0] == pytest.approx(30.0)
    assert UpdateNorms(ReplyChecks(norm_bound={"kind": "none"}).norm_bound).limit() is None
    absolute = ReplyChecks.model_validate({"norm_bound": {"kind": "absolute", "max_norm": 5}})
    assert UpdateNorms(absolute.norm_bound).limit() == (5.0, "the absolute bound")


def test_check_train_reply_names_the_norm_bound() -> None:
    sent = {"w": np.zeros(4, np.float32)}
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(4, 3.0, np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    assert check_train_reply(content, sent) is None
    reason = check_train_reply(content, sent, norm_limit=(5.0, "the absolute bound"))
    assert reason == "update norm 6 exceeds the bound 5 (the absolute bound)"


def test_example_counts_must_be_positive_integers_up_to_the_cap() -> None:
    assert check_example_count(7, 10) == 7
    for bad in (0.5, 7.0, 0, -1, 11, True, None, "7", [7]):
        with pytest.raises(MalformedReply):
            check_example_count(bad, 10)


def test_records_and_metrics_checks() -> None:
    good = RecordDict({"metrics": MetricRecord({"num-examples": 3, "eval-loss": 0.5})})
    assert parse_evaluate_reply(good).num_examples == 3
    with pytest.raises(MalformedReply, match="no MetricRecord 'metrics'"):
        check_records(RecordDict({}), arrays=False, node_config=False)
    with pytest.raises(MalformedReply, match="unexpected ConfigRecord 'node-config'"):
        check_records(
            RecordDict({"metrics": MetricRecord({}), "node-config": ConfigRecord({})}),
            arrays=False,
            node_config=False,
        )
    with pytest.raises(MalformedReply, match="not finite"):
        check_metrics(MetricRecord({"x": math.inf}))
    assert common_metric_keys([{"a": 1.0, "b": 2.0}, {"a": 3.0, "c": 1.0}]) == {"a"}


@pytest.mark.parametrize(
    ("reply_checks", "loc"),
    [
        ({"max_examples": 0}, ("reply_checks", "max_examples")),
        ({"max_examples": 10**10}, ("reply_checks", "max_examples")),
        ({"norm_bound": {"kind": "cap"}}, ("reply_checks", "norm_bound")),
        (
            {"norm_bound": {"kind": "absolute", "max_norm": -1}},
            ("reply_checks", "norm_bound", "absolute", "max_norm"),
        ),
        (
            {"norm_bound": {"kind": "median_multiple", "factor": 0.5}},
            ("reply_checks", "norm_bound", "median_multiple", "factor"),
        ),
        (
            {"norm_bound": {"kind": "median_multiple", "warmup": 10, "window": 5}},
            ("reply_checks", "norm_bound", "median_multiple"),
        ),
        ({"norm_bound": {"kind": "none", "factor": 3}}, ("reply_checks", "norm_bound", "none")),
    ],
)
def test_a_bad_reply_checks_field_is_refused_naming_it(
    reply_checks: dict[str, Any], loc: tuple[str, ...]
) -> None:
    with pytest.raises(ValidationError) as info:
        make_spec("fedavg", reply_checks=reply_checks)
    assert any(tuple(e["loc"][: len(loc)]) == loc for e in info.value.errors())


def test_the_api_answers_422_naming_the_field_and_stores_the_defaults(tmp_path: Path) -> None:
    # Prepare
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'florist.db'}")
    body = make_spec("fedavg").model_dump(mode="json", exclude={"reply_checks", "runtime"})
    bad = body | {"reply_checks": {"norm_bound": {"kind": "median_multiple", "factor": -1}}}

    with TestClient(create_app(settings, follow_runs=False)) as client:
        # Execute
        refused = client.post("/api/v1/experiments", json=bad)
        stored = client.post("/api/v1/experiments", json=body)

    # Assert
    assert refused.status_code == 422
    locs = [e["loc"] for e in refused.json()["detail"]]
    assert ["body", "reply_checks", "norm_bound", "median_multiple", "factor"] in locs
    assert stored.status_code == 201, stored.text
    sessions = make_session_factory(make_engine(settings.resolved_database_url()))
    with sessions() as session:
        row = get_experiment(session, experiment_id=stored.json()["id"])
        assert row is not None
        assert row.spec["reply_checks"] == ReplyChecks().model_dump(mode="json")


def test_the_defaults() -> None:
    checks = make_spec("fedavg").reply_checks
    assert checks.max_examples == 10**7
    assert checks.norm_bound.kind == "median_multiple"
    assert (checks.norm_bound.factor, checks.norm_bound.window, checks.norm_bound.warmup) == (
        50.0,
        100,
        3,
    )


# --- fuzzing the reply path --------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One change to a training reply, and whether it must get the reply rejected."""

    name: str
    change: Change
    rejects: bool

    def __repr__(self) -> str:
        return f"{self.name}{' (rejects)' if self.rejects else ''}"


PROTOCOL_VALUES: dict[str, list[tuple[Any, bool]]] = {
    "num-examples": [(5, False), (300, False), (0, True), (-1, True), (0.5, True), (10**9, True)],
    "local-steps": [(7, False), (-1, True), (2.5, True), (math.nan, True)],
    "train-time": [(0.5, False), (-1.0, True), (math.inf, True)],
    "virtual-duration": [(1.0, False), (-2.0, True), (math.nan, True)],
}


@st.composite
def metric_mutations(draw: st.DrawFn) -> Mutation:
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(PROTOCOL_VALUES)))
        value, rejects = draw(st.sampled_from(PROTOCOL_VALUES[key]))
        return Mutation(f"{key}={value!r}", set_metric(key, value), rejects)
    key = draw(
        st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8).filter(
            lambda k: k not in PROTOCOL_VALUES
        )
    )
    value = draw(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-(2**63), 2**63 - 1),
            st.lists(st.floats(-1, 1), min_size=1, max_size=3),
            st.none(),  # remove the key
        )
    )
    if value is None:
        return Mutation(f"drop metric {key}", set_metric(key, None), False)
    rejects = isinstance(value, list) or not (math.isfinite(value) and abs(value) <= 1e15)
    return Mutation(f"{key}={value!r}", set_metric(key, value), rejects)


def _metric_key(m: Mutation) -> str:
    # Names are "key=value" or "drop metric key".
    return m.name.removeprefix("drop metric ").split("=", 1)[0]


def _reshape(k: str, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    return v.reshape(-1) if v.ndim > 1 else v.reshape(1, -1)


def _scaled(factor: float) -> Callable[[str, np.ndarray, np.ndarray], np.ndarray]:
    return lambda k, v, s: (s + factor * (v - s)).astype(v.dtype)


def _special(value: float) -> Callable[[str, np.ndarray, np.ndarray], np.ndarray]:
    def fn(k: str, v: np.ndarray, s: np.ndarray) -> np.ndarray:
        out = v.copy()
        out.flat[len(k) % v.size] = value
        return out

    return fn


ARRAY_MUTATIONS = [
    *(
        Mutation(f"as {t}", map_arrays(lambda k, v, s, t=t: v.astype(t)), True)
        for t in ("float16", "float64", "int32", "int64", "uint8")
    ),
    Mutation("reshaped", map_arrays(_reshape), True),
    *(Mutation(f"one {x}", map_arrays(_special(x)), True) for x in (math.nan, math.inf, -math.inf)),
    Mutation("filled with 1e38", map_arrays(lambda k, v, s: np.full_like(v, 1e38)), True),
    Mutation("update ×1e7", map_arrays(_scaled(1e7)), True),
    Mutation("update ×2", map_arrays(_scaled(2.0)), False),
    Mutation("unchanged arrays", map_arrays(lambda k, v, s: v), False),
    Mutation("extra array", _extra_array, True),
]

RECORD_MUTATIONS = [
    *(
        Mutation(f"add {type(r).__name__} {name}", add_record(name, r), True)
        for name in ("extra", "arrays2", "config")
        for r in (
            ArrayRecord({"x": Array(np.zeros(1, np.float32))}),
            MetricRecord({"x": 1.0}),
            ConfigRecord({"x": "y"}),
        )
    ),
    Mutation("metrics as a ConfigRecord", add_record("metrics", ConfigRecord({"a": 1})), True),
    Mutation("arrays as a MetricRecord", add_record("arrays", MetricRecord({"a": 1.0})), True),
    Mutation("no arrays", remove_record("arrays"), True),
    Mutation("no metrics", remove_record("metrics"), True),
    Mutation("no node-config", remove_record("node-config"), False),
]


@st.composite
def mutations(draw: st.DrawFn) -> list[Mutation]:
    # Arrays and metrics first, records last: a record removed or replaced stays so.
    out = draw(st.lists(st.sampled_from(ARRAY_MUTATIONS), max_size=1))
    # One change per metric key: a second change of the same key would undo the first, and the
    # example's verdict (any change rejects) would no longer describe the reply sent.
    out += draw(st.lists(metric_mutations(), max_size=3, unique_by=_metric_key))
    out += draw(st.lists(st.sampled_from(RECORD_MUTATIONS), max_size=2))
    return out


def _applied(ms: list[Mutation]) -> Change:
    def change(content: RecordDict, request: RecordDict) -> RecordDict:
        for m in ms:
            content = m.change(content, request)
        return content

    return change


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,  # the same examples on every machine, whatever ran before
    suppress_health_check=[HealthCheck.too_slow],
)
@given(strategy=st.sampled_from(["fedavg", "fedasync"]), ms=mutations())
def test_fuzz_the_reply_path(strategy: str, ms: list[Mutation]) -> None:
    # Execute
    result, recorder = run_local(make_spec(strategy), 3, tamper_with(_applied(ms)))

    # Assert: the run survives; a reply that must be rejected is, and then the model is the
    # one made without that node; one that may pass leaves a finite model.
    assert recorder.experiments[1].status == "completed"
    final = weights(result)
    assert all(np.isfinite(v).all() for v in final.values())
    bad = bad_updates(recorder)
    assert bad
    event("must be rejected" if any(m.rejects for m in ms) else "may pass")
    if any(m.rejects for m in ms):
        assert all(u.status == "rejected" for u in bad), [u.reason for u in bad]
        dropped, _ = reference(strategy, "dropped")
        for key, value in final.items():
            np.testing.assert_array_equal(value, dropped[key])
    else:
        assert any(u.status == "accepted" for u in bad), [u.reason for u in bad]
        assert all(u.status == "accepted" or u.reason == NOT_AGGREGATED for u in bad), [
            u.reason for u in bad
        ]
