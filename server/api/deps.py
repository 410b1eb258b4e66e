"""Dependencies of the routes: a database session, the settings, the run follower."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
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
