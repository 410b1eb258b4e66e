"""An in-process Grid: each push runs a ClientApp (florist's by default) directly, no processes.

For unit tests of the server logic and for strategy benchmarks, where Flower's per-message
process start-up would dominate. Deployments and the e2e tests use the real SuperLink/SuperNodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import count
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from florist.client import clientapp
from florist.server.recording import InMemoryRunRecorder
from florist.server.serverapp import RunResult, run_experiment
from florist.server.spec import ExperimentSpec

# (node id, the request, its reply) -> the reply the server gets
Tamper = Callable[[int, Message, Message], Message]


NodeConfig = dict[str, int | float | str | bool]


class LocalGrid(Grid):
    """``num_nodes`` nodes with partition ids, running Florist's ClientApp, or ``app``;
    ``node_configs[i]``, if given, is merged into node i's node-config (a ``data-path``, a device
    profile), a None value removing the key; ``run`` is the Flower run they take part in (its
    override config is every node's run config)."""

    def __init__(
        self,
        num_nodes: int,
        tamper: Tamper | None = None,
        node_configs: list[dict[str, Any]] | None = None,
        *,
        app: ClientApp | None = None,
        run: Run | None = None,
    ) -> None:
        self.node_ids = [1000 + i for i in range(num_nodes)]
        extra = node_configs or [{} for _ in range(num_nodes)]
        if len(extra) != num_nodes:
            raise ValueError(f"{len(extra)} node configs for {num_nodes} nodes")
        self.app = app or clientapp.app
        self._run = run
        self.contexts = {
            nid: Context(
                run_id=1 if run is None else run.run_id,
                node_id=nid,
                node_config=_merged({"partition-id": i, "num-partitions": num_nodes}, extra[i]),
                state=RecordDict(),
                run_config={} if run is None else dict(run.override_config),
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.tamper = tamper
        self._ids = count()
        self._replies: dict[str, Message] = {}
        self.pushed = 0

    def set_run(self, run: Run) -> None:
        pass

    @property
    def run(self) -> Run:
        if self._run is None:
            raise NotImplementedError("LocalGrid was given no run")
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return Message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            # Replies take their source node from the process-wide task identity.
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, node
            try:
                # Through the ClientApp itself, so its mods (device profiles) apply.
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # a crashing ClientApp becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(node, msg, reply)
            self._replies[msg_id] = reply
            ids.append(msg_id)
            self.pushed += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _merged(base: NodeConfig, extra: dict[str, Any]) -> NodeConfig:
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def run_local(
    spec: ExperimentSpec,
    num_nodes: int,
    tamper: Tamper | None = None,
    node_configs: list[dict[str, Any]] | None = None,
) -> tuple[RunResult, InMemoryRunRecorder]:
    """Run ``spec`` in this process on ``num_nodes`` simulated nodes; nothing touches a database."""
    # Flower stamps every Message with the process's run id; a SuperLink would set it.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    recorder = InMemoryRunRecorder()
    grid = LocalGrid(num_nodes, tamper, node_configs)
    result = run_experiment(grid, spec, recorder, experiment_id=1, flwr_run_id=1, poll_interval=0.0)
    return result, recorder
