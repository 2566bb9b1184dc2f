"""The cached poll, answered before FastAPI's routing and dependency injection.

`GET /api/v2/jobs/{id}` is the product's hot path: clients poll it every few seconds.
Measured (bench/results/breakdown.md, wrk, 1 worker): FastAPI's dependency resolution
and routing cost ~160 µs of CPU per poll, more than the Redis read itself. This ASGI
layer answers only the plain case -- a well-formed id and a key this process already
resolved -- with the same reader, the same ownership rule and the same response
function as the route (`api.routes.job_response`'s headers and bytes,
`api.errors.job_not_found`), so both paths answer byte for byte alike. Anything else
(no key, an unknown or cold key, a malformed id, another method, a GET that carries a
body) falls through to FastAPI unchanged, which gives the 401s, 413s, 422s and OpenAPI
documentation.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import database_unavailable, job_not_found
from api.models import MAX_JOB_ID
from api.routes import POLL_INTERVAL_HEADER, etag_matches, poll_interval, router

PREFIX = "/api/v2/jobs/"
ROUTE_PATH = "/api/v2/jobs/{job_id}"
MAX_ID_DIGITS = len(str(MAX_JOB_ID))
NO_CACHE = (b"cache-control", b"no-cache")
JSON_TYPE = (b"content-type", b"application/json")
POLL_INTERVAL = POLL_INTERVAL_HEADER.lower().encode()


class FastPollMiddleware:
    """Answers warm cached polls directly; everything else goes to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: BaseRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            plan = self._plan(scope)
            if plan is not None:
                await self._answer(scope, receive, send, *plan)
                return
        await self.app(scope, receive, send)

    def _plan(self, scope: Scope) -> tuple[Any, int, str, str | None] | None:
        """(services, job id, client, If-None-Match) when this layer may answer, else None."""
        path: str = scope["path"]
        if not path.startswith(PREFIX):
            return None
        digits = path[len(PREFIX) :]
        # ASCII digits only, no leading zero, in range: FastAPI's int parsing is looser
        # ("01", "+1", "1_0"); those rare shapes take the app's path.
        if not (0 < len(digits) <= MAX_ID_DIGITS and digits.isascii() and digits.isdigit()):
            return None
        if digits[0] == "0" or int(digits) > MAX_JOB_ID:
            return None
        authorization: str | None = None
        if_none_match: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    return None  # several: let the app decide
                authorization = value.decode("latin-1")
            elif name == b"if-none-match" and if_none_match is None:
                if_none_match = value.decode("latin-1")
            elif name in (b"content-length", b"transfer-encoding"):
                # A GET with a body: the app's body limit decides (413 when too large),
                # so the warm and the cold poll answer alike.
                return None
        if authorization is None or authorization[:7].lower() != "bearer ":
            return None
        token = authorization[7:]
        if not token or " " in token:
            return None
        services = getattr(scope["app"].state, "services", None)
        if services is None:
            return None
        known, client = services.keys.remembered(token)
        if not known or client is None:
            return None  # a cold or invalid key: the app resolves it (and answers 401)
        return services, int(digits), client, if_none_match

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        services: Any,
        job_id: int,
        client: str,
        if_none_match: str | None,
    ) -> None:
        # Metrics label the request with the route's template, as if the router ran.
        scope["route"] = self._route or self._find_route()
        try:
            job = await services.reader.get(job_id, client_id=client)
        except OperationalError as exc:
            # The app's exception handlers are inside FastAPI: use the same one here.
            await (await database_unavailable(Request(scope, receive), exc))(scope, receive, send)
            return
        if job is None:
            missing = job_not_found()
            response: Any = JSONResponse(
                {"detail": missing.detail}, status_code=missing.status_code, headers=missing.headers
            )
            await response(scope, receive, send)
            return
        # The bytes and headers of `job_response`, sent as ASGI messages: no Response
        # object per poll (tests/unit/test_fastpoll.py proves both answer alike).
        etag = f'"{job.version}"'
        headers = [(b"etag", etag.encode()), NO_CACHE]
        if not job.finished:
            headers.append((POLL_INTERVAL, poll_interval(services).encode()))
        if if_none_match is not None and etag_matches(if_none_match, etag):
            status, body = 304, b""
        else:
            status, body = 200, job.body
            headers += [(b"content-length", b"%d" % len(body)), JSON_TYPE]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _find_route(self) -> BaseRoute | None:
        for route in router.routes:
            methods = getattr(route, "methods", None) or ()
            if getattr(route, "path", None) == ROUTE_PATH and "GET" in methods:
                self._route = route
                return route
        return None
