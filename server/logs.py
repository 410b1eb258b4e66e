"""Process logs: plain text or one JSON object a line, naming the experiment and run of each.

Which experiment and run a line concerns is carried in a context variable, not passed to every
call: the ServerApp binds it once for its run (``log_context``), the run follower for each
experiment it handles, and the API for each request whose path names an experiment. A logging
filter copies it onto every record, so a line from any module (Florist's, Flower's, uvicorn's)
says which experiment it belongs to.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO

from starlette.types import ASGIApp, Receive, Scope, Send

LogFormat = Literal["text", "json"]

# The ids a line may carry: Florist's experiment and run (rows of `experiments` and `runs`) and
# the Flower run executing it (what `flwr ls` and the SuperLink's own lines show).
CONTEXT_FIELDS = ("experiment_id", "run_id", "flwr_run_id")

_NONE: Mapping[str, int] = MappingProxyType({})
_context: ContextVar[Mapping[str, int]] = ContextVar("florist_log_context", default=_NONE)


def current_context() -> dict[str, int]:
    """The ids bound in this context."""
    return dict(_context.get())


@contextmanager
def log_context(**ids: int | None) -> Iterator[None]:
    """Bind ids (``experiment_id``, ``run_id``, ``flwr_run_id``) to every line logged inside."""
    unknown = set(ids) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"unknown log context fields {sorted(unknown)}; known: {CONTEXT_FIELDS}")
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record (None where unbound) unless it carries its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get()
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, bound.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the context ids
    (always present, null when unbound, so every line has the same keys) and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            entry[name] = getattr(record, name, None)
        entry["process"] = record.process
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exception"] = record.exc_text
        # default=str: a message argument that JSON cannot hold still makes a line.
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``LEVEL logger [experiment=3 run=1]: message``; the brackets only when ids are bound."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s%(florist_ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [
            f"{name.removesuffix('_id')}={value}"
            for name in CONTEXT_FIELDS
            if (value := getattr(record, name, None)) is not None
        ]
        record.florist_ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _is_ours(handler: logging.Handler) -> bool:
    return getattr(handler, "florist", False)


def configure_logging(
    log_format: LogFormat = "text", *, level: str | int = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr) in ``log_format``; call again to change.

    In JSON mode Flower's own console handler is taken off its ``flwr`` logger, whose records
    then reach this handler like any other, so that every line is one JSON object. In text mode
    Flower keeps its own format and stops propagating (its lines would otherwise come twice).
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_ours(h)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.florist = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in _UVICORN:
        # A uvicorn started with its own logging config keeps these to itself.
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    flower = logging.getLogger("flwr")
    if log_format == "json":
        from flwr.common.logger import console_handler

        flower.removeHandler(console_handler)
        flower.propagate = True
    else:
        flower.propagate = False
    return handler


# /api/v1/experiments/{id}/… and the dashboard's /experiments/{id}.
_EXPERIMENT_PATH = re.compile(r"^(?:/api/v1)?/experiments/(\d{1,10})(?:/|$)")


class ExperimentLogContext:
    """ASGI middleware: a request whose path names an experiment logs with its id (uvicorn's
    access line included, which is written while the response starts, inside the request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _EXPERIMENT_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        with log_context(experiment_id=int(match.group(1))):
            await self.app(scope, receive, send)
