"""Replies pulled whole only when handled, so that a poll's replies are not all in memory at once.

flwr 1.39's ``HttpGrid.pull_messages`` pulls and inflates every reply it was asked about before
returning the first: with N nodes answering in one poll, N models sit in the ServerApp at once
(benchmarks/cost_growth.py: 842 MiB with one node, 1,004 MiB with five, at 10 M parameters).
:func:`pull_replies` makes the same requests in another order. One ``PullMessages`` call
returns the replies' metadata and object trees, small, as before. The objects of each reply are
then pulled, its receipt confirmed and the reply inflated when the loop takes it
(:meth:`PulledReply.message`), after the one before has been handled and dropped.

Only the ``HttpGrid`` of the flwr version client/flower_tuning.py is written for is read this
way (its internals are the only ones known); any other grid or version gets its replies from
``grid.pull_messages``, all at once, as before. ``FLORIST_DEFER_REPLIES=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from flwr.app import Message
from flwr.superlink.grid.http_grid import HttpGrid

from florist.client.flower_tuning import version_supported

log = logging.getLogger(__name__)

DEFER_ENV = "FLORIST_DEFER_REPLIES"


class PulledReply:
    """A reply the SuperLink handed over: its metadata now, the whole message on demand."""

    def __init__(
        self,
        *,
        reply_to: str,
        message: Message | None = None,
        grid: Any = None,
        proto: Any = None,
        tree: Any = None,
    ) -> None:
        self.reply_to = reply_to
        self._message = message
        self._pending = None if message is not None else (grid, proto, tree)

    @classmethod
    def of(cls, message: Message) -> PulledReply:
        """A reply already whole."""
        return cls(reply_to=message.metadata.reply_to_message_id, message=message)

    @property
    def loaded(self) -> bool:
        return self._message is not None

    def message(self) -> Message:
        """The reply, pulled and inflated the first time it is asked for."""
        if self._message is None:
            assert self._pending is not None
            grid, proto, tree = self._pending
            self._message = _inflate(grid, proto, tree)
            self._pending = None  # the objects are the SuperLink's to drop now
        return self._message


@cache
def _installed_flwr_known() -> bool:
    # Asked every poll: checked (and, for another version, warned about) once per process.
    return version_supported()


def deferrable(
    grid: object, env: Mapping[str, str] | None = None, *, version: str | None = None
) -> bool:
    """Whether ``grid`` is the one HttpGrid whose pull can be taken apart here (``version``:
    the flwr version to judge by, the installed one if None)."""
    if (os.environ if env is None else env).get(DEFER_ENV, "1") == "0":
        return False
    known = _installed_flwr_known() if version is None else version_supported(version)
    return known and type(grid) is HttpGrid


def pull_replies(grid: Any, message_ids: Iterable[str]) -> list[PulledReply]:
    """The replies to ``message_ids`` that have arrived, each pulled whole only when asked."""
    ids = list(message_ids)
    if not ids:
        return []
    if not deferrable(grid):
        return [PulledReply.of(m) for m in grid.pull_messages(ids)]
    import httpx
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest

    try:
        res = grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=ids))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != httpx.codes.REQUEST_ENTITY_TOO_LARGE:
            raise
        # As flwr's own pull: the answer was too large to take; these replies come again.
        log.error("the SuperLink's answer to a reply pull was too large (%s)", exc)
        return []
    return [
        PulledReply(
            reply_to=proto.metadata.reply_to_message_id,
            grid=grid,
            proto=proto,
            tree=tree,
        )
        for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True)
    ]


def _inflate(grid: Any, proto: Any, tree: Any) -> Message:
    """One reply's objects pulled, its receipt confirmed, the message rebuilt (flwr 1.39)."""
    from flwr.app import Metadata
    from flwr.app.error import Error
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        inflate_object_from_contents,
        pull_objects,
    )

    client, node, run_id = grid._runtime_client, grid.node, grid._run.run_id
    msg_id = proto.metadata.message_id
    try:
        contents = pull_objects(
            object_ids=[t.object_id for t in iterate_object_tree(tree)],
            pull_object_fn=make_pull_object_fn_protobuf(
                pull_object_protobuf=client.PullObject, node=node, run_id=run_id
            ),
        )
    except ObjectPullError as exc:
        # What flwr's own pull answers: an error reply to the same task, so the loop records
        # the task as failed and the run goes on.
        return make_message(
            metadata=Metadata(
                run_id=run_id,
                message_id="",
                src_node_id=node.node_id,
                dst_node_id=node.node_id,
                message_type=SYSTEM_MESSAGE_TYPE,
                group_id="",
                ttl=0,
                reply_to_message_id=proto.metadata.reply_to_message_id,
                created_at=now().timestamp(),
            ),
            error=Error(
                code=ErrorCode.MESSAGE_UNAVAILABLE,
                reason=f"the reply's objects could not be pulled from the SuperLink: {exc}",
            ),
        )
    client.ConfirmMessageReceived(
        ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=msg_id)
    )
    message = inflate_object_from_contents(msg_id, contents)
    assert isinstance(message, Message)
    message.metadata.__dict__["_message_id"] = msg_id  # as flwr's pull: the id it was stored under
    return message
