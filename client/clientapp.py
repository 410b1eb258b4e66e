"""The Flower ClientApp: decodes the task, loads this node's data, runs the client half."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from florist.client.attacks import attack_mod, poison_data
from florist.client.profiles import profile_from_node_config, profile_mod
from florist.client.protocol import EvaluateReport, TrainInstruction, TrainReport
from florist.client.simulation import virtual_node_mod
from florist.client.task import NODE_CONFIG_KEY, TaskSpec, task_from_config
from florist.client.training import TrainTask, evaluate, pick_device
from florist.client.workloads import (
    ClientData,
    WorkloadConfig,
    WorkloadDataError,
    WorkloadPlugin,
    default_workloads,
)
from florist.datasets import XY
from florist.datasets.seeds import derive_seed
from florist.strategies import default_registry

# The profile wraps the attack: an attacker's extra runs (ALIE, IPM) take its time too. A virtual
# client of a simulation run first gets its profile from the run's mix (client/simulation.py).
app = ClientApp(mods=[virtual_node_mod, profile_mod, attack_mod])

# Error code of a reply whose node could not read its data (Flower's own codes are below 100;
# 100 is a dropout, client/protocol.py).
DATA_ERROR_CODE = 101


def _workload(task: TaskSpec) -> tuple[WorkloadPlugin, WorkloadConfig]:
    ref = task.workload_ref
    plugin = default_workloads().get(ref.name)
    return plugin, plugin.parse_config(ref.config)


def _model(plugin: WorkloadPlugin, config: WorkloadConfig, content: RecordDict) -> torch.nn.Module:
    model = plugin.build_model(config)
    model.load_state_dict(content.array_records["arrays"].to_torch_state_dict())
    return model.to(pick_device())


def _with_range(data: XY, plugin: WorkloadPlugin, config: WorkloadConfig) -> XY:
    # An attack's projection reads the valid input range off the data it is handed.
    if data.input_range is not None:
        return data
    return XY(x=data.x, y=data.y, input_range=plugin.input_range(config))


def _node_stream(client: ClientData, context: Context) -> int:
    # The partition id outlives a restart (a node id may not); a node on its own data has none.
    return client.partition_id if client.partition_id is not None else context.node_id


def _data_error(msg: Message, exc: WorkloadDataError) -> Message:
    return Message(Error(code=DATA_ERROR_CODE, reason=f"node data: {exc}"), reply_to=msg)


# The warm executor serves every round of a run from one process: a node's data is read once
# per (workload, config, node data, split), not once per round. Small: a node runs few
# experiments at a time.
_DATA_CACHE: OrderedDict[tuple[Any, ...], XY] = OrderedDict()
_DATA_CACHE_SIZE = 4


def _load(split: str, plugin: WorkloadPlugin, config: WorkloadConfig, client: ClientData) -> XY:
    loader = plugin.load_train if split == "train" else plugin.load_local_test
    if loader is None:
        raise WorkloadDataError(f"workload {plugin.name!r} has no node-local {split} data")
    mtime = None
    if client.data_path is not None and client.data_path.exists():
        mtime = client.data_path.stat().st_mtime_ns  # data replaced on disk is read again
    key = (split, plugin.name, config.model_dump_json(), client, mtime)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    try:
        data = _with_range(loader(config, client), plugin, config)
    except WorkloadDataError:
        raise
    except (OSError, ValueError, KeyError, IndexError) as exc:
        # Unreadable or malformed files: the node reports it instead of crashing the ClientApp.
        raise WorkloadDataError(f"{type(exc).__name__}: {exc}") from exc
    _DATA_CACHE[key] = data
    if len(_DATA_CACHE) > _DATA_CACHE_SIZE:
        _DATA_CACHE.popitem(last=False)
    return data


@app.train()
def train(msg: Message, context: Context) -> Message:
    config_record = msg.content.config_records["config"]
    task = task_from_config(config_record)
    plugin = default_registry().get(task.strategy.name)
    config = plugin.parse_config(task.strategy.config)
    workload, workload_config = _workload(task)
    instruction = TrainInstruction.from_record_dict(config_record)
    try:
        client = ClientData.from_node_config(context.node_config, seed=task.seed)
        data = _load("train", workload, workload_config, client)
    except WorkloadDataError as exc:
        return _data_error(msg, exc)
    model = _model(workload, workload_config, msg.content)
    stream = _node_stream(client, context)
    # A label-flipping attacker trains honestly on poisoned labels (client/attacks.py), the
    # same examples flipped every round.
    data = poison_data(data, context.node_config, model, derive_seed(task.seed, "flip", stream))
    started = time.perf_counter()
    result = plugin.train(
        TrainTask(
            model=model,
            data=data,
            training=task.training,
            config=config,
            server_round=instruction.server_round,
            # A node sent the same model version again trains on other batches.
            seed=derive_seed(task.seed, "node", stream, instruction.task_repeat),
            state=context.state,
            device=pick_device(),
            loss=workload.loss,
            optimizer=workload.optimizer,
            # Checked already by the profile mod, which refuses a task on a bad profile.
            profile=profile_from_node_config(context.node_config),
        )
    )
    report = TrainReport(
        num_examples=result.num_examples,
        local_steps=result.steps,
        train_time=time.perf_counter() - started,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": report.to_metrics(result.metrics),
            NODE_CONFIG_KEY: ConfigRecord(dict(context.node_config)),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    task = task_from_config(msg.content.config_records["config"])
    workload, workload_config = _workload(task)
    try:
        client = ClientData.from_node_config(context.node_config, seed=task.seed)
        data = _load("test", workload, workload_config, client)
    except WorkloadDataError as exc:
        return _data_error(msg, exc)
    result = evaluate(
        _model(workload, workload_config, msg.content),
        data,
        loss=workload.loss,
        metrics=workload.metrics,
    )
    report = EvaluateReport(num_examples=result.num_examples)
    extra = {f"eval-{k}": v for k, v in result.metrics.items()}
    metrics = report.to_metrics({"eval-loss": result.loss, **extra})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
