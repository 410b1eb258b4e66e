"""The API's one error format (``{"detail": ...}``): the 422 handler, body checks, OpenAPI docs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler as fastapi_http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

# Every integer the API stores lands in a 64-bit column or a Flower ConfigRecord (sint64).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# scikit-learn's random_state and numpy's legacy seeding take 32 bits; a larger seed would be
# accepted here and crash the run at its start.
SEED_MAX = 2**32 - 1

Loc = tuple[str | int, ...]


class ErrorPublic(BaseModel):
    """A 4xx other than a validation error: what is wrong, in words."""

    detail: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: the given error codes, all ``{"detail": ...}``."""
    words = {
        400: "The body is not UTF-8 JSON.",
        404: "No such experiment (or no such row of it).",
        409: "The experiment's status does not allow this.",
        503: "Too many open streams; retry after `Retry-After` seconds.",
    }
    return {code: {"model": ErrorPublic, "description": words[code]} for code in codes}


def _is_text(value: str) -> bool:
    """False for a lone surrogate (no UTF-8 encoding: the database and the JSON encoder fail on
    it) and for a NUL byte (PostgreSQL text refuses it)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(value: str) -> str | None:
    if "\x00" in value:
        return "a NUL character is not allowed"
    if not _is_text(value):
        return "a lone surrogate is not allowed (the text is not valid Unicode)"
    return None


def _is_seed_key(key: str) -> bool:
    return key == "seed" or key.endswith("_seed")


def body_problems(value: Any, loc: Loc = ("body",)) -> Iterator[dict[str, Any]]:
    """Pydantic-style errors for what no field of a JSON body may hold: NaN and ±Infinity (JSON
    has no such numbers; pydantic would store them as null), NUL bytes and lone surrogates in
    any string or key, integers beyond 64 bits, and seeds beyond 32 bits."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := _text_problem(key)):
                yield _error((*loc, _printable(key)), f"key: {problem}", "string_invalid")
                continue
            yield from body_problems(item, (*loc, key))
            if (
                isinstance(key, str)
                and _is_seed_key(key)
                and isinstance(item, int)
                and not isinstance(item, bool)
                and not 0 <= item <= SEED_MAX
            ):
                yield _error(
                    (*loc, key), f"a seed must be in [0, {SEED_MAX}] (2**32 - 1)", "seed_range"
                )
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from body_problems(item, (*loc, index))
    elif isinstance(value, float) and not math.isfinite(value):
        yield _error(loc, "NaN and Infinity are not numbers JSON can carry", "finite_number")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            yield _error(loc, "an integer beyond 64 bits cannot be stored", "int_range")
    elif isinstance(value, str) and (problem := _text_problem(value)):
        yield _error(loc, problem, "string_invalid")


def _error(loc: Loc, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def json_safe(value: Any) -> Any:
    """``value`` with what JSON (and UTF-8) cannot carry spelled out: NaN and ±Infinity as the
    strings ``"NaN"`` and ``"Infinity"``, lone surrogates backslash-escaped. An error echoes
    the input it refuses, and that input may be exactly such a value."""
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, str) and not _is_text(value.replace("\x00", "")):
        return _printable(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    return value


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's list of errors, JSON-safe whatever the input held."""
    # Twice: before, for what jsonable_encoder cannot take (bytes that are not UTF-8), and
    # after, for what it passes through untouched (a float NaN).
    encoded: list[dict[str, Any]] = jsonable_encoder(json_safe(list(errors)))
    return [json_safe(e) for e in encoded]


async def validation_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 with ``{"detail": [{loc, msg, type, ...}]}``, as FastAPI's own handler answers, but
    never a 500 on an input that JSON cannot echo (a NaN literal, a lone surrogate)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content={"detail": validation_errors(exc.errors())})


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own handler, except that a 405 lists in ``Allow`` the methods of every route
    of the path: Starlette names only those of the first route that matched the path, and
    ``GET`` and ``POST /experiments`` are two routes."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        # Asked per method of the whole router (routes are nested in included routers).
        allowed = [
            method
            for method in _METHODS
            if any(
                route.matches({**request.scope, "method": method})[0] == Match.FULL
                for route in request.app.router.routes
            )
        ]
        if allowed:
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
            exc = StarletteHTTPException(exc.status_code, exc.detail, headers=headers)
    return await fastapi_http_exception_handler(request, exc)
