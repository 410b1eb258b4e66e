"""GET /healthz: is the database reachable, is the SuperLink."""

from fastapi import APIRouter
from sqlalchemy import text

from florist.server.api.deps import FollowerDep, SessionDep
from florist.server.api.schemas import Health
from florist.server.control import SuperLinkUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(session: SessionDep, follower: FollowerDep) -> Health:
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # report, don't crash: this endpoint exists to say what is wrong
        database = f"error: {exc}"
    superlink = "not configured"
    if follower is not None:
        try:
            follower.control.run_state(0)
            superlink = "ok"
        except SuperLinkUnavailable as exc:
            superlink = f"unreachable: {exc}"
        except Exception as exc:
            superlink = f"error: {exc}"
    status = "ok" if database == "ok" and superlink in ("ok", "not configured") else "degraded"
    return Health(status=status, database=database, superlink=superlink)
