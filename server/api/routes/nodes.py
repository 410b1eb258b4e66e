"""GET /nodes: the SuperNodes the server has heard from, with their node config and health."""

from __future__ import annotations

from fastapi import APIRouter, Query

from florist.server.api.deps import SessionDep
from florist.server.api.schemas import NodePublic, NodesPublic
from florist.server.db import repository as repo
from florist.server.db.models import utcnow

router = APIRouter(prefix="/nodes", tags=["nodes"])


@router.get("", response_model=NodesPublic)
def list_nodes(
    session: SessionDep,
    stale_after_s: float = Query(
        120.0, gt=0, description="A node not seen for longer than this is reported stale."
    ),
) -> NodesPublic:
    now = utcnow()
    data = []
    for node in repo.list_nodes(session):
        age = max(0.0, (now - node.last_seen).total_seconds())
        data.append(
            NodePublic(
                node_id=str(node.node_id),
                node_config=dict(node.node_config or {}),
                first_seen=node.first_seen,
                last_seen=node.last_seen,
                seconds_since_seen=age,
                stale=age > stale_after_s,
            )
        )
    return NodesPublic(data=data, count=len(data), stale_after_s=stale_after_s)
