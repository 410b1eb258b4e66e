"""The Flower ClientApp: decodes the task, loads this node's shard, runs the client half."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from florist.client.models import build_model
from florist.client.profiles import profile_mod
from florist.client.protocol import EvaluateReport, TrainInstruction, TrainReport
from florist.client.task import NODE_CONFIG_KEY, TaskSpec, task_from_config
from florist.client.training import TrainTask, evaluate, pick_device
from florist.datasets import XY, dataset_info, load_partition, load_test
from florist.datasets.seeds import derive_seed
from florist.strategies import default_registry

app = ClientApp(mods=[profile_mod])


class NodeConfigError(ValueError):
    """The SuperNode was started without a usable partition in its node-config."""


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``partition-id`` and ``num-partitions`` from the SuperNode's ``--node-config``."""
    try:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NodeConfigError(
            "start the SuperNode with --node-config 'partition-id=N num-partitions=M' "
            f"(got {dict(node_config)})"
        ) from exc
    if not 0 <= pid < num:
        raise NodeConfigError(f"partition-id {pid} is not in [0, {num})")
    return pid, num


def _model(task: TaskSpec, content: RecordDict) -> torch.nn.Module:
    model = build_model(task.model, dataset_info(task.dataset))
    model.load_state_dict(content.array_records["arrays"].to_torch_state_dict())
    return model.to(pick_device())


@app.train()
def train(msg: Message, context: Context) -> Message:
    config_record = msg.content.config_records["config"]
    task = task_from_config(config_record)
    plugin = default_registry().get(task.strategy.name)
    config = plugin.parse_config(task.strategy.config)
    pid, num = node_partition(context.node_config)
    model = _model(task, msg.content)
    instruction = TrainInstruction.from_record_dict(config_record)
    started = time.perf_counter()
    result = plugin.train(
        TrainTask(
            model=model,
            data=load_partition(task.dataset, pid, num),
            training=task.training,
            config=config,
            server_round=instruction.server_round,
            # A node sent the same model version again trains on other batches.
            seed=derive_seed(task.seed, "node", pid, instruction.task_repeat),
            state=context.state,
            device=pick_device(),
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


def local_test_shard(task: TaskSpec, pid: int, num: int) -> XY:
    """This node's slice of the held-out test split, for federated evaluation."""
    test = load_test(task.dataset)
    return XY(x=test.x[pid::num], y=test.y[pid::num])


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    task = task_from_config(msg.content.config_records["config"])
    pid, num = node_partition(context.node_config)
    result = evaluate(_model(task, msg.content), local_test_shard(task, pid, num))
    report = EvaluateReport(num_examples=result.num_examples)
    metrics = report.to_metrics({"eval-loss": result.loss, "eval-accuracy": result.accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
