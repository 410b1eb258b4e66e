"""Dependencies of the routes: a database session, the settings, the run follower."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from florist.server.follower import RunFollower
from florist.server.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_follower(request: Request) -> RunFollower | None:
    follower: RunFollower | None = request.app.state.follower
    return follower


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
FollowerDep = Annotated[RunFollower | None, Depends(get_follower)]

# Row ids and round numbers are 32-bit INTEGER columns on PostgreSQL (and SQLite refuses anything
# past 64 bits): a larger number names no row, so it is refused at the edge, never sent to the
# database, where it would fail the request with a 500.
DB_INT_MAX = 2**31 - 1
ExperimentId = Annotated[
    int, Path(ge=0, le=DB_INT_MAX, description="The experiment's id (404 if there is none).")
]

# A page of a listing: rows follow in a fixed order, and each page's ``next_cursor`` (the id of
# its last row) fetches the next. The default is large enough that a client that reads only
# the first page still gets all of a typical experiment; the cap bounds one response.
PAGE_LIMIT_DEFAULT = 1000
PAGE_LIMIT_MAX = 10_000
PageLimit = Annotated[
    int,
    Query(
        ge=1,
        le=PAGE_LIMIT_MAX,
        description=f"Rows per page (default {PAGE_LIMIT_DEFAULT}, at most {PAGE_LIMIT_MAX}).",
    ),
]
PageCursor = Annotated[
    int | None,
    Query(
        ge=0,
        le=DB_INT_MAX,
        description="The previous page's `next_cursor`: the page after it (422 if it names no "
        "row of this listing). Absent: the first page.",
    ),
]
NEXT_CURSOR_DESCRIPTION = (
    "Pass as `cursor` for the next page; absent on the last page. `count` counts the rows of "
    "all pages."
)
