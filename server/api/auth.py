"""Who may call what: one rule table; tokens, session cookies, CSRF, Origin and Host checks."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio.to_thread
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Receive, Scope, Send

from florist.server.api.errors import ErrorPublic, error_responses
from florist.server.settings import Settings, is_loopback
from florist.server.tokens import (
    Principal,
    Role,
    close_session,
    csrf_for,
    open_session,
    verify_session,
    verify_token,
)

log = logging.getLogger(__name__)

SESSION_COOKIE = "florist_session"
CSRF_COOKIE = "florist_csrf"
CSRF_HEADER = "X-CSRF-Token"
READS = frozenset({"GET", "HEAD"})
OPEN_PRINCIPAL = Principal(token_id=None, name="open mode", role=Role.ADMIN)


@dataclass(frozen=True)
class Rule:
    """Requests to ``prefix`` (the path itself or below it) with one of ``methods`` (None: any)
    need ``role`` (None: no login)."""

    prefix: str
    methods: frozenset[str] | None
    role: Role | None

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        base = self.prefix.rstrip("/")
        return path == base or path.startswith(base + "/")


# The first rule that matches decides. Every API route is covered by a prefix, so a route added
# later (the node keys) is guarded from the day it lands.
RULES: tuple[Rule, ...] = (
    Rule("/api/v1/healthz", READS, None),
    # Log in, log out, who am I: these routes check the token or cookie themselves.
    Rule("/api/v1/session", None, None),
    Rule("/api/v1/tokens", None, Role.ADMIN),
    Rule("/api/v1/node-keys", None, Role.ADMIN),
    Rule("/api", READS, Role.READER),  # dashboard data, rounds, SSE streams, the model
    Rule("/api", None, Role.OPERATOR),  # submit, cancel, resume: every other write
    Rule("/metrics", READS, Role.READER),
    Rule("/openapi.json", READS, Role.READER),
    Rule("/docs", READS, Role.READER),
    Rule("/redoc", READS, Role.READER),
    # The dashboard's pages, the login page and static files: they hold no data.
    Rule("/", READS, None),
    Rule("/", None, Role.OPERATOR),
)


def required_role(method: str, path: str) -> Role | None:
    """The role a request needs (None: none), by the first rule that matches it."""
    for rule in RULES:
        if rule.matches(method, path):
            return rule.role
    return Role.ADMIN  # unreachable while the last rule matches everything; deny if it goes


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8080`` → ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    """Loopback names, the address the API binds and FLORIST_ALLOWED_HOSTS: any other Host is a
    page of another site whose name now resolves here (DNS rebinding), or a misdirected one."""
    if not host_header:
        return False
    if "*" in settings.allowed_hosts:
        return True
    name = host_name(host_header)
    allowed = {host_name(h) for h in settings.allowed_hosts}
    if not is_loopback(settings.api_host) and settings.api_host not in ("0.0.0.0", "::"):
        allowed.add(host_name(settings.api_host))
    return is_loopback(name) or name in allowed


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def origin_allowed(request: Request, settings: Settings) -> bool:
    """A write from a browser must come from the API's own pages or a configured origin. Its
    Origin says where it comes from (Referer when there is none); a client that sends neither
    is not a browser (the CLI, curl) and cannot be driven by another site."""
    origin = request.headers.get("origin")
    if origin is None and (referer := request.headers.get("referer")):
        origin = origin_of(referer)
    if origin is None:
        return True
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    return origin.lower() in {own, *(o.rstrip("/").lower() for o in settings.cors_origins)}


def _refusal(code: int, detail: str, *, bad_token: bool = False) -> JSONResponse:
    headers = {}
    if code == status.HTTP_401_UNAUTHORIZED:
        challenge = 'Bearer realm="florist"'
        headers["WWW-Authenticate"] = challenge + (', error="invalid_token"' if bad_token else "")
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


@dataclass(frozen=True)
class Identity:
    """What a request's credentials say: who (None: no credentials), or why they are refused."""

    principal: Principal | None = None
    problem: str | None = None
    by_cookie: bool = False


def identify(request: Request, db: Session) -> Identity:
    """The bearer token, else the session cookie (its CSRF header checked on a write)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        row = verify_token(db, token.strip())
        if row is None:
            return Identity(problem="the token is unknown, revoked or expired")
        return Identity(Principal(row.id, row.name, Role.parse(row.role)))
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return Identity()
    found = verify_session(db, cookie)
    if found is None:
        return Identity(problem="the session has ended (logged out, expired or its token revoked)")
    session_row, row = found
    principal = Principal(row.id, row.name, Role.parse(row.role), session_row.id)
    if request.method not in READS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_for(cookie).encode()):
            return Identity(principal, problem="csrf", by_cookie=True)
    return Identity(principal, by_cookie=True)


class AuthMiddleware:
    """Host, then Origin on writes, then the rule table: 400, 403, 401 or 403, or the request
    goes on with ``request.state.principal`` set."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.mode = settings.auth_mode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = await self.check(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def check(self, request: Request) -> Response | None:
        method, path = request.method, request.url.path
        if not host_allowed(request.headers.get("host"), self.settings):
            return _refusal(
                status.HTTP_400_BAD_REQUEST,
                "this API does not answer to that Host; add it to FLORIST_ALLOWED_HOSTS",
            )
        if method not in READS and not origin_allowed(request, self.settings):
            return _refusal(
                status.HTTP_403_FORBIDDEN,
                "cross-origin request refused: writes come from the API's own pages or an "
                "origin in FLORIST_CORS_ORIGINS",
            )
        role = required_role(method, path)
        if role is None:
            return None
        if self.mode == "open":
            request.state.principal = OPEN_PRINCIPAL
            return None
        sessions: sessionmaker[Session] = request.app.state.sessions

        def lookup() -> Identity:
            with sessions() as db:
                return identify(request, db)

        # The database is synchronous: look up in a worker thread, never on the event loop.
        identity = await anyio.to_thread.run_sync(lookup)
        if identity.problem == "csrf":
            return _refusal(
                status.HTTP_403_FORBIDDEN,
                f"missing or wrong {CSRF_HEADER} header: a write with the session cookie must "
                "carry the value of the florist_csrf cookie",
            )
        if identity.problem is not None:
            return _refusal(status.HTTP_401_UNAUTHORIZED, identity.problem, bad_token=True)
        if identity.principal is None:
            return _refusal(
                status.HTTP_401_UNAUTHORIZED,
                "log in: send `Authorization: Bearer <token>` (`florist token create`), or log "
                "in to the dashboard at /login",
            )
        if identity.principal.role < role:
            return _refusal(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {role.label} role; token {identity.principal.token_id} "
                f"({identity.principal.name}) is a {identity.principal.role.label}",
            )
        request.state.principal = identity.principal
        return None


# --- the dashboard's login: POST/GET/DELETE /api/v1/session -----------------------------------


class LoginBody(BaseModel):
    """An API token, to exchange for a session cookie."""

    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=200)


class SessionPublic(BaseModel):
    """The API's mode and who this request is."""

    mode: Literal["on", "open"] = Field(description="`open`: no login; every request may write.")
    authenticated: bool
    token_id: str | None = None
    name: str | None = None
    role: str = Field(
        description="What this request may do: `reader`, `operator` or `admin` (open mode)."
    )
    expires_at: datetime | None = None


_LOGIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **error_responses(400),
    401: {"model": ErrorPublic, "description": "Unknown, revoked or expired token."},
    403: {"model": ErrorPublic, "description": "A cross-origin request."},
}
router = APIRouter(prefix="/api/v1/session", tags=["session"])


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _with_db(request: Request, work: Callable[[Session], Any]) -> Any:
    with request.app.state.sessions() as db:
        return work(db)


@router.get("", response_model=SessionPublic)
def who_am_i(request: Request) -> SessionPublic:
    """The API's mode and, with a token or session cookie, whose they are."""
    if _settings(request).auth_mode() == "open":
        return SessionPublic(mode="open", authenticated=False, role="admin")
    identity: Identity = _with_db(request, lambda db: identify(request, db))
    p = identity.principal
    if p is None or identity.problem not in (None, "csrf"):
        return SessionPublic(mode="on", authenticated=False, role="reader")
    return SessionPublic(
        mode="on", authenticated=True, token_id=p.token_id, name=p.name, role=p.role.label
    )


@router.post("", response_model=SessionPublic, responses=_LOGIN_ERRORS)
def log_in(body: LoginBody, request: Request, response: Response) -> SessionPublic:
    """Exchange a token for an HttpOnly session cookie (and the CSRF cookie the page echoes)."""
    settings = _settings(request)

    def work(db: Session) -> tuple[SessionPublic, str] | None:
        row = verify_token(db, body.token.strip())
        if row is None:
            return None
        session_row, secret = open_session(db, row, timedelta(seconds=settings.session_ttl_s))
        db.commit()
        public = SessionPublic(
            mode=settings.auth_mode(),
            authenticated=True,
            token_id=row.id,
            name=row.name,
            role=Role.parse(row.role).label,
            expires_at=session_row.expires_at,
        )
        return public, secret

    done = _with_db(request, work)
    if done is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "unknown, revoked or expired token",
            headers={"WWW-Authenticate": 'Bearer realm="florist", error="invalid_token"'},
        )
    public, secret = done
    secure = request.url.scheme == "https"
    max_age = int(settings.session_ttl_s)
    response.set_cookie(
        SESSION_COOKIE, secret, max_age=max_age, httponly=True, samesite="strict", secure=secure
    )
    response.set_cookie(
        CSRF_COOKIE, csrf_for(secret), max_age=max_age, samesite="strict", secure=secure
    )
    return public


@router.delete("", status_code=status.HTTP_204_NO_CONTENT, responses=_LOGIN_ERRORS)
def log_out(request: Request) -> Response:
    """End this session (its row is deleted) and clear its cookies."""
    if cookie := request.cookies.get(SESSION_COOKIE):

        def work(db: Session) -> None:
            close_session(db, cookie)
            db.commit()

        _with_db(request, work)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, samesite="strict", httponly=name == SESSION_COOKIE)
    return response


async def _login_page() -> FileResponse:
    from florist.server.dashboard import STATIC_DIR

    return FileResponse(
        STATIC_DIR / "login.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
    )


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Guard every route of ``app`` by the rule table, and serve the login routes and page.

    Raises ValueError if the settings are unsafe to serve with (``Settings.security_problems``).
    """
    if problems := settings.security_problems():
        raise ValueError("; ".join(problems))
    if settings.auth_mode() == "open" and not settings.is_local():
        log.warning(
            "API AUTH IS OPEN on %s (FLORIST_AUTH_FORCE_OPEN): anyone who can reach it may "
            "submit, cancel and resume experiments",
            settings.api_host,
        )
    app.include_router(router)
    app.add_api_route("/login", _login_page, methods=["GET"], include_in_schema=False)
    app.add_middleware(AuthMiddleware, settings=settings)


def allow_cors(app: FastAPI, settings: Settings) -> None:
    """CORS for FLORIST_CORS_ORIGINS only (none by default); outermost, so a preflight is
    answered before any login is asked for."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", CSRF_HEADER],
        )
