"""`florist token create/generate/list/revoke`: API tokens, made directly on the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.orm import Session

from florist.server.settings import Settings, get_settings
from florist.server.tokens import (
    Role,
    create_token,
    generate_token,
    list_tokens,
    revoke_token,
)

# On the database, not through the API: the first admin token cannot come from the API.
token_app = typer.Typer(
    help="API tokens (roles reader, operator, admin), made on the database. docs/security.md",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)


@contextmanager
def _database() -> Iterator[Session]:
    from florist.server.db.engine import make_engine, make_session_factory, upgrade_database

    url = get_settings().resolved_database_url()
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as db:
            yield db
    finally:
        engine.dispose()


@token_app.command("create")
def create(
    role: Annotated[
        str,
        typer.Option(
            help="reader (GETs), operator (+ submit, cancel, resume), admin (+ tokens, node keys)"
        ),
    ],
    name: Annotated[str, typer.Option(help="Who or what holds it, e.g. alice or ci")],
    days: Annotated[
        float | None, typer.Option(min=0.0, help="Expires after this many days (default never)")
    ] = None,
) -> None:
    """Make a token and print it once: only its hash is kept."""
    try:
        parsed = Role.parse(role)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--role") from None
    if not name.strip() or len(name) > 200:
        raise typer.BadParameter("1 to 200 characters", param_hint="--name")
    with _database() as db:
        row, token = create_token(
            db,
            name=name.strip(),
            role=parsed,
            expires_in=timedelta(days=days) if days else None,
        )
        db.commit()
        token_id = row.id
    errors.print(
        f"token {token_id} ({escape(name)}, {parsed.label}) created. It is shown only now; "
        "keep it as FLORIST_TOKEN, or log in to the dashboard with it:"
    )
    # The token alone on stdout: `export FLORIST_TOKEN=$(florist token create …)` works.
    print(token)


@token_app.command("generate")
def generate() -> None:
    """Print a new token without storing it: for FLORIST_ADMIN_TOKEN in a deployment's secret
    store (the API registers it as an admin token when it starts)."""
    print(generate_token())


@token_app.command("list")
def list_() -> None:
    """Every token: id, name, role, created, last used, expiry or revocation."""
    with _database() as db:
        rows = list_tokens(db)
        table = Table("id", "name", "role", "created", "last used", "expires", "revoked")
        for row in rows:
            table.add_row(
                row.id,
                escape(row.name),
                row.role,
                *(
                    t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"
                    for t in (row.created_at, row.last_used_at, row.expires_at, row.revoked_at)
                ),
            )
    console.print(table if rows else "no tokens")


@token_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (florist token list)")],
) -> None:
    """Revoke a token: at once, its requests get 401 and its dashboard sessions end."""
    with _database() as db:
        row = revoke_token(db, token_id)
        db.commit()
    if row is None:
        errors.print(f"[red]no token {escape(token_id)}[/red] (florist token list)")
        raise typer.Exit(1)
    console.print(f"token {row.id} ({escape(row.name)}) revoked")


def bearer_headers(settings: Settings) -> dict[str, str]:
    """What the CLI sends to the API: FLORIST_TOKEN as a bearer token, if set."""
    token = settings.token.get_secret_value().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def refusal_hint(status_code: int) -> str | None:
    """What to do about a 401 or 403 from the API, in one line."""
    if status_code == 401:
        return (
            "The API wants a token: set FLORIST_TOKEN to one made on the server with "
            "`florist token create --role operator --name you` (docs/security.md)."
        )
    if status_code == 403:
        return (
            "Your token's role may not do this (reader: read only; operator: submit, cancel, "
            "resume; admin: tokens, node keys): ask for a token with a higher role."
        )
    return None


def mode_line(settings: Settings) -> str:
    """The startup line that says how the API is guarded (rich markup)."""
    if settings.auth_mode() == "open":
        where = (
            "anyone on this machine"
            if settings.is_local()
            else f"[bold]anyone who can reach {settings.api_host}[/bold]"
        )
        colour = "yellow" if settings.is_local() else "red"
        return (
            f"[bold {colour}]API auth: OPEN[/bold {colour}] — no login; {where} may submit and "
            "cancel experiments (FLORIST_AUTH=on to require tokens)"
        )
    return "API auth: on — tokens with roles (`florist token create`); dashboard login at /login"
