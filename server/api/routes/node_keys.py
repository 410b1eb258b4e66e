"""/node-keys: the SuperNode public keys the SuperLink admits (Flower's SuperNode authentication).

Florist keeps the keys (name, fingerprint, when added); the SuperLink is told through its
Control API (``RegisterNode``/``UnregisterNode``, what ``flwr supernode register`` calls), so
the two agree: a key is stored only once the SuperLink has it, and removed only once the
SuperLink no longer does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status
from sqlalchemy import select

from florist.server.api.deps import DB_INT_MAX, FollowerDep, SessionDep, SettingsDep
from florist.server.api.errors import ErrorPublic, error_responses
from florist.server.api.routes.nodes import superlink_nodes
from florist.server.api.schemas import NodeKeyCreate, NodeKeyNode, NodeKeyPublic, NodeKeysPublic
from florist.server.certs import parse_node_public_key
from florist.server.control import (
    ControlClient,
    SuperLinkNode,
    SuperLinkRefused,
    SuperLinkUnavailable,
)
from florist.server.db.models import NodeKey
from florist.server.follower import RunFollower

log = logging.getLogger(__name__)

router = APIRouter(prefix="/node-keys", tags=["node-keys"])

_UNAVAILABLE = {"model": ErrorPublic, "description": "The SuperLink is unreachable or not set."}
_ADD_RESPONSES = error_responses(400) | {
    409: {
        "model": ErrorPublic,
        "description": "The key is registered already (here or at the SuperLink).",
    },
    503: _UNAVAILABLE,
}
_REMOVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic, "description": "No such key."},
    503: _UNAVAILABLE,
}

KeyId = Annotated[int, Path(ge=0, le=DB_INT_MAX, description="The key's id (404 if none).")]


def _control(follower: RunFollower | None) -> ControlClient:
    if follower is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no SuperLink is configured")
    return follower.control


def _public(row: NodeKey, info: SuperLinkNode | None) -> NodeKeyPublic:
    node = None
    if info is not None:
        node = NodeKeyNode(
            status=info.status,
            connected_at=info.last_activated_at,
            disconnected_at=info.last_deactivated_at or info.unregistered_at,
        )
    return NodeKeyPublic(
        id=row.id,
        name=row.name,
        fingerprint=row.fingerprint,
        public_key=row.public_key,
        node_id=str(row.node_id),
        added_at=row.added_at,
        node=node,
    )


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=NodeKeyPublic, responses=_ADD_RESPONSES
)
def add_node_key(body: NodeKeyCreate, session: SessionDep, follower: FollowerDep) -> NodeKeyPublic:
    """Register a SuperNode's public key with the SuperLink and keep it. A key Flower would not
    take is a 422 naming ``public_key``; one already registered a 409; nothing is stored
    unless the SuperLink took it."""
    key = parse_node_public_key(body.public_key)
    taken = session.scalar(select(NodeKey).where(NodeKey.fingerprint == key.fingerprint))
    if taken is not None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"this key is registered already, as {taken.name!r}"
        )
    control = _control(follower)
    try:
        node_id = control.register_node(key.pem, name=body.name)
    except SuperLinkRefused as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, exc.detail) from None
    except SuperLinkUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    row = NodeKey(name=body.name, fingerprint=key.fingerprint, public_key=key.openssh)
    row.node_id = node_id
    session.add(row)
    try:
        session.commit()
    except Exception:
        # The SuperLink must not admit a key Florist does not list.
        session.rollback()
        control.unregister_node(node_id)
        raise
    log.info("node key %s (%s) registered as node %s", row.name, row.fingerprint, node_id)
    return _public(row, None).model_copy(update={"node": NodeKeyNode(status="registered")})


@router.get("", response_model=NodeKeysPublic)
def list_node_keys(
    session: SessionDep, follower: FollowerDep, settings: SettingsDep
) -> NodeKeysPublic:
    """Every registered key, oldest first, with the node that connects with it now."""
    rows = session.scalars(select(NodeKey).order_by(NodeKey.id)).all()
    listed, superlink = superlink_nodes(follower)
    by_key = {info.public_key: info for info in listed or ()}
    data = [_public(row, by_key.get(parse_node_public_key(row.public_key).pem)) for row in rows]
    return NodeKeysPublic(
        data=data, count=len(data), supernode_auth=settings.supernode_auth, superlink=superlink
    )


@router.delete("/{key_id}", response_model=NodeKeyPublic, responses=_REMOVE_RESPONSES)
def remove_node_key(key_id: KeyId, session: SessionDep, follower: FollowerDep) -> NodeKeyPublic:
    """Unregister the key at the SuperLink (its node is refused from then on), then forget it."""
    row = session.get(NodeKey, key_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no node key {key_id}")
    try:
        _control(follower).unregister_node(row.node_id)
    except SuperLinkRefused as exc:
        # The SuperLink no longer knows the node (its state was reset): nothing to undo there.
        log.warning("node key %s: the SuperLink did not know node %s: %s", key_id, row.node_id, exc)
    except SuperLinkUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    removed = _public(row, None)
    session.delete(row)
    session.commit()
    log.info("node key %s (%s) unregistered", removed.name, removed.fingerprint)
    return removed
