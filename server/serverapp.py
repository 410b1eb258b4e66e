"""The Flower ServerApp: runs one experiment's rounds and records each in the database."""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from florist.client.models import build_model
from florist.client.task import task_to_config
from florist.client.training import evaluate, pick_device
from florist.datasets import dataset_info, load_test
from florist.server.recorder import RoundRecord, RunRecorder
from florist.server.rounds import PollingGrid, RecordingStrategy
from florist.server.runtime import EventLoop
from florist.server.spec import ExperimentSpec, resolve_strategy, runtime_of, server_setup
from florist.strategies import StrategyConfig, StrategyPlugin

log = logging.getLogger(__name__)

app = ServerApp()


def initial_arrays(spec: ExperimentSpec) -> ArrayRecord:
    """The global model before round 1, seeded so every run of a spec starts alike."""
    torch.manual_seed(spec.seed)
    return ArrayRecord(build_model(spec.model, dataset_info(spec.dataset)).state_dict())


def centralized_evaluator(
    spec: ExperimentSpec, plugin: StrategyPlugin, config: StrategyConfig
) -> Callable[[int, ArrayRecord], dict[str, float]]:
    """Evaluates a global model on the dataset's held-out test split (never used for training),
    plus whatever extra metrics the strategy defines (``plugin.server_metrics``)."""
    test = load_test(spec.dataset)
    model = build_model(spec.model, dataset_info(spec.dataset)).to(pick_device())

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, test)
        metrics = {"accuracy": result.accuracy, "loss": result.loss}
        if plugin.server_metrics is not None:
            metrics.update(plugin.server_metrics(model, test, config))
        return metrics

    return evaluate_global


@dataclass
class RunResult:
    """What a finished run leaves besides its database rows."""

    final_arrays: ArrayRecord | None
    history: list[RoundRecord]
    initial_metrics: dict[str, float]
    server: object  # the plugin's server half (a Flower Strategy or an EventStrategy), as run


def run_experiment(
    grid: Grid,
    spec: ExperimentSpec,
    recorder: RunRecorder,
    *,
    experiment_id: int,
    flwr_run_id: int,
    poll_interval: float = 0.1,
) -> RunResult:
    """Run ``spec`` on the Grid's nodes; every round is committed as it completes.

    Synchronous plugins run on Flower's own ``Strategy.start`` loop; event-driven ones (and any
    plugin when ``spec.runtime == "event"``) on Florist's :class:`EventLoop`.
    """
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=flwr_run_id)
    # Flower samples nodes with the global `random` module; so does SyncFedAvg.
    random.seed(spec.seed)
    try:
        plugin, config = resolve_strategy(spec.strategy)
        setup = server_setup(spec)
        evaluate = centralized_evaluator(spec, plugin, config)
        if runtime_of(spec, plugin) == "event":
            assert plugin.build_event_server is not None  # runtime_of checked it
            loop = EventLoop(
                grid,
                spec,
                plugin.build_event_server(config, setup),
                recorder,
                run_id,
                evaluate,
                task_to_config(spec.task()),
                poll_interval=poll_interval,
            )
            final = loop.run(initial_arrays(spec))
            result = RunResult(final, loop.history, loop.initial_metrics, loop.strategy)
        else:
            assert plugin.build_server is not None  # runtime_of checked it
            strategy = RecordingStrategy(
                plugin.build_server(config, setup), recorder, run_id, evaluate
            )
            flower_result = strategy.start(
                grid=PollingGrid(grid, poll_interval),
                initial_arrays=initial_arrays(spec),
                num_rounds=spec.rounds,
                timeout=spec.round_timeout_s,
                train_config=ConfigRecord(task_to_config(spec.task())),
                evaluate_config=ConfigRecord(task_to_config(spec.task())),
                evaluate_fn=strategy.evaluate_fn,
            )
            result = RunResult(
                flower_result.arrays, strategy.history, strategy.initial_metrics, strategy.inner
            )
    except BaseException as exc:
        # A stop from the SuperLink arrives as an exception too; the API sets the final status.
        recorder.finish_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        log.error("experiment %d failed:\n%s", experiment_id, traceback.format_exc())
        raise
    final_metrics = result.history[-1].metrics if result.history else {}
    recorder.finish_run(run_id, status="completed", final_metrics=final_metrics)
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point the SuperLink runs: the run config names the experiment to load."""
    from florist.client.flower_tuning import tune_object_pulls
    from florist.server.db.engine import make_engine, make_session_factory
    from florist.server.db.repository import get_experiment
    from florist.server.recorder import SqlRunRecorder
    from florist.server.settings import get_settings

    # Replies are pulled as objects: skip Flower's 1 s initial back-off (version-checked).
    tune_object_pulls()
    experiment_id = int(context.run_config["experiment-id"])
    url = str(context.run_config.get("database-url") or "") or (
        get_settings().resolved_database_url()
    )
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        experiment = get_experiment(session, experiment_id=experiment_id)
        if experiment is None:
            raise ValueError(f"experiment {experiment_id} is not in the database at {url}")
        spec = ExperimentSpec.model_validate(experiment.spec)
    run_experiment(
        grid,
        spec,
        SqlRunRecorder(sessions),
        experiment_id=experiment_id,
        flwr_run_id=context.run_id,
    )
