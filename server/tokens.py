"""API tokens and dashboard sessions: made, checked, listed and revoked on the database."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from florist.server.db.models import ApiSession, ApiToken, utcnow
from florist.server.settings import TOKEN_FORM

PREFIX = "florist"
# last_used_at is written at most this often per token: reads stay reads.
_TOUCH_EVERY = timedelta(seconds=60)


class Role(IntEnum):
    """What a token may do; a higher role may do all that a lower one may."""

    READER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            known = ", ".join(r.label for r in cls)
            raise ValueError(f"unknown role {text!r}; known: {known}") from None


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token's id, name and role (``token_id`` None in open mode)."""

    token_id: str | None
    name: str
    role: Role
    session_id: str | None = None


def sha256_hex(secret: str) -> str:
    """The stored form of a secret: tokens and session cookies are random 256-bit strings, so
    a plain SHA-256 is enough (no password to slow a guess down for)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_token() -> str:
    """A new token string, stored nowhere: ``create_token`` stores it at once; a deployment keeps
    it in a secret store for the API to register at start (``ensure_token``)."""
    return f"{PREFIX}_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def _add_token(
    session: Session,
    token_id: str,
    secret: str,
    *,
    name: str,
    role: Role,
    expires_at: datetime | None = None,
) -> ApiToken:
    row = ApiToken(
        id=token_id,
        name=name,
        role=role.label,
        secret_sha256=sha256_hex(secret),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row


def create_token(
    session: Session, *, name: str, role: Role, expires_in: timedelta | None = None
) -> tuple[ApiToken, str]:
    """A new token row and the token string, which exists nowhere else: show it once."""
    token = generate_token()
    parsed = _parse(token)
    assert parsed is not None  # generate_token makes the form _parse reads
    expires_at = utcnow() + expires_in if expires_in else None
    return _add_token(session, *parsed, name=name, role=role, expires_at=expires_at), token


class TokenConflict(ValueError):
    """A token to register carries the id of a known token with another secret."""


def ensure_token(session: Session, token: str, *, name: str, role: Role) -> tuple[ApiToken, bool]:
    """Register ``token`` (made by ``generate_token``) unless its id is known; return its row and
    whether it was added. A known id keeps its row as it is, revoked included: restarting with
    the same secret never brings a revoked token back."""
    parsed = _parse(token)
    if parsed is None or not TOKEN_FORM.fullmatch(token):
        raise ValueError("not a Florist token (florist_<12 hex digits>_<secret>)")
    token_id, secret = parsed
    row = session.get(ApiToken, token_id)
    if row is not None:
        if not hmac.compare_digest(row.secret_sha256, sha256_hex(secret)):
            raise TokenConflict(f"token id {token_id} is registered with another secret")
        return row, False
    return _add_token(session, token_id, secret, name=name, role=role), True


def _parse(token: str) -> tuple[str, str] | None:
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or len(token_id) != 12 or not secret:
        return None
    return token_id, secret


def _usable(row: ApiToken | None, now: datetime) -> bool:
    return (
        row is not None
        and row.revoked_at is None
        and (row.expires_at is None or row.expires_at > now)
    )


def verify_token(session: Session, token: str) -> ApiToken | None:
    """The token's row if it is known, unrevoked and unexpired; else None. The lookup is by the
    id the token carries; the secret is compared in constant time."""
    parsed = _parse(token)
    if parsed is None:
        return None
    token_id, secret = parsed
    row = session.get(ApiToken, token_id)
    now = utcnow()
    if not _usable(row, now) or row is None:
        return None
    if not hmac.compare_digest(row.secret_sha256, sha256_hex(secret)):
        return None
    if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY:
        row.last_used_at = now
        session.commit()
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)))


def revoke_token(session: Session, token_id: str) -> ApiToken | None:
    """Revoke a token and end its dashboard sessions; None if there is no such token."""
    row = session.get(ApiToken, token_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.execute(delete(ApiSession).where(ApiSession.token_id == token_id))
    session.flush()
    return row


def csrf_for(session_secret: str) -> str:
    """The session's CSRF value: derived from the cookie's secret, so a page that cannot read
    the HttpOnly cookie can only learn it from the readable CSRF cookie of the same login."""
    return hmac.new(session_secret.encode(), b"florist-csrf", hashlib.sha256).hexdigest()


def open_session(session: Session, token: ApiToken, ttl: timedelta) -> tuple[ApiSession, str]:
    """A dashboard session for a verified token, and the cookie's secret (shown once)."""
    secret = secrets.token_urlsafe(32)
    row = ApiSession(id=sha256_hex(secret), token_id=token.id, expires_at=utcnow() + ttl)
    session.add(row)
    # Expired sessions go when a new one comes: the table never grows without bound.
    session.execute(delete(ApiSession).where(ApiSession.expires_at <= utcnow()))
    session.flush()
    return row, secret


def verify_session(session: Session, secret: str) -> tuple[ApiSession, ApiToken] | None:
    """The session and its token, if the session has not ended and its token is still good."""
    row = session.get(ApiSession, sha256_hex(secret))
    now = utcnow()
    if row is None or row.expires_at <= now:
        return None
    token = session.get(ApiToken, row.token_id)
    if not _usable(token, now) or token is None:
        return None
    return row, token


def close_session(session: Session, secret: str) -> None:
    session.execute(delete(ApiSession).where(ApiSession.id == sha256_hex(secret)))
    session.flush()
