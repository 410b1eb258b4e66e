"""The Flower ServerApp: runs one experiment's rounds and records each in the database."""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from florist.client.task import task_to_config
from florist.client.training import evaluate, pick_device
from florist.client.workloads import WorkloadConfig, WorkloadDataError, WorkloadPlugin
from florist.datasets import XY
from florist.server.metrics import LOSS, VAL_PREFIX
from florist.server.recording import ExperimentEndedError, RoundRecord, RunRecorder, StoredResume
from florist.server.recording.artifacts import from_safetensors
from florist.server.runtime import EventLoop
from florist.server.runtime.resume import ResumeError, ResumePoint, loads
from florist.server.spec import ExperimentSpec, resolve_strategy, resolve_workload, server_setup
from florist.strategies import StrategyConfig, StrategyPlugin
from florist.strategies.events import EventStrategy
from florist.strategies.flower_adapter import as_scheduler, to_record

log = logging.getLogger(__name__)

app = ServerApp()


def initial_arrays(spec: ExperimentSpec) -> ArrayRecord:
    """The global model before round 1, seeded so every run of a spec starts alike."""
    workload, config = resolve_workload(spec.workload_ref)
    torch.manual_seed(spec.seed)
    return ArrayRecord(workload.build_model(config).state_dict())


def cut_off(exc: BaseException) -> bool:
    """Whether the run ended because it lost the SuperLink or was told to stop, not by a fault
    of its own: a signal (Flower raises SIGINT when the SuperLink no longer accepts the run's
    heartbeat), an exit, or a connection that failed or was refused."""
    import httpx

    if isinstance(exc, KeyboardInterrupt | SystemExit | ConnectionError | httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (401, 403, 502, 503, 504)
    try:
        import grpc
    except ImportError:  # pragma: no cover - flwr depends on grpc
        return False
    lost = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED}
    return isinstance(exc, grpc.RpcError) and getattr(exc, "code", lambda: None)() in lost


def resume_point(
    spec: ExperimentSpec, stored: StoredResume, initial: ArrayRecord
) -> tuple[ArrayRecord, ResumePoint]:
    """The model and loop state a run of an experiment with committed rounds goes on from;
    ResumeError (the run fails, saying why) when the last round left no usable point: starting
    over would record its rounds twice."""
    if stored.state is None or stored.model is None:
        missing = "resume point" if stored.state is None else "model"
        raise ResumeError(
            f"round {stored.server_round} is committed but its {missing} is not stored "
            "(see the run's not-resumable event): the experiment cannot resume"
        )
    point = loads(stored.state)
    if point.version != stored.server_round:
        raise ResumeError(
            f"the resume point is of round {point.version}, the last round {stored.server_round}"
        )
    weights = from_safetensors(stored.model)
    if set(weights) != set(initial):
        raise ResumeError("the stored model does not have the workload model's arrays")
    # In the model's own order, as every message of the run that stored it had them.
    return to_record({k: weights[k] for k in initial}), point


class NoServerData(Exception):
    """The workload has held-out data, but the server cannot read its copy."""


def server_splits(plugin: WorkloadPlugin, config: WorkloadConfig) -> tuple[XY, XY]:
    """The workload's server-held test and validation splits (empty where it has none).

    Raises NoServerData when the workload has them but the server's copy is missing or
    unreadable: the run then goes on without centralized evaluation, and says so."""
    empty = XY(np.empty((0,), np.float32), np.empty((0,), np.int64))
    try:
        test = plugin.load_test(config) if plugin.load_test else empty
        validation = plugin.load_validation(config) if plugin.load_validation else empty
    except (WorkloadDataError, OSError, ValueError) as exc:
        raise NoServerData(str(exc)) from exc
    return test, validation


def centralized_evaluator(
    spec: ExperimentSpec, plugin: StrategyPlugin, config: StrategyConfig
) -> Callable[[int, ArrayRecord], dict[str, float]]:
    """Evaluates a global model on the workload's held-out test split (``loss`` and the
    workload's metrics, e.g. ``accuracy``; reported, never used to choose anything) and on its
    validation split (``val-loss``, ``val-accuracy``, …; what the best round is chosen on),
    plus whatever extra metrics the strategy defines on the test split
    (``plugin.server_metrics``). A workload without server-held data is not evaluated here
    (federated evaluation, ``clients.fraction_evaluate``, still is)."""
    workload, workload_config = resolve_workload(spec.workload_ref)
    test, validation = server_splits(workload, workload_config)
    if test.input_range is None:
        test = XY(test.x, test.y, input_range=workload.input_range(workload_config))
    model = workload.build_model(workload_config).to(pick_device())

    def measure(data: XY, prefix: str) -> dict[str, float]:
        result = evaluate(model, data, loss=workload.loss, metrics=workload.metrics)
        return {f"{prefix}{LOSS}": result.loss} | {
            f"{prefix}{name}": value for name, value in result.metrics.items()
        }

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics: dict[str, float] = {}
        if len(test):
            metrics |= measure(test, "")
            if plugin.server_metrics is not None:
                metrics.update(plugin.server_metrics(model, test, config))
        if len(validation):
            metrics |= measure(validation, VAL_PREFIX)
        return metrics

    return evaluate_global


def _no_evaluation(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
    return {}


@dataclass
class RunResult:
    """What a finished run leaves besides its database rows."""

    final_arrays: ArrayRecord | None
    history: list[RoundRecord]
    initial_metrics: dict[str, float]
    server: EventStrategy  # the plugin's server half as the loop ran it


def run_experiment(
    grid: Grid,
    spec: ExperimentSpec,
    recorder: RunRecorder,
    *,
    experiment_id: int,
    flwr_run_id: int,
    poll_interval: float = 0.1,
    node_poll_s: float = 5.0,
) -> RunResult:
    """Run ``spec`` on the Grid's nodes on Florist's one loop; every round is committed as it
    completes."""
    stored = recorder.resume_from(experiment_id)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=flwr_run_id)
    # Schedulers sample nodes with the global `random` module, as Flower's strategies do.
    random.seed(spec.seed)
    try:
        start, resume = initial_arrays(spec), None
        if stored is not None:
            start, resume = resume_point(spec, stored, start)
        plugin, config = resolve_strategy(spec.strategy)
        try:
            evaluator = centralized_evaluator(spec, plugin, config)
        except NoServerData as exc:
            recorder.record_event(
                run_id=run_id,
                kind="no-server-evaluation",
                message=f"the server cannot read the workload's held-out data ({exc}); "
                "rounds are recorded without centralized accuracy",
            )
            evaluator = _no_evaluation
        loop = EventLoop(
            grid,
            spec,
            as_scheduler(plugin.build_server(config, server_setup(spec))),
            recorder,
            run_id,
            evaluator,
            task_to_config(spec.task()),
            poll_interval=poll_interval,
            node_poll_s=node_poll_s,
        )
        final = loop.run(start, resume)
        result = RunResult(final, loop.history, loop.initial_metrics, loop.strategy)
        final_metrics = result.history[-1].metrics if result.history else loop.last_metrics
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ExperimentEndedError):
            # Cancelled (or failed by the follower) while this process still ran a round: the
            # round was not written, and the experiment keeps the status it ended with.
            recorder.finish_run(run_id, status="stopped", error=error)
            log.warning("experiment %d: run stopped: %s", experiment_id, error)
        elif cut_off(exc):
            # Not the experiment's failure: the SuperLink stopped the run (a cancel: the API
            # sets the final status), forgot it (it restarted) or is gone, or this process was
            # told to stop. The experiment stays as it is; the follower resumes a lost run.
            recorder.finish_run(run_id, status="interrupted", error=error)
            log.warning("experiment %d: run interrupted: %s", experiment_id, error)
        else:
            recorder.finish_run(run_id, status="failed", error=error)
            log.error("experiment %d failed:\n%s", experiment_id, traceback.format_exc())
        raise
    recorder.finish_run(run_id, status="completed", final_metrics=final_metrics)
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point the SuperLink runs: the run config names the experiment to load."""
    from florist.client.flower_tuning import tune_object_pulls
    from florist.server.db.engine import make_engine, make_session_factory, masked
    from florist.server.db.repository import get_experiment
    from florist.server.external import run_database_url
    from florist.server.logs import configure_logging, log_context
    from florist.server.recording import SqlRunRecorder
    from florist.server.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, level=settings.log_level)
    # Replies are pulled as objects: skip Flower's 1 s initial back-off (version-checked).
    tune_object_pulls()
    experiment_id = int(context.run_config["experiment-id"])
    url = run_database_url(context.run_config)
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        experiment = get_experiment(session, experiment_id=experiment_id)
        if experiment is None:
            raise ValueError(f"experiment {experiment_id} is not in the database at {masked(url)}")
        spec = ExperimentSpec.model_validate(experiment.spec)
    with log_context(experiment_id=experiment_id, flwr_run_id=context.run_id):
        run_experiment(
            grid,
            spec,
            SqlRunRecorder(sessions),
            experiment_id=experiment_id,
            flwr_run_id=context.run_id,
        )
