"""What routes receive through `Depends`: the cache, a DB session, the caller's client id.

Everything comes from `app.state.services`, built by the lifespan (`api.app`); tests
swap any of it with `app.dependency_overrides` or the seams of `create_app`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from api.errors import (
    body_incomplete,
    body_validation_error,
    not_authenticated,
    unsupported_media_type,
)
from api.hub import Hub
from api.metrics import Metrics
from api.models import JobCreate
from shared.apikeys import KeyResolver
from shared.cache import JobCache
from shared.cache.aio import AsyncJobReader
from shared.runtime import Runtime

logger = logging.getLogger(__name__)

Enqueue = Callable[[int], str]


@dataclass
class Services:
    """What the lifespan builds and closes: put on `app.state.services`."""

    runtime: Runtime
    keys: KeyResolver
    enqueue: Enqueue
    metrics: Metrics
    reader: AsyncJobReader
    close_enqueue: Callable[[], None] = lambda: None
    # Live updates of the SSE streams (api.hub); built by the lifespan.
    hub: Hub | None = None


# Cheap lookups are `async def`: they run on the event loop, no thread-pool hop.
async def get_services(request: Request) -> Services:
    """The services of the running app."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_runtime(services: ServicesDep) -> Runtime:
    return services.runtime


async def get_cache(services: ServicesDep) -> JobCache:
    return services.runtime.cache


async def get_reader(services: ServicesDep) -> AsyncJobReader:
    return services.reader


async def get_enqueue(services: ServicesDep) -> Enqueue:
    return services.enqueue


def get_session(services: ServicesDep) -> Iterator[Session]:
    """A session for this request (it connects only when first used), closed afterwards."""
    session = services.runtime.sessions()
    try:
        yield session
    finally:
        try:
            session.close()
        except DBAPIError as exc:
            # The connection died after the route was done with it (PostgreSQL terminated
            # it while idle in a read transaction): the server has already rolled back and
            # the pool discards it. Raising here would drop the client's connection with
            # no answer, since the response has already started.
            if not exc.connection_invalidated:
                raise
            logger.info("database connection lost after the request (%s)", type(exc.orig).__name__)


_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


async def current_client(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The client id behind the request's bearer key, else 401.

    A warm key is answered from the resolver's memory on the event loop (no thread
    hop, no database round trip: this runs on every cached poll); a cold key is
    looked up in the database from a worker thread, so the loop never blocks.
    """
    if credentials is None:
        raise not_authenticated()
    known, client = services.keys.remembered(credentials.credentials)
    if not known:
        client = await to_thread.run_sync(services.keys.resolve, credentials.credentials)
    if client is None:
        raise not_authenticated()
    return client


async def job_create_body(request: Request) -> JobCreate:
    """The body of `POST /api/v2/jobs`, parsed after authentication (415/413/422 here)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise unsupported_media_type()
    # The body limit (api.errors.BodyLimitMiddleware) turns an oversized body into a 413 here.
    try:
        raw = await request.body()
    except ClientDisconnect:
        # The client hung up before sending the body it announced: a client error. Left
        # alone it would be an "Exception in ASGI application" traceback and a 500 in the
        # request metrics, for an answer nobody is left to read.
        raise body_incomplete() from None
    try:
        return JobCreate.model_validate_json(raw)
    except ValidationError as exc:
        raise body_validation_error(
            [dict(error) for error in exc.errors(include_url=False, include_input=False)]
        ) from None


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
CacheDep = Annotated[JobCache, Depends(get_cache)]
ReaderDep = Annotated[AsyncJobReader, Depends(get_reader)]
SessionDep = Annotated[Session, Depends(get_session)]
ClientId = Annotated[str, Depends(current_client)]
EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
JobCreateBody = Annotated[JobCreate, Depends(job_create_body)]
