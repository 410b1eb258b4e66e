"""Florist's version-checked tuning of Flower 1.39's polls, back-offs and SuperNode loop."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.app import Message

from florist.client import flower_tuning as ft


def test_tuning_refuses_other_flower_versions() -> None:
    from flwr.supercore.inflatable import inflatable_utils

    before = dict(inflatable_utils.pull_objects.__kwdefaults__ or {})
    assert not ft.version_supported("1.40.0")
    assert not ft.tune_object_pulls(version="1.40.0")
    assert not ft.tune_supernode(version="1.40.0")
    assert inflatable_utils.pull_objects.__kwdefaults__ == before
    assert ft.version_supported()  # the project pins the tuned version


def test_capped_sleep_shortens_flowers_waits() -> None:
    slept: list[float] = []
    capped = ft.CappedSleep(idle=0.2, other=0.02, sleep=slept.append)
    capped.sleep(3)  # SuperNode idle poll
    capped.sleep(0.5)  # reply wait
    capped.sleep(0.01)
    assert slept == [0.2, 0.02, 0.01]
    assert capped.monotonic() > 0  # the rest of ``time`` is the real one


def test_an_idle_node_polls_less_often_and_fast_again_once_it_works() -> None:
    # Prepare: a node idle-polling at 0.2 s, slowing to 1 s from 10 s to 30 s of idleness.
    now = [100.0]
    slept: list[float] = []
    capped = ft.CappedSleep(
        idle=0.2,
        other=0.02,
        idle_max=1.0,
        grace=10,
        ramp=20,
        sleep=slept.append,
        clock=lambda: now[0],
    )

    def idle_poll_at(t: float) -> float:
        now[0] = t
        capped.sleep(3)
        return slept[-1]

    # Assert: fast within the grace period, halfway up the ramp at 20 s, capped after 30 s.
    assert idle_poll_at(105.0) == 0.2
    assert idle_poll_at(110.0) == 0.2
    assert idle_poll_at(120.0) == pytest.approx(0.6)
    assert idle_poll_at(200.0) == 1.0

    # Execute: a reply wait (the node ran a task), then idle again.
    capped.sleep(0.5)

    # Assert: fast again until the next grace period has passed.
    assert slept[-1] == 0.02
    assert idle_poll_at(205.0) == 0.2
    assert idle_poll_at(215.0) == pytest.approx(0.4)

    # Execute: a poll that brings a message.
    capped.active()

    # Assert
    assert idle_poll_at(215.0) == 0.2


def test_tuning_reads_and_checks_the_environment() -> None:
    tuning = ft.Tuning.from_env({ft.IDLE_POLL_ENV: "0.5"})
    assert tuning.idle_poll == 0.5 and tuning.reply_poll == ft.Tuning().reply_poll
    assert tuning.idle_poll_max == ft.Tuning().idle_poll_max
    # The slow idle poll is never faster than the fast one.
    assert ft.Tuning.from_env({ft.IDLE_POLL_ENV: "2", ft.IDLE_POLL_MAX_ENV: "1"}).idle_poll_max == 2
    with pytest.raises(ValueError):
        ft.Tuning.from_env({ft.PULL_BACKOFF_ENV: "-1"})


@pytest.fixture
def restore_flower() -> Any:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    fns = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(fn.__kwdefaults__ or {}) for fn in fns]
    saved_time = sci.time
    yield
    for fn, kw in zip(fns, saved, strict=True):
        fn.__kwdefaults__ = kw
    sci.time = saved_time


@pytest.mark.usefixtures("restore_flower")
def test_tune_supernode_patches_the_polls_and_pulls() -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    tuning = ft.Tuning(idle_poll=0.3, reply_poll=0.01, pull_initial_backoff=0.04)
    assert ft.tune_supernode(tuning)
    assert isinstance(sci.time, ft.CappedSleep) and sci.time.idle == 0.3
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert fn.__kwdefaults__ is not None
        assert fn.__kwdefaults__["initial_backoff"] == 0.04
        assert fn.__kwdefaults__["backoff_cap"] == tuning.pull_backoff_cap
    # Applying it twice is harmless.
    assert ft.tune_supernode(tuning)
    assert getattr(sci._pull_and_store_message, "_florist_flushes", False)
    assert ft.flush_waiting_replies(sci._pull_and_store_message) is sci._pull_and_store_message


@pytest.fixture
def node_state(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A SuperNode's own state (flwr's InMemoryNodeState), with a task identity for Messages."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    for name, value in (("_run_id", 42), ("_node_id", 5), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    return InMemoryNodeState(ObjectStoreFactory().store())


def _stored(state: Any, message: Message) -> Message:
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperNode does
    state.store_message(message)
    return message


def test_a_reply_left_waiting_is_sent_at_the_next_idle_poll(node_state: Any) -> None:
    # Prepare: a message the loop gave up on (its run stopped mid-pull) and, later, its reply.
    from flwr.app import MessageType, RecordDict

    message = _stored(
        node_state, Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    )
    pulls: list[dict[str, Any]] = []

    def idle_pull(**kwargs: Any) -> int | None:
        pulls.append(kwargs)
        return None  # no new message, as on every idle poll

    pull = ft.flush_waiting_replies(idle_pull)
    assert pull(state=node_state, receive=None) is None  # nothing waits yet: stay idle
    reply = _stored(node_state, Message(RecordDict(), reply_to=message))

    # Execute
    run_id = pull(state=node_state, receive=None)

    # Assert: the loop is told to push, and the reply is still there for its push stage to take.
    assert run_id == 42 and len(pulls) == 2 and pulls[-1]["receive"] is None
    (taken,) = node_state.get_messages(is_reply=True)
    assert taken.metadata.message_id == reply.metadata.message_id
    assert pull(state=node_state, receive=None) is None  # once taken, the node is idle again


def test_a_pulled_message_passes_through_the_flush() -> None:
    assert ft.flush_waiting_replies(lambda **kwargs: 7)(state=object()) == 7
    assert ft.waiting_reply_run(object()) is None  # not flwr 1.39's state: no peeking
