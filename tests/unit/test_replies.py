"""Which grids have their replies pulled one at a time, and what the others get instead.

The deferred pull itself runs against a real SuperLink in every deployment test
(tests/integration: each run's ServerApp pulls through flwr's HttpGrid); its effect on memory
is benchmarks/cost_growth.py's.
"""

from __future__ import annotations

import flwr
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from florist.client.flower_tuning import TUNED_FLWR_VERSION
from florist.server.runtime.localgrid import LocalGrid
from florist.server.runtime.replies import DEFER_ENV, PulledReply, deferrable, pull_replies


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def http_grid() -> HttpGrid:
    # Not connected: deciding whether to defer must not touch the network.
    return HttpGrid.__new__(HttpGrid)


def test_flowers_http_grid_of_the_known_version_is_deferred() -> None:
    assert deferrable(http_grid(), env={})
    assert not deferrable(http_grid(), env={DEFER_ENV: "0"})
    assert not deferrable(LocalGrid(1), env={})


def test_another_flwr_version_is_left_to_flowers_own_pull() -> None:
    assert flwr.__version__ == TUNED_FLWR_VERSION  # else this test says nothing
    assert deferrable(http_grid(), env={}, version=TUNED_FLWR_VERSION)
    assert not deferrable(http_grid(), env={}, version="1.40.0")


def test_a_subclass_is_not_taken_for_flowers_grid() -> None:
    # Its pull may do more than flwr's; only the class whose internals are known is taken apart.
    class Wrapped(HttpGrid):
        pass

    assert not deferrable(Wrapped.__new__(Wrapped), env={})


def test_other_grids_give_whole_replies_keyed_by_the_task_they_answer() -> None:
    grid = LocalGrid(2)
    sent = [
        Message(
            content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in grid.node_ids
    ]
    ids = list(grid.push_messages(sent))
    pulled = pull_replies(grid, [*ids, "never-sent"])
    assert sorted(r.reply_to for r in pulled) == sorted(ids)
    assert all(r.loaded for r in pulled)
    assert {r.message().metadata.reply_to_message_id for r in pulled} == set(ids)
    assert pull_replies(grid, ids) == []  # taken: a second pull finds nothing
    assert pull_replies(grid, []) == []


def test_a_whole_reply_is_the_same_message_every_time() -> None:
    message = Message(
        content=RecordDict({"config": ConfigRecord({"x": 1})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    reply = PulledReply.of(message)
    assert reply.message() is message and reply.message() is message
