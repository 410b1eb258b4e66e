"""GET /nodes: the SuperNodes, as the SuperLink lists them now and as Florist recorded them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from fastapi import APIRouter, Query

from florist.server.api.deps import (
    PAGE_LIMIT_DEFAULT,
    FollowerDep,
    PageCursor,
    PageLimit,
    SessionDep,
)
from florist.server.api.schemas import NodePublic, NodesPublic
from florist.server.control import SuperLinkNode, SuperLinkUnavailable
from florist.server.db import repository as repo
from florist.server.db.models import Node, utcnow
from florist.server.follower import RunFollower

log = logging.getLogger(__name__)

router = APIRouter(prefix="/nodes", tags=["nodes"])

# Connected first, then those that may come back, then those that left.
_STATUS_ORDER = {"online": 0, "registered": 1, "offline": 1, None: 2, "unregistered": 3}


def superlink_nodes(follower: RunFollower | None) -> tuple[Sequence[SuperLinkNode] | None, str]:
    """The SuperLink's node list and how asking went (the words of ``GET /healthz``)."""
    if follower is None:
        return None, "not configured"
    try:
        return follower.control.list_nodes(), "ok"
    except SuperLinkUnavailable as exc:
        return None, f"unreachable: {exc}"
    except Exception as exc:  # report, don't fail: Florist's own records are still worth a page
        log.warning("listing the SuperLink's nodes failed: %s", exc)
        return None, f"error: {exc}"


def merge_nodes(
    recorded: Sequence[Node],
    listed: Sequence[SuperLinkNode] | None,
    *,
    now: datetime,
    stale_after_s: float,
) -> list[NodePublic]:
    """One row per node: every node Florist recorded, with the SuperLink's status of it, and
    every other node the SuperLink has that has not left (one that joined and left without
    taking part in a round is noise: an insecure SuperNode gets a new id at every start).

    ``listed`` is None when the SuperLink could not be asked: then only the records are there,
    with no status. Connected nodes come first; otherwise Florist's order, then the SuperLink's.
    """
    live = {node.node_id: node for node in listed or ()}
    rows: list[NodePublic] = []
    for node in recorded:
        age = max(0.0, (now - node.last_seen).total_seconds())
        rows.append(
            _with_superlink(
                NodePublic(
                    node_id=str(node.node_id),
                    node_config=dict(node.node_config or {}),
                    first_seen=node.first_seen,
                    last_seen=node.last_seen,
                    seconds_since_seen=age,
                    stale=age > stale_after_s,
                ),
                live.pop(node.node_id, None),
            )
        )
    for info in sorted(live.values(), key=lambda n: (n.registered_at or now, n.node_id)):
        if info.status != "unregistered":
            rows.append(
                _with_superlink(
                    NodePublic(node_id=str(info.node_id), node_config={}, stale=False), info
                )
            )
    return sorted(rows, key=lambda row: _STATUS_ORDER.get(row.status, 2))


def _with_superlink(row: NodePublic, info: SuperLinkNode | None) -> NodePublic:
    if info is None:
        return row
    return row.model_copy(
        update={
            "status": info.status,
            "registered_at": info.registered_at,
            "connected_at": info.last_activated_at,
            "disconnected_at": info.last_deactivated_at or info.unregistered_at,
            "online_until": info.online_until,
        }
    )


@router.get("", response_model=NodesPublic)
def list_nodes(
    session: SessionDep,
    follower: FollowerDep,
    stale_after_s: float = Query(
        120.0,
        gt=0,
        le=10**9,
        description="A node not seen in a round for longer than this is stale.",
    ),
    limit: PageLimit = PAGE_LIMIT_DEFAULT,
    cursor: PageCursor = None,
) -> NodesPublic:
    """The nodes, connected first, one page at a time. The listing merges the SuperLink's live
    view into Florist's records, so its cursor is a position in that order, not a row id."""
    listed, superlink = superlink_nodes(follower)
    rows = merge_nodes(repo.list_nodes(session), listed, now=utcnow(), stale_after_s=stale_after_s)
    start = cursor or 0
    end = start + limit
    return NodesPublic(
        data=rows[start:end],
        count=len(rows),
        next_cursor=end if end < len(rows) else None,
        stale_after_s=stale_after_s,
        superlink=superlink,
    )
