"""The ServerApp's round logic on an in-process Grid: recording, rejection, determinism."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from florist.client.training import evaluate
from florist.datasets import load_test, load_validation
from florist.server.recording import InMemoryRunRecorder
from florist.server.runtime import NO_REPLY_BY_DEADLINE, PUSH_REFUSED, PushRefusedError
from florist.server.runtime.localgrid import LocalGrid
from florist.server.serverapp import centralized_evaluator, initial_arrays, run_experiment
from florist.server.spec import ExperimentSpec, resolve_strategy, resolve_workload


@pytest.fixture(autouse=True)
def task_identity() -> None:
    # Flower stamps every Message with the process's run id; the SuperLink sets it for real.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def make_spec(**overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "unit",
        "strategy": {"name": "fedavg", "config": {}},
        "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
        "model": {"name": "logreg"},
        "training": {"local_epochs": 1},
        "rounds": 3,
        "clients": {"min": 3},
    }
    body.update(overrides)
    return ExperimentSpec.model_validate(body)


def final_weights(strategy: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in strategy.final_arrays.items()}


def run(
    spec: ExperimentSpec, grid: LocalGrid | None = None, poll_interval: float = 0
) -> tuple[Any, InMemoryRunRecorder]:
    recorder = InMemoryRunRecorder()
    strategy = run_experiment(
        grid or LocalGrid(3),
        spec,
        recorder,
        experiment_id=1,
        flwr_run_id=7,
        poll_interval=poll_interval,
    )
    return strategy, recorder


def test_every_round_is_recorded_with_its_updates() -> None:
    strategy, recorder = run(make_spec())
    rounds = recorder.rounds(1)
    assert [r.server_round for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r.num_updates == 3 and r.num_rejected == 0 and r.num_failures == 0
        assert {u.node_id for u in r.updates} == {1000, 1001, 1002}
        assert all(u.num_examples and u.num_examples > 0 for u in r.updates)
        assert all(u.bytes_up > 0 and u.bytes_up == u.bytes_down for u in r.updates)
        assert 0.0 <= r.metrics["accuracy"] <= 1.0
        assert r.started_at <= r.finished_at
    # Training helps: the last round beats the untrained model's accuracy.
    assert rounds[-1].metrics["accuracy"] > strategy.initial_metrics["accuracy"] + 0.3
    assert recorder.experiments[1].status == "completed"


def test_each_task_records_its_dispatch_as_it_leaves() -> None:
    # Execute
    _, recorder = run(make_spec())

    # Assert: one dispatch event per task, naming its node (as a string) and model version,
    # written as the task left, before its reply came back.
    dispatches = [e for e in recorder.events if e.kind == "dispatch"]
    assert [sorted(e.data or {}) for e in dispatches] == [
        ["model_version", "node_ids", "server_round"]
    ] * 9
    for r in recorder.rounds(1):
        sent = [e for e in dispatches if (e.data or {})["server_round"] == r.server_round]
        assert sorted(n for e in sent for n in (e.data or {})["node_ids"]) == [
            "1000",
            "1001",
            "1002",
        ]
        assert all((e.data or {})["model_version"] == r.server_round - 1 for e in sent)
        for u in r.updates:
            (event,) = [e for e in sent if (e.data or {})["node_ids"] == [str(u.node_id)]]
            assert u.dispatched_at is not None and u.arrived_at is not None
            assert u.dispatched_at <= event.created_at <= u.arrived_at


class HeldGrid(LocalGrid):
    """A LocalGrid whose replies from some nodes become pullable only ``hold[node]`` seconds
    after the push (None: never), as a slow or vanished SuperNode's would."""

    def __init__(self, num_nodes: int, hold: dict[int, float | None]) -> None:
        super().__init__(num_nodes)
        self.hold = hold
        self._ready_at: dict[str, float] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        now = time.monotonic()
        for msg_id, msg in zip(ids, messages, strict=True):
            delay = self.hold.get(msg.metadata.dst_node_id, 0.0)
            self._ready_at[msg_id] = float("inf") if delay is None else now + delay
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        return super().pull_messages([i for i in message_ids if self._ready_at[i] <= now])


def test_sync_updates_record_when_each_task_left_and_came_back() -> None:
    spec = make_spec(rounds=2)
    _, recorder = run(spec, HeldGrid(3, {1001: 1.5}), poll_interval=0.01)
    for r in recorder.rounds(1):
        by_node = {u.node_id: u for u in r.updates}
        assert set(by_node) == {1000, 1001, 1002} and r.num_updates == 3
        for u in r.updates:
            assert u.dispatched_at is not None and u.arrived_at is not None
            assert r.started_at <= u.dispatched_at <= u.arrived_at <= r.finished_at
            assert u.wall_duration_s is not None
            assert u.wall_duration_s == pytest.approx(
                (u.arrived_at - u.dispatched_at).total_seconds(), abs=0.01
            )
            assert u.model_version == u.arrival_version == r.server_round - 1
            assert u.staleness == 0 and u.local_steps and u.local_steps > 0
        # The slow node's bar ends when its reply came, not when the round was committed.
        slow, fast = by_node[1001], by_node[1000]
        assert slow.arrived_at and slow.dispatched_at and fast.arrived_at
        assert slow.arrived_at - slow.dispatched_at >= timedelta(seconds=1.5)
        assert fast.arrived_at < slow.arrived_at <= r.finished_at


def test_a_node_without_reply_by_the_timeout_is_recorded_as_a_dropout() -> None:
    spec = make_spec(rounds=2, round_timeout_s=0.3)
    _, recorder = run(spec, HeldGrid(3, {1002: None}), poll_interval=0.01)
    rounds = recorder.rounds(1)
    assert [r.server_round for r in rounds] == [1, 2]
    for r in rounds:
        assert r.num_updates == 2 and r.num_failures == 1
        (lost,) = [u for u in r.updates if u.status == "failed"]
        assert lost.node_id == 1002 and lost.reason == NO_REPLY_BY_DEADLINE
        assert lost.dispatched_at is not None and lost.arrived_at is not None
        # Its bar runs from dispatch until the server stopped waiting.
        assert lost.wall_duration_s is not None and lost.wall_duration_s >= 0.3
        assert lost.model_version == r.server_round - 1 and lost.bytes_down > 0
        assert 1002 not in r.seen_node_ids
    assert recorder.experiments[1].status == "completed"


def test_every_round_is_evaluated_on_validation_and_test() -> None:
    # Execute
    _, recorder = run(make_spec(rounds=2))

    # Assert: test metrics keep their names, validation ones sit beside them.
    for record in recorder.rounds(1):
        assert set(record.metrics) >= {"accuracy", "loss", "val-accuracy", "val-loss"}
        assert 0.0 <= record.metrics["val-accuracy"] <= 1.0


def test_centralized_evaluator_scores_each_split_on_its_own_data() -> None:
    # Prepare: the model the run starts from, and the two splits scored by hand.
    spec = make_spec()
    plugin, config = resolve_strategy(spec.strategy)
    arrays = initial_arrays(spec)
    workload, workload_config = resolve_workload(spec.workload_ref)
    model = workload.build_model(workload_config)
    model.load_state_dict(arrays.to_torch_state_dict())
    dataset = workload_config.dataset()  # type: ignore[attr-defined]
    on_test = evaluate(model, load_test(dataset))
    on_validation = evaluate(model, load_validation(dataset))

    # Execute
    metrics = centralized_evaluator(spec, plugin, config)(1, arrays)

    # Assert: "accuracy"/"loss" stay the test split's; a swap of the splits fails here.
    assert on_test.loss != pytest.approx(on_validation.loss)
    assert metrics["accuracy"] == pytest.approx(on_test.accuracy)
    assert metrics["loss"] == pytest.approx(on_test.loss)
    assert metrics["val-accuracy"] == pytest.approx(on_validation.accuracy)
    assert metrics["val-loss"] == pytest.approx(on_validation.loss)


def test_without_a_validation_split_rounds_carry_test_metrics_only() -> None:
    spec = make_spec(
        dataset={"name": "digits", "partitioner": {"name": "iid"}, "validation_fraction": 0}
    )
    plugin, config = resolve_strategy(spec.strategy)

    metrics = centralized_evaluator(spec, plugin, config)(1, initial_arrays(spec))

    assert set(metrics) == {"accuracy", "loss"}


def test_same_seed_same_weights_and_other_seed_differs() -> None:
    a, _ = run(make_spec(rounds=2))
    b, _ = run(make_spec(rounds=2))
    c, _ = run(make_spec(rounds=2, seed=1))
    for key, value in final_weights(a).items():
        np.testing.assert_array_equal(value, final_weights(b)[key])
    assert any(not np.array_equal(v, final_weights(c)[k]) for k, v in final_weights(a).items())


def test_fedprox_with_mu_zero_equals_fedavg() -> None:
    avg, _ = run(make_spec(rounds=2))
    prox, _ = run(make_spec(rounds=2, strategy={"name": "fedprox", "config": {"proximal_mu": 0}}))
    prox_mu, _ = run(
        make_spec(rounds=2, strategy={"name": "fedprox", "config": {"proximal_mu": 1.0}})
    )
    for key, value in final_weights(avg).items():
        np.testing.assert_array_equal(value, final_weights(prox)[key])
    assert any(not np.allclose(v, final_weights(prox_mu)[k]) for k, v in final_weights(avg).items())


def _replace_arrays(reply: Message, fn: Any) -> Message:
    arrays = reply.content.array_records["arrays"]
    bad = ArrayRecord({k: Array(fn(k, v.numpy())) for k, v in arrays.items()})
    content = RecordDict({"arrays": bad, "metrics": reply.content.metric_records["metrics"]})
    reply.content = content
    return reply


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda k, v: np.full_like(v, np.nan), "NaN"),
        (lambda k, v: np.zeros((v.size + 1,), dtype=v.dtype), "shape"),
        (lambda k, v: v.astype(np.float64), "float64"),
    ],
)
def test_malformed_update_is_rejected_recorded_and_not_aggregated(
    corrupt: Any, reason: str
) -> None:
    def tamper(node: int, request: Message, reply: Message) -> Message:
        return _replace_arrays(reply, corrupt) if node == 1001 else reply

    spec = make_spec(rounds=2)
    strategy, recorder = run(spec, LocalGrid(3, tamper=tamper))
    for r in recorder.rounds(1):
        bad = [u for u in r.updates if u.node_id == 1001]
        assert len(bad) == 1 and bad[0].status == "rejected"
        assert bad[0].reason is not None and reason in bad[0].reason
        assert r.num_updates == 2 and r.num_rejected == 1
    for value in final_weights(strategy).values():
        assert np.isfinite(value).all()

    # Nothing of the bad update reached the average: same as a run where that node's
    # reply is dropped entirely.
    def drop(node: int, request: Message, reply: Message) -> Message:
        if node == 1001:
            from flwr.app import Error

            return Message(Error(code=0, reason="dropped"), reply_to=request)
        return reply

    dropped, rec2 = run(spec, LocalGrid(3, tamper=drop))
    assert rec2.rounds(1)[0].num_failures == 1
    for key, value in final_weights(strategy).items():
        np.testing.assert_array_equal(value, final_weights(dropped)[key])


def test_bad_example_count_is_rejected() -> None:
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == 1002:
            reply.content.metric_records["metrics"]["num-examples"] = -5
        return reply

    _, recorder = run(make_spec(rounds=1), LocalGrid(3, tamper=tamper))
    (update,) = [u for u in recorder.rounds(1)[0].updates if u.node_id == 1002]
    assert update.status == "rejected" and "num-examples" in (update.reason or "")


def test_client_error_is_recorded_as_failed() -> None:
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == 1000:
            from flwr.app import Error

            error = Error(code=1, reason="ClientAppException: out of memory")
            return Message(error, reply_to=request)
        return reply

    _, recorder = run(make_spec(rounds=1), LocalGrid(3, tamper=tamper))
    (failed,) = [u for u in recorder.rounds(1)[0].updates if u.status == "failed"]
    assert failed.node_id == 1000 and "out of memory" in (failed.reason or "")
    assert failed.dispatched_at is not None and failed.arrived_at is not None


class RefusingGrid(LocalGrid):
    """Refuses the first ``times`` pushes to ``node`` (all of them when ``times`` is None), as
    Flower's HttpGrid does (no ids) for a push too large for the SuperLink."""

    def __init__(self, num_nodes: int, node: int, times: int | None) -> None:
        super().__init__(num_nodes)
        self.node, self.times = node, times

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        refuse = any(m.metadata.dst_node_id == self.node for m in messages)
        if refuse and (self.times is None or self.times > 0):
            self.times = None if self.times is None else self.times - 1
            return []
        return super().push_messages(messages)


def test_a_refused_push_is_a_lost_task_and_the_run_goes_on() -> None:
    _, recorder = run(make_spec(rounds=2), RefusingGrid(3, 1001, times=1))
    first, second = recorder.rounds(1)
    (lost,) = [u for u in first.updates if u.status == "failed"]
    assert lost.node_id == 1001 and lost.reason == PUSH_REFUSED
    assert first.num_updates == 2 and second.num_updates == 3
    assert recorder.experiments[1].status == "completed"


def test_pushes_refused_again_and_again_fail_the_run_with_every_task_recorded() -> None:
    recorder = InMemoryRunRecorder()
    spec = make_spec(rounds=2, clients={"min": 1})
    with pytest.raises(PushRefusedError, match="refused"):
        run_experiment(
            RefusingGrid(1, 1000, times=None), spec, recorder, experiment_id=1, flwr_run_id=7
        )
    assert recorder.experiments[1].status == "failed"
    updates = [u for _, u in recorder.updates(1)]
    assert updates and all(u.status == "failed" and u.reason == PUSH_REFUSED for u in updates)


def test_a_failing_run_is_finished_as_failed() -> None:
    recorder = InMemoryRunRecorder()
    spec = make_spec(strategy={"name": "no-such-strategy", "config": {}})
    with pytest.raises(Exception, match="no-such-strategy"):
        run_experiment(LocalGrid(3), spec, recorder, experiment_id=1, flwr_run_id=7)
    assert recorder.experiments[1].status == "failed"
    assert "no-such-strategy" in (recorder.experiments[1].error or "")
