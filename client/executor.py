"""A warm ClientApp executor: one long-lived process per SuperNode run with ``--isolation process``.

Flower 1.39 starts a fresh ``flwr-clientapp`` process per message, which re-imports flwr, torch
and the app every time (about 3 s of a dispatch on these machines). With ``flower-supernode
--isolation process`` the SuperNode instead waits for an executor to claim each task on its
ClientApp-side API. This module is that executor: it imports torch and the ClientApp once, then
loops::

    AcquireTask → PullTaskInput + PullMessages + objects → ClientApp → PushMessages + objects
    → PushTaskOutput → AcquireTask …

It talks to the SuperNode with Flower's own client and helpers (``RuntimeHttpClient``,
``push_message`` and ``push_task_output`` from ``flwr.supernode.runtime.run_clientapp``, the
object pull/inflate functions) but not with ``run_clientapp``, which ends the process.

Run it next to its SuperNode (server/processes.py's ``supernode_processes`` does, under the
Supervisor)::

    python -m florist.client.executor --clientappio 127.0.0.1:9100 --insecure

What it takes care of, per task:

- the SuperNode creates the task before it has stored the message and pulled its objects from
  the SuperLink, so a fast executor waits for the message and retries "object unavailable"
  with a short back-off (``pull_backoff``) instead of Flower's 1 s;
- a message of a run stopped while it was on its way never gets all its objects: after
  ``object_stall_s`` (30 s) without any object arriving the task is given up, where Flower's
  500 retries would hold this one-task-at-a-time executor, and so its node, for minutes;
- a task heartbeat that reports the task invalid raises SIGINT in this process (Flower's
  heartbeat does that): the task is abandoned, the executor goes on with the next one;
- the heartbeat is stopped before the reply and task output are pushed;
- a ClientApp that raises gets an error reply (``CLIENT_APP_RAISED_EXCEPTION``, or
  ``LOAD_CLIENT_APP_EXCEPTION`` when loading fails), as with stock Flower;
- the global RNG states (random, numpy, torch) and torch's thread count are reset before every
  task to what they were when the executor started, so nothing leaks from one task to the next;
  Context (with its per-run state) comes from the SuperNode with every task;
- torch runs with the host's cores shared out among its executors (``torch_threads``) and has
  paid its lazy imports (the first optimizer) before the first task;
- a FAB with a new hash purges the modules that the previous FAB's project folder provided,
  so a new app under an old package name never runs the old code. Florist's FAB holds no code
  (its components point at the installed package), so that purge never drops torch or florist.

It does not survive its own death: a killed executor leaves its task claimed until the task
token expires (about a minute; the ServerApp then gets ``CLIENT_APP_CRASHED``). Run it under a
supervisor that restarts it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectPushError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from florist.client.flower_tuning import CappedSleep, tune_object_pulls

log = logging.getLogger("florist.executor")

DEFAULT_POLL_S = 0.02
POLL_ENV = "FLORIST_EXECUTOR_POLL"
#: Every AcquireTask is an HTTP request its SuperNode answers, a few milliseconds of CPU on each
#: side. Polling every 0.02 s, five executors made 250 of them a second and took most of 2 cores
#: from the training they waited for (a 5-node round took 7 s, py-spy: mostly AcquireTask). So
#: the wait doubles with every empty poll, from the busy poll to BUSY_POLL_CAP_S, and after
#: IDLE_GRACE_S without a task grows over IDLE_RAMP_S to the idle maximum.
BUSY_POLL_CAP_S = 0.1
DEFAULT_IDLE_POLL_MAX_S = 0.5
IDLE_POLL_MAX_ENV = "FLORIST_EXECUTOR_IDLE_POLL_MAX"
IDLE_GRACE_S, IDLE_RAMP_S = 10.0, 20.0
#: Imported at start-up so that the first task is as warm as the next ones.
DEFAULT_PRELOAD = ("florist.client.clientapp",)
THREADS_ENV = "FLORIST_EXECUTOR_THREADS"


class TaskInvalidated(Exception):
    """The SuperNode's heartbeat answer says this task is no longer valid (SIGINT from flwr)."""


class MessageNotStored(RuntimeError):
    """The task's message did not appear on the SuperNode in time."""


# ----------------------------------------------------------------------------- pure helpers


def backoff_delays(initial: float, cap: float, factor: float = 2.0) -> Iterator[float]:
    """Exponential back-off, without jitter: initial, initial*factor, …, capped at ``cap``."""
    if initial <= 0 or cap < initial or factor < 1:
        raise ValueError(f"bad back-off: initial={initial}, cap={cap}, factor={factor}")
    delay = initial
    while True:
        yield delay
        delay = min(delay * factor, cap)


def modules_under(modules: Mapping[str, ModuleType | None], directory: Path) -> list[str]:
    """Names of the modules whose source file lies inside ``directory``."""
    root = directory.resolve()
    found = []
    for name, module in modules.items():
        file = getattr(module, "__file__", None)
        if not file:
            continue
        try:
            Path(file).resolve().relative_to(root)
        except ValueError:
            continue
        found.append(name)
    return sorted(found)


def poll_interval(env: Mapping[str, str]) -> float:
    """The idle wait between two AcquireTask calls.

    ``FLORIST_EXECUTOR_POLL``, else Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (the
    executor plays the SuperExec's part), else 0.02 s; bounded like Flower's, to [0.01, 60].
    """
    for name in (POLL_ENV, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"):
        raw = env.get(name)
        if raw:
            value = float(raw)
            if not 0.01 <= value <= 60.0:
                raise ValueError(f"{name} must be in [0.01, 60] seconds, got {raw!r}")
            return value
    return DEFAULT_POLL_S


class IdlePoll:
    """The executor's wait before its next AcquireTask: ``poll_s`` after a task, doubling with
    each empty poll up to BUSY_POLL_CAP_S (or ``poll_s`` if that is longer); after IDLE_GRACE_S
    without a task the cap grows to ``idle_max_s`` over IDLE_RAMP_S (CappedSleep's ramp)."""

    def __init__(
        self, poll_s: float, idle_max_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        busy_cap = max(poll_s, BUSY_POLL_CAP_S)
        self._cap = CappedSleep(
            idle=busy_cap,
            other=poll_s,
            idle_max=max(busy_cap, idle_max_s),
            grace=IDLE_GRACE_S,
            ramp=IDLE_RAMP_S,
            clock=clock,
        )
        self.poll_s = poll_s
        self._next = poll_s

    def active(self) -> None:
        """A task came: poll fast again."""
        self._cap.active()
        self._next = self.poll_s

    def wait(self) -> float:
        """The wait after an empty poll (each one doubles the next, up to the cap)."""
        current = min(self._next, self._cap.idle_wait())
        self._next = current * 2
        return current


def idle_poll_max(env: Mapping[str, str]) -> float:
    """The idle poll after a quiet spell: ``FLORIST_EXECUTOR_IDLE_POLL_MAX``, else 0.5 s, in
    [0.01, 60] like the busy poll; never below the busy poll (it wins where set higher)."""
    raw = env.get(IDLE_POLL_MAX_ENV)
    value = float(raw) if raw else DEFAULT_IDLE_POLL_MAX_S
    if not 0.01 <= value <= 60.0:
        raise ValueError(f"{IDLE_POLL_MAX_ENV} must be in [0.01, 60] seconds, got {raw!r}")
    return max(poll_interval(env), value)


def torch_threads(env: Mapping[str, str], executors: int, cpus: int | None) -> int:
    """Intra-op threads per executor: ``FLORIST_EXECUTOR_THREADS``, else the cores shared out
    among the executors on this host (at least one each).

    torch's default is one thread per core in every process: five executors on two cores run
    ten OpenMP threads. Beside two busy processes a local epoch of end_to_end.py's job then took
    0.7–2.3 s against 0.01–0.1 s with one thread each (docs/benchmarks.md). ``executors`` is how
    many executors this process tree runs; ``florist up`` sets the variable when it starts one
    per node.
    """
    raw = env.get(THREADS_ENV)
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if not 1 <= value <= 1024:
            raise ValueError(f"{THREADS_ENV} must be a whole number in [1, 1024], got {raw!r}")
        return value
    return max(1, (cpus or 1) // max(1, executors))


def warm_torch(threads: int) -> None:
    """Set torch's thread count and pay its lazy imports now, not in the first task.

    The first optimizer a process builds imports torch's compiler stack (about 2 s of CPU on
    these machines), which every executor would otherwise pay inside round 1, all at once.
    """
    import torch

    torch.set_num_threads(threads)
    weight = torch.zeros(2, requires_grad=True)
    for optimizer in (torch.optim.SGD([weight], lr=0.1, momentum=0.9), torch.optim.Adam([weight])):
        optimizer.zero_grad()
        (weight * weight).sum().backward()
        optimizer.step()


def _push_reply(client: RuntimeHttpClient, reply: Message, context: Context) -> None:
    """Push the reply; once more in a new push session if the SuperNode dropped the first
    (Flower's ObjectPushError: "the push session may have expired or been replaced", seen on
    2 busy cores) rather than lose a finished task to the round's timeout."""
    try:
        push_message(client, reply, context)
    except ObjectPushError as exc:
        log.warning("reply push failed (%s); pushing it again", exc)
        push_message(client, reply, context)


def error_reason(exc: BaseException) -> tuple[int, str]:
    """The error code and reason an error reply carries, worded like stock Flower's."""
    if isinstance(exc, LoadClientAppError):
        return (
            ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
            f"An exception was raised when attempting to load `ClientApp`: {exc}",
        )
    return ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"


# ----------------------------------------------------------------------------- per-task state


class Phase(Enum):
    IDLE = "idle"
    RUNNING = "running"  # a SIGINT now means the heartbeat invalidated the task
    CLOSING = "closing"  # heartbeat stopped; a late SIGINT from it is ignored


class SignalGuard:
    """Turns flwr's heartbeat SIGINT into :class:`TaskInvalidated` while a task runs."""

    def __init__(self) -> None:
        self.phase = Phase.IDLE
        self.stop_requested = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.phase is Phase.RUNNING:
            raise TaskInvalidated("the SuperNode reports this task as no longer valid")
        if self.phase is Phase.CLOSING:
            log.info("late task-invalid signal ignored")
            return
        raise KeyboardInterrupt

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        if self.phase is not Phase.CLOSING:
            raise SystemExit(0)


class ProcessState:
    """Process-wide state a task may change, captured once and put back before every task."""

    def __init__(self) -> None:
        import numpy as np
        import torch

        self._np = np
        self._torch = torch
        self._random = random.getstate()
        self._numpy = np.random.get_state()
        self._torch_rng = torch.get_rng_state()
        self._threads = torch.get_num_threads()

    def reset(self) -> None:
        random.setstate(self._random)
        self._np.random.set_state(self._numpy)
        self._torch.set_rng_state(self._torch_rng)
        if self._torch.get_num_threads() != self._threads:
            self._torch.set_num_threads(self._threads)


class AppCache:
    """The ClientApp of the current FAB; a FAB with another hash purges the previous app's code."""

    def __init__(
        self,
        install: Callable[[bytes], Any] | None = None,
        load: Callable[[str, str, str], ClientApp] | None = None,
        project_dir: Callable[[str, str, str], Path] | None = None,
    ) -> None:
        self._install = install or (lambda content: install_from_fab(content, skip_prompt=True))
        self._load = load or get_load_client_app_fn(
            default_app_ref="", app_path=None, multi_app=True
        )
        self._project_dir = project_dir or get_project_dir
        self.fab_hash: str | None = None
        self.app_dir: Path | None = None
        self.app: ClientApp | None = None

    def get(self, run: Run, fab: Fab) -> ClientApp:
        if self.app is not None and fab.hash_str == self.fab_hash:
            return self.app
        self.forget()
        app_dir = Path(self._project_dir(run.fab_id, run.fab_version, fab.hash_str))
        if not app_dir.exists():
            self._install(fab.content)
        self.app = self._load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, app_dir
        log.info(
            "loaded ClientApp of FAB %s (%s %s)", fab.hash_str[:12], run.fab_id, run.fab_version
        )
        return self.app

    def forget(self) -> list[str]:
        """Drop the current app and every module its project folder provided."""
        purged: list[str] = []
        if self.app_dir is not None:
            purged = modules_under(sys.modules, self.app_dir)
            for name in purged:
                del sys.modules[name]
            folder = str(self.app_dir.resolve())
            sys.path[:] = [p for p in sys.path if p != folder]
            importlib.invalidate_caches()
            if purged:
                log.info("FAB changed: purged %s", ", ".join(purged))
        self.fab_hash, self.app_dir, self.app = None, None, None
        return purged


# ----------------------------------------------------------------------------- talking to Flower


@dataclass(frozen=True)
class ExecutorConfig:
    clientappio: str
    insecure: bool = True
    root_certificates: bytes | None = None
    poll_s: float = DEFAULT_POLL_S
    idle_poll_max_s: float = DEFAULT_IDLE_POLL_MAX_S
    pull_backoff: float = 0.005
    pull_backoff_cap: float = 0.5
    message_wait_s: float = 60.0
    # A message whose objects stop arriving for this long belongs to a stopped run (its SuperNode
    # can no longer fetch them): give the task up rather than block this node for minutes.
    object_stall_s: float = 30.0


def _task_retry_invoker() -> RetryInvoker:
    """Retry transport errors and 503/504 briefly; never Flower's SIGINT-on-401 behaviour."""

    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (503, 504)
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(base_delay=0.05, max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=8,
        max_time=30,
        should_giveup=giveup,
    )


def _client(config: ExecutorConfig, component: str, token: str | None) -> RuntimeHttpClient:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=config.clientappio,
        insecure=config.insecure,
        root_certificates=config.root_certificates,
        interceptors=interceptors,
        retry_invoker=_task_retry_invoker() if token is not None else None,
    )


def stall_guard(
    pull: Callable[[str], bytes], stall_s: float, clock: Callable[[], float] = time.monotonic
) -> Callable[[str], bytes]:
    """Wrap an object pull so that it fails once no object has arrived for ``stall_s`` seconds.

    Flower retries an unavailable object up to 500 times (minutes with our short back-off); when
    the run was stopped meanwhile the object never comes, and a warm executor, which runs one task
    at a time, would be stuck that long. Progress on any object resets the clock, so a big message
    arriving slowly is never cut short.
    """
    last_progress = clock()
    lock = threading.Lock()

    def guarded(object_id: str) -> bytes:
        nonlocal last_progress
        try:
            content = pull(object_id)
        except ObjectUnavailableError:
            with lock:
                stalled = clock() - last_progress
            if stalled > stall_s:
                reason = f"no object arrived for {stalled:.0f} s; the run was probably stopped"
                raise ObjectPullError(object_id, reason) from None
            raise
        with lock:
            last_progress = clock()
        return content

    return guarded


def pull_input(
    client: RuntimeHttpClient, config: ExecutorConfig
) -> tuple[Message, Context, Run, Fab]:
    """Activate the task and pull its Context, Run, FAB and message, waiting out the races."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = (
        context_from_proto(res.context),
        run_from_proto(res.run),
        fab_from_proto(res.fab),
    )

    # The SuperNode stores the message just after it created the task.
    deadline = time.monotonic() + config.message_wait_s
    for delay in backoff_delays(config.pull_backoff, config.pull_backoff_cap):
        messages = client.PullMessages(PullAppMessagesRequest())
        if messages.messages_list:
            break
        if time.monotonic() > deadline:
            raise MessageNotStored(
                f"no message for task {res.task_id} after {config.message_wait_s} s"
            )
        time.sleep(delay)

    tree = messages.message_object_trees[0]
    node = Node(node_id=context.node_id)
    # Its objects arrive from the SuperLink while we pull: retry soon, not after 1 s.
    message = pull_and_inflate_object_from_tree(
        tree,
        stall_guard(
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            config.object_stall_s,
        ),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=config.pull_backoff,
        backoff_cap=config.pull_backoff_cap,
    )
    # A deflated message does not carry its own id (its object id).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


@dataclass
class TaskOutcome:
    task_id: int
    status: str
    seconds: float
    details: str = ""


class Executor:
    """Claims the SuperNode's ClientApp tasks one at a time and runs them in this process."""

    def __init__(self, config: ExecutorConfig, apps: AppCache | None = None) -> None:
        self.config = config
        self.apps = apps or AppCache()
        self.guard = SignalGuard()
        self.state = ProcessState()
        self.tasks_done = 0

    def acquire(self, client: RuntimeHttpClient) -> tuple[str, int] | None:
        """A task's token and id, or None when the SuperNode has nothing (or is unreachable)."""
        try:
            res = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
            )
        except httpx.TransportError:
            return None  # the SuperNode is (re)starting
        if res.HasField("task") and res.token:
            return str(res.token), int(res.task.task_id)
        return None

    def run_task(self, token: str, task_id: int) -> TaskOutcome:
        """Run one claimed task to its end; only SIGTERM/KeyboardInterrupt escape (re-raised)."""
        started = time.perf_counter()
        client = _client(self.config, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        stopping: BaseException | None = None
        try:
            self.guard.phase = Phase.RUNNING
            heartbeat.start()
            self.state.reset()
            message, context, run, fab = pull_input(client, self.config)
            app = self.apps.get(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except TaskInvalidated as exc:
            log.warning("task abandoned: %s", exc)
            details = str(exc)
        except Exception as exc:
            log.exception("ClientApp raised")
            code, details = error_reason(exc)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Stopped mid-task: say so, so the SuperNode does not wait for the token to expire.
            stopping, details = exc, "executor stopped during the task"
        finally:
            self.guard.phase = Phase.CLOSING
            if heartbeat.is_running:
                heartbeat.stop()
        try:
            if reply is not None and context is not None:
                _push_reply(client, reply, context)
        except Exception:
            # The task's end is still reported below: a SuperNode that never hears of it waits
            # for it and runs no other message.
            log.exception("could not push the task's reply")
            status, details = SubStatus.FAILED, "the reply could not be pushed"
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception:
            log.exception("could not push the task's output")
            status = SubStatus.FAILED
        finally:
            client.close()
            self.guard.phase = Phase.IDLE
        self.tasks_done += 1
        if stopping is not None:
            raise stopping
        return TaskOutcome(task_id, status, time.perf_counter() - started, details)

    def serve(self, max_tasks: int | None = None) -> None:
        self.guard.install()
        acquirer = _client(self.config, "SuperExec", None)
        log.info("warm executor ready on %s (pid %d)", self.config.clientappio, os.getpid())
        poll = IdlePoll(self.config.poll_s, self.config.idle_poll_max_s)
        try:
            while not self.guard.stop_requested:
                claimed = self.acquire(acquirer)
                if claimed is None:
                    time.sleep(poll.wait())
                    continue
                try:
                    outcome = self.run_task(*claimed)
                except TaskInvalidated:  # arrived while an error reply was being built
                    log.warning("task %s abandoned", claimed[1])
                    continue
                finally:
                    poll.active()
                log.info(
                    "task %s %s in %.2f s%s",
                    outcome.task_id,
                    outcome.status,
                    outcome.seconds,
                    f" ({outcome.details})" if outcome.details else "",
                )
                if max_tasks is not None and self.tasks_done >= max_tasks:
                    break
        except (KeyboardInterrupt, SystemExit):
            log.info("executor stopping")
        finally:
            acquirer.close()


def preload(modules: tuple[str, ...]) -> None:
    """Import the app's heavy modules now, so the first task pays nothing extra."""
    for name in modules:
        started = time.perf_counter()
        importlib.import_module(name)
        log.info("preloaded %s in %.2f s", name, time.perf_counter() - started)


def _fresh_rng() -> None:
    """A forked child starts with its parent's RNG states; separate processes would not."""
    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    torch.seed()


class Pool:
    """Executors for several SuperNodes, forked from one parent that has imported torch and the
    app: their pages stay shared copy-on-write, where one process per node pays for its own
    imports (about 180 MiB of private memory each). Each child is an ordinary executor process
    (its own signals, RNG and task loop); the parent restarts a child that dies and stops them
    all on SIGTERM or SIGINT."""

    def __init__(self, configs: list[ExecutorConfig], max_tasks: int | None = None) -> None:
        self.configs = configs
        self.max_tasks = max_tasks
        self.children: dict[int, int] = {}  # pid -> index in configs
        self.stopping = False
        self.restarts = [0] * len(configs)

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: an executor for one SuperNode, never back in this function
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                address = self.configs[index].clientappio
                for handler in logging.getLogger().handlers:  # whose line is whose
                    handler.setFormatter(
                        logging.Formatter(
                            f"%(asctime)s %(levelname)s %(name)s [{address}]: %(message)s"
                        )
                    )
                _fresh_rng()
                Executor(self.configs[index]).serve(max_tasks=self.max_tasks)
            except BaseException:
                log.exception("executor for %s died", self.configs[index].clientappio)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def serve(self) -> None:
        # Objects made so far (the imports) are never collected: the collector would otherwise
        # write to their pages in every child and unshare them.
        gc.freeze()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for index in range(len(self.configs)):
            self._spawn(index)
        log.info("executor pool: %d executors (pid %d)", len(self.configs), os.getpid())
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid not in self.children:
                continue
            index = self.children.pop(pid)
            done = os.waitstatus_to_exitcode(status) == 0 and self.max_tasks is not None
            if self.stopping or done:
                continue
            # A dead executor leaves its SuperNode with no one to run ClientApps: fork another,
            # backing off if it keeps dying (it needs no imports: the parent holds them).
            self.restarts[index] += 1
            delay = min(30.0, 0.5 * 2 ** min(self.restarts[index] - 1, 6))
            log.warning(
                "executor for %s exited (%s); restarting in %.1f s",
                self.configs[index].clientappio,
                os.waitstatus_to_exitcode(status),
                delay,
            )
            time.sleep(delay)
            if not self.stopping:
                self._spawn(index)
        log.info("executor pool stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Florist's warm ClientApp executor.")
    parser.add_argument(
        "--clientappio",
        required=True,
        action="append",
        help="the SuperNode's --host:--port; repeat it to serve several SuperNodes from one "
        "pool of forked executors",
    )
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode")
    parser.add_argument("--root-certificates", type=Path, help="CA bundle (without --insecure)")
    parser.add_argument("--preload", action="append", help="module to import at start (repeatable)")
    parser.add_argument("--max-tasks", type=int, help="exit after this many tasks (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tune_object_pulls()
    preload(tuple(args.preload) if args.preload is not None else DEFAULT_PRELOAD)
    # Before any fork: the pool's children share what this imports.
    threads = torch_threads(os.environ, len(args.clientappio), os.cpu_count())
    warm_torch(threads)
    log.info("torch: %d intra-op thread(s) per executor", threads)
    configs = [
        ExecutorConfig(
            clientappio=address,
            insecure=args.insecure,
            root_certificates=(
                args.root_certificates.read_bytes() if args.root_certificates else None
            ),
            poll_s=poll_interval(os.environ),
            idle_poll_max_s=idle_poll_max(os.environ),
        )
        for address in args.clientappio
    ]
    if len(configs) == 1:
        Executor(configs[0]).serve(max_tasks=args.max_tasks)
    else:
        Pool(configs, max_tasks=args.max_tasks).serve()


if __name__ == "__main__":
    main()
