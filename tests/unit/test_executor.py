"""The warm executor's pure parts and the SuperNode process commands."""

from __future__ import annotations

import importlib.util
import itertools
import random
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from flwr.app import Message
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectPushError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.run import Run

from florist.client import executor as ex
from florist.server.processes import supernode_command, supernode_processes

# --------------------------------------------------------------------------- executor helpers


def test_backoff_doubles_up_to_the_cap() -> None:
    assert list(itertools.islice(ex.backoff_delays(0.01, 0.05), 5)) == [
        0.01,
        0.02,
        0.04,
        0.05,
        0.05,
    ]


@pytest.mark.parametrize("initial,cap,factor", [(0, 1, 2), (0.5, 0.1, 2), (0.1, 1, 0.5)])
def test_backoff_refuses_nonsense(initial: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError):
        next(ex.backoff_delays(initial, cap, factor))


def test_poll_interval_prefers_florist_then_flower_then_default() -> None:
    assert ex.poll_interval({}) == ex.DEFAULT_POLL_S
    assert ex.poll_interval({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5"}) == 0.5
    both = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5", ex.POLL_ENV: "0.05"}
    assert ex.poll_interval(both) == 0.05
    with pytest.raises(ValueError):
        ex.poll_interval({ex.POLL_ENV: "0"})


def test_idle_poll_max_defaults_bounds_and_never_undercuts_the_busy_poll() -> None:
    assert ex.idle_poll_max({}) == ex.DEFAULT_IDLE_POLL_MAX_S
    assert ex.idle_poll_max({ex.IDLE_POLL_MAX_ENV: "1.5"}) == 1.5
    # A busy poll set above the idle maximum wins: the executor never polls faster when idle.
    assert ex.idle_poll_max({ex.POLL_ENV: "0.5", ex.IDLE_POLL_MAX_ENV: "0.1"}) == 0.5
    with pytest.raises(ValueError, match=ex.IDLE_POLL_MAX_ENV):
        ex.idle_poll_max({ex.IDLE_POLL_MAX_ENV: "120"})


@pytest.mark.parametrize(
    ("env", "executors", "cpus", "threads"),
    [
        ({}, 1, 2, 2),  # one executor: every core, torch's own default
        ({}, 5, 2, 1),  # five on two cores: one each, never zero
        ({}, 3, 8, 2),  # the cores shared out, rounded down
        ({}, 2, None, 1),  # cpu_count() unknown
        ({"FLORIST_EXECUTOR_THREADS": "3"}, 5, 2, 3),  # the operator's choice wins
    ],
)
def test_torch_threads_share_the_cores_among_the_hosts_executors(
    env: dict[str, str], executors: int, cpus: int | None, threads: int
) -> None:
    assert ex.torch_threads(env, executors, cpus) == threads


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", "5000"])
def test_torch_threads_refuse_a_bad_setting_by_name(raw: str) -> None:
    with pytest.raises(ValueError, match=ex.THREADS_ENV):
        ex.torch_threads({ex.THREADS_ENV: raw}, 1, 2)


def test_warm_torch_sets_the_threads_and_leaves_the_rngs_alone() -> None:
    threads = torch.get_num_threads()
    try:
        rng = torch.get_rng_state()
        ex.warm_torch(1)
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        torch.set_num_threads(threads)


def test_the_poll_backs_off_between_tasks_and_slows_further_when_idle() -> None:
    now = [0.0]
    poll = ex.IdlePoll(0.02, 0.5, clock=lambda: now[0])

    busy = [poll.wait() for _ in range(6)]
    poll.active()
    after_task = poll.wait()
    now[0] = ex.IDLE_GRACE_S + ex.IDLE_RAMP_S / 2  # half-way up the idle ramp
    half = [poll.wait() for _ in range(4)]
    now[0] = ex.IDLE_GRACE_S + ex.IDLE_RAMP_S + 1
    idle = [poll.wait() for _ in range(3)]

    assert busy == pytest.approx([0.02, 0.04, 0.08, ex.BUSY_POLL_CAP_S, 0.1, 0.1])
    assert after_task == 0.02  # a task resets the back-off
    assert half == pytest.approx([0.04, 0.08, 0.16, 0.3])  # capped at 0.1 + (0.5 - 0.1) / 2
    assert idle == pytest.approx([0.5, 0.5, 0.5])


def test_error_reason_matches_stock_flower_codes() -> None:
    code, reason = ex.error_reason(ZeroDivisionError("division by zero"))
    assert code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reason == "<class 'ZeroDivisionError'>:<'division by zero'>"
    code, _ = ex.error_reason(LoadClientAppError("no such module"))
    assert code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION


def _module_in(folder: Path, name: str) -> ModuleType:
    """Import ``name`` from a file in ``folder`` and register it in sys.modules."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text("VALUE = 1\n")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stall_guard_gives_up_only_after_a_stall() -> None:
    # Prepare: "a" arrives, then "b" is unavailable for ever (its run was stopped).
    clock = FakeClock()

    def pull(object_id: str) -> bytes:
        if object_id == "b":
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    guarded = ex.stall_guard(pull, stall_s=30, clock=clock)

    # Execute / Assert: retries are asked for until 30 s pass without progress.
    clock.now = 20
    assert guarded("a") == b"a"
    clock.now = 49
    with pytest.raises(ObjectUnavailableError):
        guarded("b")
    clock.now = 51
    with pytest.raises(ObjectPullError, match="no object arrived for 31 s"):
        guarded("b")


def test_a_stopped_runs_message_fails_fast_in_flowers_pull_loop() -> None:
    # Prepare: Flower's real pull loop, over a transport whose only object never arrives.
    def pull(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    tree = ObjectTree(object_id="f" * 64)

    # Execute / Assert: Flower would retry 500 times; the guard stops it within the stall window.
    with pytest.raises(ObjectPullError, match="run was probably stopped"):
        pull_and_inflate_object_from_tree(
            tree,
            ex.stall_guard(pull, stall_s=0.05),
            lambda object_id: None,
            return_type=Message,
            initial_backoff=0.005,
            backoff_cap=0.01,
        )


def test_modules_under_finds_only_the_folders_modules(tmp_path: Path) -> None:
    inside = _module_in(tmp_path / "app", "florist_test_inside")
    outside = _module_in(tmp_path / "other", "florist_test_outside")
    try:
        found = ex.modules_under(
            {"a": inside, "b": outside, "c": None, "sys": sys}, tmp_path / "app"
        )
        assert found == ["a"]
    finally:
        sys.modules.pop("florist_test_inside")
        sys.modules.pop("florist_test_outside")


class FakeFlower:
    """Stands in for FAB installation and ClientApp loading; counts the calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.installs: list[bytes] = []
        self.loads: list[str] = []

    def project_dir(self, fab_id: str, version: str, fab_hash: str) -> Path:
        return self.root / fab_hash

    def install(self, content: bytes) -> None:
        self.installs.append(content)

    def load(self, fab_id: str, version: str, fab_hash: str) -> ClientApp:
        self.loads.append(fab_hash)
        # The app's own module, imported from its project folder as Flower would.
        _module_in(self.root / fab_hash, "florist_test_fab_app")
        sys.path.insert(0, str((self.root / fab_hash).resolve()))
        return ClientApp()


def _run() -> Run:
    return Run.create_empty(run_id=1)


def test_app_cache_reuses_the_app_of_the_same_fab(tmp_path: Path) -> None:
    fake = FakeFlower(tmp_path)
    cache = ex.AppCache(install=fake.install, load=fake.load, project_dir=fake.project_dir)
    try:
        first = cache.get(_run(), Fab("h1", b"fab-1", {}))
        again = cache.get(_run(), Fab("h1", b"fab-1", {}))
        assert first is again
        assert fake.loads == ["h1"] and fake.installs == [b"fab-1"]
    finally:
        cache.forget()


def test_a_new_fab_purges_the_previous_apps_modules(tmp_path: Path) -> None:
    fake = FakeFlower(tmp_path)
    cache = ex.AppCache(install=fake.install, load=fake.load, project_dir=fake.project_dir)
    try:
        cache.get(_run(), Fab("h1", b"fab-1", {}))
        old_module = sys.modules["florist_test_fab_app"]
        (tmp_path / "h2").mkdir()  # already installed: no second install
        cache.get(_run(), Fab("h2", b"fab-2", {}))
        assert fake.loads == ["h1", "h2"] and fake.installs == [b"fab-1"]
        # The module was dropped and imported again from the new FAB's folder.
        assert sys.modules["florist_test_fab_app"] is not old_module
        assert str((tmp_path / "h1").resolve()) not in sys.path
        assert cache.fab_hash == "h2"
    finally:
        cache.forget()
        assert "florist_test_fab_app" not in sys.modules


# --------------------------------------------------------------------------- signals, state


def test_sigint_invalidates_a_running_task_only() -> None:
    guard = ex.SignalGuard()
    guard.phase = ex.Phase.RUNNING
    with pytest.raises(ex.TaskInvalidated):
        guard._on_sigint(signal.SIGINT, None)
    guard.phase = ex.Phase.CLOSING
    guard._on_sigint(signal.SIGINT, None)  # the heartbeat's late signal: ignored
    guard.phase = ex.Phase.IDLE
    with pytest.raises(KeyboardInterrupt):
        guard._on_sigint(signal.SIGINT, None)


def test_sigterm_stops_at_once_unless_outputs_are_being_pushed() -> None:
    guard = ex.SignalGuard()
    guard.phase = ex.Phase.CLOSING
    guard._on_sigterm(signal.SIGTERM, None)
    assert guard.stop_requested
    guard.phase = ex.Phase.RUNNING
    with pytest.raises(SystemExit):
        guard._on_sigterm(signal.SIGTERM, None)


def test_process_state_reset_gives_every_task_the_same_rngs() -> None:
    threads = torch.get_num_threads()
    state = ex.ProcessState()
    try:
        first = (random.random(), torch.rand(3).tolist())
        torch.set_num_threads(1)
        state.reset()
        again = (random.random(), torch.rand(3).tolist())
        assert first == again
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- process commands


def test_supernode_command_defaults_are_unchanged() -> None:
    cmd = supernode_command(
        superlink="127.0.0.1:9092", clientappio="127.0.0.1:9100", node_config={"a": 1}
    )
    assert cmd[0].endswith("flower-supernode") and "--isolation" not in cmd


def test_supernode_processes_pair_a_tuned_node_with_its_executor(tmp_path: Path) -> None:
    node, executor = supernode_processes(
        "supernode-0",
        superlink="127.0.0.1:9092",
        clientappio="127.0.0.1:9100",
        node_config={"partition-id": 0, "num-partitions": 1},
        env={},
        log_dir=tmp_path,
        restart=False,
    )
    assert node.argv[:3] == [sys.executable, "-m", "florist.client.supernode"]
    assert list(node.argv[-2:]) == ["--isolation", "process"] and not node.restart
    assert list(executor.argv[1:3]) == ["-m", "florist.client.executor"]
    assert "127.0.0.1:9100" in executor.argv and executor.restart
    with pytest.raises(ValueError):
        supernode_command(superlink="x:1", clientappio="x:2", node_config={}, isolation="thread")


def test_a_reply_push_the_supernode_dropped_is_pushed_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the SuperNode drops the first push session (Flower's ObjectPushError), then
    # takes the reply; a second drop in a row is not hidden.
    pushed: list[object] = []
    failures = {"left": 1}

    def push(client: object, reply: object, context: object) -> None:
        pushed.append(reply)
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ObjectPushError("2cf7dedd", 7, "session-1")

    monkeypatch.setattr(ex, "push_message", push)
    reply, context = object(), object()

    # Execute / Assert
    ex._push_reply(None, reply, context)  # type: ignore[arg-type]
    assert pushed == [reply, reply]
    failures["left"] = 2
    with pytest.raises(ObjectPushError):
        ex._push_reply(None, reply, context)  # type: ignore[arg-type]
