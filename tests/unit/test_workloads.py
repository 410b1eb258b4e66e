"""Workload plugins: the registry, node-local data, the workload's loss/optimiser/metrics in the
one training loop, and what a node with missing or malformed data does to a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from florist.client.plugins import DuplicatePluginError, PluginLoadError
from florist.client.workloads import (
    ClientData,
    WorkloadConfig,
    WorkloadDataError,
    WorkloadPlugin,
    WorkloadRegistry,
    default_workloads,
)
from florist.client.workloads.generated import DigitsConfig
from florist.datasets import XY, load_partition
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec, StrategySpecError, resolve_workload
from tests.workload_data import THIRD_PARTY, csv_workload, write_node_csv


@pytest.fixture
def third_party(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CSV workload 'installed' (on sys.path with its dist-info), as a user would pip it."""
    monkeypatch.syspath_prepend(str(THIRD_PARTY))
    default_workloads.cache_clear()
    yield
    default_workloads.cache_clear()


def spec(workload: dict[str, Any], **overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "workload",
        "strategy": {"name": "fedavg", "config": {}},
        "workload": workload,
        "rounds": 2,
        "clients": {"min": 3},
        "training": {"local_steps": 3, "batch_size": 8, "lr": 0.01},
    }
    return ExperimentSpec.model_validate(body | overrides)


def test_builtins_and_a_third_party_workload_register_through_entry_points(
    third_party: None,
) -> None:
    registry = default_workloads()
    assert {"digits", "synthetic", "csv-tabular"} <= set(registry.names())
    assert registry.get("csv-tabular").name == "csv-tabular"
    with pytest.raises(KeyError, match=r"known workloads: .*digits"):
        registry.get("imagenet")


def test_registry_refuses_a_duplicate_and_reports_a_non_plugin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib.metadata import EntryPoint

    registry = WorkloadRegistry(group="test.workloads")
    registry.register(default_workloads().get("digits"))
    with pytest.raises(DuplicatePluginError):
        registry.register(default_workloads().get("digits"))
    eps = [EntryPoint("bogus", "florist.client.workloads:ClientData", "test.workloads")]
    monkeypatch.setattr("florist.client.plugins.entry_points", lambda group: eps)
    plugins, errors = WorkloadRegistry(group="test.workloads").load_all()
    assert plugins == [] and "not a WorkloadPlugin" in errors["bogus"]
    with pytest.raises(PluginLoadError):
        WorkloadRegistry(group="test.workloads").get("bogus")


def test_older_dataset_and_model_body_is_the_builtin_workload() -> None:
    older = spec(workload=None, dataset={"name": "digits", "seed": 3}, model={"name": "cnn"})  # type: ignore[arg-type]
    plugin, config = resolve_workload(older.workload_ref)
    assert plugin.name == "digits" and older.dataset is None and older.model is None
    assert isinstance(config, DigitsConfig)
    assert config.seed == 3 and config.model.name == "cnn"
    # The same data a node loaded before workloads existed.
    node = plugin.load_train(config, ClientData(partition_id=1, num_partitions=3))
    before = load_partition(config.dataset(), 1, 3)
    np.testing.assert_array_equal(node.x, before.x)
    # Stored specs round-trip as workloads.
    again = ExperimentSpec.model_validate(older.model_dump(mode="json"))
    assert again.workload == older.workload


@pytest.mark.parametrize(
    ("workload", "loc"),
    [
        ({"name": "nope"}, ("workload", "name")),
        ({"name": "digits", "config": {"seed": -1}}, ("workload", "config", "seed")),
        ({"name": "digits", "config": {"modle": {}}}, ("workload", "config", "modle")),
    ],
)
def test_bad_workload_names_the_field(workload: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(StrategySpecError) as info:
        resolve_workload(spec(workload).workload_ref)
    assert info.value.errors[0]["loc"][: len(loc)] == loc


def test_client_data_reads_the_node_config(tmp_path: Path) -> None:
    data = ClientData.from_node_config(
        {"data-path": str(tmp_path), "partition-id": 1, "num-partitions": 2}
    )
    assert data.data_path == tmp_path and data.require_partition("w") == (1, 2)
    with pytest.raises(WorkloadDataError, match="data-path"):
        ClientData.from_node_config({}).require_path("csv-tabular")
    with pytest.raises(WorkloadDataError, match="does not exist"):
        ClientData(data_path=tmp_path / "gone").require_path("csv-tabular")
    with pytest.raises(WorkloadDataError, match="partition-id"):
        ClientData(data_path=tmp_path).require_partition("digits")
    with pytest.raises(WorkloadDataError, match="not in"):
        ClientData.from_node_config({"partition-id": 3, "num-partitions": 3})


def test_each_node_trains_on_its_own_csv_folder_and_a_node_without_data_fails_alone(
    third_party: None, tmp_path: Path
) -> None:
    # Prepare: two nodes with their own folders of different sizes; the third has no data-path.
    sizes = [37, 52]
    folders = [write_node_csv(tmp_path / f"site-{i}", n, 10, seed=i) for i, n in enumerate(sizes)]
    node_configs: list[dict[str, Any]] = [{"data-path": str(f)} for f in folders] + [{}]
    s = spec(csv_workload(), clients={"min": 3, "fraction_evaluate": 1.0})

    # Execute
    result, recorder = run_local(s, 3, node_configs=node_configs)

    # Assert: both rounds ran; each node's examples are its CSV's rows; the third failed, saying
    # why.
    rounds = recorder.rounds(1)
    assert [r.server_round for r in rounds] == [1, 2]
    for record in rounds:
        by_node = {u.node_id: u for u in record.updates}
        assert [by_node[1000 + i].num_examples for i in range(2)] == sizes
        assert all(by_node[1000 + i].status == "accepted" for i in range(2))
        assert by_node[1002].status == "failed"
        assert "data-path" in (by_node[1002].reason or "")
        # Federated evaluation on the nodes' own test.csv: the workload's metrics, eval- prefixed.
        assert 0.0 <= record.evaluate_metrics["eval-accuracy"] <= 1.0
        # No server-held data: no centralized metrics, and nothing pretends otherwise.
        assert "accuracy" not in record.metrics
    assert result.final_arrays is not None


def test_a_malformed_csv_fails_that_node_with_the_file_named(
    third_party: None, tmp_path: Path
) -> None:
    good = [write_node_csv(tmp_path / f"site-{i}", 20, 5, seed=i) for i in range(2)]
    bad = tmp_path / "site-bad"
    bad.mkdir()
    (bad / "train.csv").write_text("a,b\n1,2\n")
    configs: list[dict[str, Any]] = [{"data-path": str(f)} for f in [*good, bad]]
    _, recorder = run_local(spec(csv_workload(), rounds=1), 3, node_configs=configs)
    (record,) = recorder.rounds(1)
    failed = [u for u in record.updates if u.status == "failed"]
    assert len(failed) == 1 and str(bad / "train.csv") in (failed[0].reason or "")
    assert record.num_updates == 2


class _Tiny(WorkloadConfig):
    scale: float = 1.0


def _tiny_data(config: _Tiny, client: ClientData) -> XY:
    rng = np.random.default_rng(client.partition_id)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    return XY(x=x, y=(x[:, 0] > 0).astype(np.int64))


def _tiny(name: str, **fields: Any) -> WorkloadPlugin:
    return WorkloadPlugin(
        name=name,
        summary="test",
        config_model=_Tiny,
        build_model=lambda config: nn.Linear(3, 2),
        load_train=_tiny_data,
        load_test=lambda config: _tiny_data(config, ClientData(partition_id=9)),
        **fields,
    )


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> WorkloadRegistry:
    registry = WorkloadRegistry(group="test.none")
    monkeypatch.setattr("florist.client.workloads.default_workloads", lambda: registry)
    monkeypatch.setattr("florist.client.clientapp.default_workloads", lambda: registry)
    monkeypatch.setattr("florist.server.spec.default_workloads", lambda: registry)
    return registry


def _trained_weights(name: str) -> dict[str, np.ndarray]:
    result, _ = run_local(spec({"name": name}, rounds=1, clients={"min": 2}), 2)
    assert result.final_arrays is not None
    return {k: v.numpy() for k, v in result.final_arrays.items()}


def test_the_workloads_loss_optimiser_and_metrics_are_the_ones_used(
    tiny_registry: WorkloadRegistry,
) -> None:
    # Prepare: one workload with the defaults, one whose loss is zero (no gradient), one whose
    # optimiser never moves, one with its own metric.
    tiny_registry.register(_tiny("plain"))
    tiny_registry.register(_tiny("no-loss", loss=lambda out, y: (out * 0).sum()))
    tiny_registry.register(
        _tiny("frozen", optimizer=lambda params, training: torch.optim.SGD(params, lr=0.0))
    )
    tiny_registry.register(
        _tiny(
            "custom-metric",
            metrics=lambda out, y: {"positives": float((out.argmax(1) == 1).float().mean())},
        )
    )
    torch.manual_seed(0)
    start = {k: v.numpy() for k, v in nn.Linear(3, 2).state_dict().items()}

    # Execute
    plain, no_loss, frozen = (_trained_weights(n) for n in ("plain", "no-loss", "frozen"))
    _, recorder = run_local(spec({"name": "custom-metric"}, rounds=1, clients={"min": 2}), 2)

    # Assert: default training moves the weights; a zero loss or a zero step leaves them be.
    assert any(not np.allclose(plain[k], start[k]) for k in start)
    # (Up to float32 rounding: FedAvg's running sum of the unmoved models, divided by the total
    # weight, may land an ulp away from the model; a step would move it by far more.)
    for k in start:
        np.testing.assert_allclose(no_loss[k], start[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(frozen[k], start[k], rtol=1e-6, atol=1e-7)
    (record,) = recorder.rounds(1)
    assert "positives" in record.metrics and "accuracy" not in record.metrics


def test_a_server_without_its_copy_of_the_test_data_runs_on_and_says_so(
    tiny_registry: WorkloadRegistry,
) -> None:
    def missing(config: _Tiny) -> XY:
        raise WorkloadDataError("/srv/data/tiny/test.npz does not exist")

    plugin = _tiny("server-less")
    tiny_registry.register(
        WorkloadPlugin(**{**plugin.__dict__, "load_test": missing})  # type: ignore[arg-type]
    )
    _, recorder = run_local(spec({"name": "server-less"}, rounds=1, clients={"min": 2}), 2)
    (record,) = recorder.rounds(1)
    assert record.num_updates == 2 and record.metrics == {}
    (event,) = [e for e in recorder.events if e.kind == "no-server-evaluation"]
    assert "/srv/data/tiny/test.npz" in event.message


def _all_strategies() -> list[str]:
    from florist.strategies import default_registry

    return default_registry().names()


@pytest.mark.parametrize("strategy", _all_strategies())
def test_every_strategy_trains_a_third_party_workload(
    strategy: str, third_party: None, tmp_path: Path
) -> None:
    # Prepare: the CSV workload (its own model, Adam, no server-held data) on three own folders.
    folders = [write_node_csv(tmp_path / f"site-{i}", 24 + 8 * i, 6, seed=i) for i in range(3)]
    configs: list[dict[str, Any]] = [{"data-path": str(f)} for f in folders]
    s = spec(
        csv_workload(),
        strategy={"name": strategy, "config": {}},
        rounds=3,
        clock="virtual",
        time_budget_s=10_000.0,
    )

    # A strategy that needs something of the model (FZooS: a surrogate buffer, which only the
    # black-box workloads have) says why it cannot run this one, as the API does with a 422.
    from florist.strategies import default_registry

    plugin = default_registry().get(strategy)
    if plugin.model_check is not None:
        workload, config = resolve_workload(s.workload_ref)
        reason = plugin.model_check(workload.build_model(config))
        if reason is not None:
            assert "black-box workload" in reason
            return

    # Execute
    result, recorder = run_local(s, 3, node_configs=configs)

    # Assert: it aggregated, from updates of the nodes' own sizes, into a finite model.
    rounds = recorder.rounds(1)
    assert rounds, f"{strategy} aggregated nothing"
    sizes = {24, 32, 40}
    accepted = [u for r in rounds for u in r.updates if u.status == "accepted"]
    assert accepted and {u.num_examples for u in accepted} <= sizes
    assert result.final_arrays is not None
    assert all(np.isfinite(a.numpy()).all() for a in result.final_arrays.values())
