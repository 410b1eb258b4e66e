"""GET /experiments/{id}/events: an experiment's rounds, updates and status as server-sent events.

The stream is fed by the database, not by the ServerApp: every ``POLL_INTERVAL_S`` it opens a
session, reads what was committed since its cursor and closes the session again, so a stream
holds no connection while it waits. Event ids are that cursor (``"<round row id>-<update row
id>"``), so a browser's EventSource that reconnects with ``Last-Event-ID`` misses nothing.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from florist.server.api.deps import DB_INT_MAX, ExperimentId
from florist.server.api.routes.experiments import rounds_to_public, to_public, updates_to_public
from florist.server.api.schemas import ExperimentPublic, StreamEnd
from florist.server.db import repository as repo

router = APIRouter(prefix="/experiments", tags=["events"])

# Module-level so that tests can shorten them.
POLL_INTERVAL_S = 0.5
HEARTBEAT_S = 10.0
RETRY_MS = 2000
# Rows of each kind read per poll: a long history reaches a new stream in batches (the next
# one at once), never in one read that holds the whole experiment in memory.
POLL_BATCH = 500
# The first poll of a stream reads fewer, so the first rows reach the page at once.
FIRST_BATCH = 50
# What a client refused for too many open streams is told to wait, in seconds.
STREAMS_RETRY_AFTER_S = 5
_SINCE = re.compile(r"^(\d+)(?:-(\d+))?$")


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


class _CountedStream(EventStreamResponse):
    """A stream that gives back its place in the app's count of open streams when it ends,
    however it ends (finished, client gone, server shutting down)."""

    def __init__(self, state: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._state.open_streams -= 1


class Reconnect(BaseModel):
    """The data of ``reconnect``: the stream reached its maximum lifetime and closes."""

    after_s: float = Field(description="How long the stream was open.")


@dataclass(frozen=True)
class Cursor:
    """The highest round and client-update row ids already sent."""

    round_id: int = 0
    update_id: int = 0

    def __str__(self) -> str:
        return f"{self.round_id}-{self.update_id}"


def sse(event: str, data: BaseModel, event_id: Cursor | None = None) -> str:
    """One server-sent event; the JSON payload is one line, so one ``data:`` field holds it."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {data.model_dump_json()}")
    return "\n".join(lines) + "\n\n"


def _resolve_cursor(
    session: Session, experiment_id: int, since: str | None, loc: tuple[str, str]
) -> Cursor:
    if since is None:
        return Cursor()
    match = _SINCE.match(since.strip())
    if match is None:
        raise RequestValidationError(
            [
                {
                    "loc": loc,
                    "msg": f"{since!r} is neither a server round nor an event id",
                    "type": "cursor_invalid",
                }
            ]
        )
    # No row id or round is above DB_INT_MAX, so a larger number means "after all of them".
    first = min(int(match.group(1)), DB_INT_MAX)
    if match.group(2) is not None:
        return Cursor(first, min(int(match.group(2)), DB_INT_MAX))
    round_id, update_id = repo.row_ids_through_round(
        session, experiment_id=experiment_id, server_round=first
    )
    return Cursor(round_id, update_id)


@dataclass
class _Poll:
    found: bool  # False: the experiment was deleted
    events: list[str]
    cursor: Cursor
    more: bool = False  # a batch was full: more rows wait
    end: StreamEnd | None = None  # the experiment had finished before the rows were read


def _poll(sessions: sessionmaker[Session], experiment_id: int, cursor: Cursor, batch: int) -> _Poll:
    """Everything committed after ``cursor`` (up to ``batch`` rows of each kind), read in one
    short-lived session."""
    with sessions() as session:
        # The status first: a run is finished only after its last round was committed, so a
        # finished status read here guarantees that the reads below see every round.
        exp = repo.get_experiment(session, experiment_id=experiment_id)
        if exp is None:
            return _Poll(False, [], cursor)
        end = StreamEnd(status=exp.status, error=exp.error) if exp.status.terminal else None
        events: list[str] = []
        round_id, update_id = cursor.round_id, cursor.update_id
        # Updates before their round, so a page draws a round's bars before its chart point.
        updates = repo.updates_after(
            session, experiment_id=experiment_id, after_id=update_id, limit=batch
        )
        for update, update_public in zip(updates, updates_to_public(updates), strict=True):
            update_id = update.id
            events.append(sse("update", update_public, Cursor(round_id, update_id)))
        # A full batch of updates may leave some of a round's updates for the next poll: its
        # round waits for them.
        rounds = (
            []
            if len(updates) == batch
            else repo.rounds_after(
                session, experiment_id=experiment_id, after_id=round_id, limit=batch
            )
        )
        for row, round_public in zip(rounds, rounds_to_public(rounds), strict=True):
            round_id = row.id
            events.append(sse("round", round_public, Cursor(round_id, update_id)))
        more = len(updates) == batch or len(rounds) == batch
        return _Poll(True, events, Cursor(round_id, update_id), more, end)


def _experiment(sessions: sessionmaker[Session], experiment_id: int) -> ExperimentPublic | None:
    """The experiment with its progress (what a ``status`` event carries); None if deleted."""
    with sessions() as session:
        exp = repo.get_experiment(session, experiment_id=experiment_id)
        if exp is None:
            return None
        progress = repo.experiment_progress(session, experiment_ids=[exp.id])
        return to_public(exp, progress.get(exp.id))


async def _stream(
    request: Request,
    sessions: sessionmaker[Session],
    experiment_id: int,
    cursor: Cursor,
    max_lifetime_s: float,
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    last_status: str | None = None
    opened = last_sent = time.monotonic()
    # A small first batch, sent before the status (whose progress reads the whole history),
    # puts a long history's first rows on the page at once; the rest follows in full batches.
    batch = FIRST_BATCH
    while True:
        poll = await run_in_threadpool(_poll, sessions, experiment_id, cursor, batch)
        if not poll.found:  # deleted while being watched
            yield sse("end", StreamEnd(status="deleted"), cursor)
            return
        cursor = poll.cursor
        for event in poll.events:
            yield event
        if poll.events:
            last_sent = time.monotonic()
        # While a history is replayed, the status is sent once, after the first batch: each
        # status costs a read of the whole history, and it cannot have changed much.
        if last_status is None or not poll.more:
            experiment = await run_in_threadpool(_experiment, sessions, experiment_id)
            if experiment is None:
                yield sse("end", StreamEnd(status="deleted"), cursor)
                return
            status_json = experiment.model_dump_json()
            if status_json != last_status:
                last_status = status_json
                yield sse("status", experiment, cursor)
                last_sent = time.monotonic()
        batch = POLL_BATCH
        if poll.more:  # the rest of a long history: no end and no wait before it is sent
            if await request.is_disconnected():
                return
            continue
        if poll.end is not None:
            yield sse("end", poll.end, cursor)
            return
        if (age := time.monotonic() - opened) >= max_lifetime_s:
            # A stream is not held for ever: EventSource reconnects on its own, with the id of
            # this last event as Last-Event-ID, so it misses nothing.
            yield sse("reconnect", Reconnect(after_s=age), cursor)
            return
        if time.monotonic() - last_sent >= HEARTBEAT_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(POLL_INTERVAL_S)


EVENT_NAMES = ("update", "round", "status", "end", "reconnect")
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}

_EVENTS_DESCRIPTION = """\
A `text/event-stream` of the experiment, read from the database about twice a second:

* `update`: a client update (`UpdatePublic`), in the order they were recorded;
* `round`: a finished round (`RoundPublic`), after its updates;
* `status`: the experiment (`ExperimentPublic`, with progress), first at once and then whenever
  it changes;
* `end`: once the experiment has finished, after everything else (`StreamEnd`); then the stream
  closes.
* `reconnect`: the stream has been open for its maximum lifetime (`FLORIST_SSE_MAX_LIFETIME_S`)
  and closes; reconnect with its id as `Last-Event-ID` (EventSource does so by itself).

A long history arrives in batches of a few hundred rows, one right after the other. At most
`FLORIST_SSE_MAX_STREAMS` streams are open at once: beyond that, 503 with `Retry-After`.

Lines starting with `:` are keep-alive comments. Every event's `id` is a cursor: reconnecting
with `Last-Event-ID` (as EventSource does) or `?since=<id>` resumes after it, and
`?since=<k>` (a server round) sends only rounds and updates after round k.
"""


@router.get(
    "/{experiment_id}/events",
    response_class=EventStreamResponse,
    summary="Follow an experiment live (server-sent events)",
    description=_EVENTS_DESCRIPTION,
    responses={
        200: {
            "description": "The event stream.",
            "content": {
                "text/event-stream": {
                    # One event (OpenAPI before 3.2 has `schema` describe each item of a stream).
                    "schema": {
                        "type": "object",
                        "required": ["event", "data"],
                        "properties": {
                            "event": {"type": "string", "enum": list(EVENT_NAMES)},
                            "id": {"type": "string", "pattern": r"^\d+-\d+$"},
                            "data": {"type": "string", "description": "The event's JSON."},
                            "retry": {"type": "integer"},
                        },
                    },
                    "example": {"event": "round", "id": "4-12", "data": '{"server_round": 4}'},
                }
            },
        },
        # Errors are JSON, not the stream's media type.
        404: {"description": "No experiment with this id.", "content": _JSON_ERROR},
        422: {
            "description": "A malformed `since` or `Last-Event-ID`.",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
            },
        },
        503: {
            "description": "Too many streams are open; retry after `Retry-After` seconds.",
            "content": _JSON_ERROR,
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        },
    },
)
async def experiment_events(
    experiment_id: ExperimentId,
    request: Request,
    since: Annotated[
        str | None,
        Query(
            description="Resume after this event id (`12-40`) or after this server round (`3`).",
            pattern=r"^\d+(-\d+)?$",
        ),
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventStreamResponse:
    sessions: sessionmaker[Session] = request.app.state.sessions

    def check() -> Cursor:
        with sessions() as session:
            if repo.get_experiment(session, experiment_id=experiment_id) is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND, f"experiment {experiment_id} not found"
                )
            # A reconnecting EventSource sends the last id it saw; it wins over the URL's since.
            if last_event_id is not None:
                return _resolve_cursor(
                    session, experiment_id, last_event_id, ("header", "Last-Event-ID")
                )
            return _resolve_cursor(session, experiment_id, since, ("query", "since"))

    cursor = await run_in_threadpool(check)
    settings = request.app.state.settings
    state = request.app.state
    # Checked and taken with no await in between: the event loop runs one request at a time
    # here, so two requests cannot both take the last place.
    if getattr(state, "open_streams", 0) >= settings.sse_max_streams:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"{settings.sse_max_streams} event streams are open, the most this server keeps",
            headers={"Retry-After": str(STREAMS_RETRY_AFTER_S)},
        )
    state.open_streams = getattr(state, "open_streams", 0) + 1
    return _CountedStream(
        state,
        _stream(request, sessions, experiment_id, cursor, settings.sse_max_lifetime_s),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
