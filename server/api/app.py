"""The FastAPI application factory: REST API under /api/v1, the dashboard at /."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from florist.server.api.auth import allow_cors, install_auth
from florist.server.api.errors import http_exception_handler, validation_exception_handler
from florist.server.api.routes import api_router
from florist.server.control import ControlClient
from florist.server.db.engine import make_engine, make_session_factory, upgrade_database
from florist.server.follower import RunFollower
from florist.server.logs import ExperimentLogContext
from florist.server.observability import instrument
from florist.server.settings import Settings, get_settings
from florist.server.simulation import control_for
from florist.server.tokens import Role, ensure_token

log = logging.getLogger(__name__)


def _register_admin_token(sessions: sessionmaker[Session], settings: Settings) -> None:
    """FLORIST_ADMIN_TOKEN, registered once (a deployment's first token); a token whose id is
    known with another secret stops the start: two secrets for one id is a misconfiguration."""
    token = settings.admin_token.get_secret_value()
    if not token:
        return
    with sessions.begin() as session:
        row, added = ensure_token(session, token, name="admin-token", role=Role.ADMIN)
        state = "revoked" if row.revoked_at is not None else row.role
    if added:
        log.info("admin token %s registered from FLORIST_ADMIN_TOKEN", row.id)
    else:
        log.info("admin token %s from FLORIST_ADMIN_TOKEN is known (%s)", row.id, state)


def create_app(
    settings: Settings | None = None,
    *,
    follow_runs: bool = True,
    control_factory: Callable[[], ControlClient] | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the app. ``follow_runs=False`` serves the API without talking to a SuperLink;
    ``freeze_heap`` (a serving process, not a test): what start-up made is left out of the
    garbage collector's full passes."""
    settings = settings or get_settings()
    url = settings.resolved_database_url()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade_database(url)
        engine = make_engine(url)
        app.state.settings = settings
        app.state.sessions = make_session_factory(engine)
        app.state.follower = None
        app.state.open_streams = 0
        _register_admin_token(app.state.sessions, settings)
        if follow_runs:
            factory = control_factory or (lambda: control_for(settings))
            app.state.follower = RunFollower(
                app.state.sessions,
                factory,
                database_url=url,
                interval=settings.status_poll_s,
                auto_resume=settings.auto_resume,
            )
            app.state.follower.start()
        if freeze_heap:
            # Start-up leaves ~300,000 long-lived objects (torch, SQLAlchemy, FastAPI). A full
            # collection walked them all: 170–240 ms, every dozen requests of 1,000-row pages,
            # which set the p99 of every endpoint (docs/benchmarks.md; 10–14 ms once frozen).
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if app.state.follower is not None:
                app.state.follower.stop()
            engine.dispose()

    app = FastAPI(
        title="Florist",
        version="0.1.0",
        summary="Federated learning on Flower: submit experiments, follow every round.",
        lifespan=lifespan,
    )
    install_auth(app, settings)  # inside the metrics middleware: refusals are counted too
    # Request metrics and /metrics first: a route added later is measured all the same.
    instrument(app, settings)
    app.add_middleware(ExperimentLogContext)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.include_router(api_router)
    from florist.server.dashboard import mount_dashboard

    mount_dashboard(app)
    allow_cors(app, settings)
    return app
