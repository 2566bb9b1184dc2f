"""HTTP errors of the API and the handlers that shape them.

QueueUnavailable          the job queue (Celery broker) refused a task → 503
HTTPException             400 / 401 / 404 / 409 / 413 / 415 built by the helpers below
RequestValidationError    422, one entry per invalid field, never echoing the input
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

INVALID_KEY = "missing or invalid API key"
JOB_NOT_FOUND = "job not found"


class QueueUnavailable(Exception):
    """The job queue could not take the task (broker down or refusing)."""


def not_authenticated() -> HTTPException:
    """401 for a missing, malformed, unknown or revoked key (one answer for all of them)."""
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=INVALID_KEY,
        headers={"WWW-Authenticate": "Bearer"},
    )


def job_not_found() -> HTTPException:
    """404, identical for a job that does not exist and one that belongs to someone else."""
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=JOB_NOT_FOUND)


def unsupported_media_type() -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail="Content-Type must be application/json",
    )


def body_validation_error(errors: list[dict[str, object]]) -> RequestValidationError:
    """A 422 for body errors reported by pydantic, with `body` in front of each location."""
    for error in errors:
        loc = error.get("loc", ())
        error["loc"] = ("body", *loc) if isinstance(loc, tuple) else ("body",)
    return RequestValidationError(errors)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Only where and why: echoing `input` back could reflect a large or sensitive body.
    detail = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error["type"]}
        for error in exc.errors()
    ]
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content=jsonable_encoder({"detail": detail}),
    )


def body_incomplete() -> HTTPException:
    """400 for a body cut short: the client disconnected before sending all of it."""
    return HTTPException(
        status_code=status.HTTP_400_BAD_REQUEST,
        detail="request body incomplete: the client disconnected before sending all of it",
    )


def body_too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_413_CONTENT_TOO_LARGE,
        detail=f"request body too large: the limit is {max_bytes} bytes",
    )


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes`: at once when declared, while read when chunked."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = body_too_large(self.max_bytes)
            response = JSONResponse({"detail": error.detail}, status_code=error.status_code)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: answered as an ordinary 413.
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


async def database_unavailable(request: Request, exc: Exception) -> Response:
    # The type only: driver messages may carry hosts or connection details.
    logger.warning("database unavailable (%s): answered 503", type(exc).__name__)
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "database unavailable: please retry later"},
        headers={"Retry-After": "5"},
    )


def install(app: FastAPI) -> None:
    """Register the API's exception handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, database_unavailable)
