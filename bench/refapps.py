"""Reference apps that set the ceiling the cached poll is compared with.

(a) `const`: a bare FastAPI endpoint returning constant bytes (a job object's size);
(b) `redis`: a bare FastAPI endpoint returning the bytes of one redis.asyncio GET;
`evalsha`: a raw ASGI app (no FastAPI) returning the bytes of one redis.asyncio EVALSHA
(a one-line GET script), the floor of a cached poll that costs one script call.
All are served exactly like the API (uvicorn, uvloop + httptools, no access log):
`python -m bench.refapps const|redis|evalsha PORT`, with `BENCH_REDIS_URL` / `BENCH_REDIS_KEY`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from redis.asyncio import Redis

# A job object as the API serves it, so both references move the same bytes.
SAMPLE_BODY = (
    b'{"job_id":1,"client_id":"bench-client-0","status":"running","progress":'
    b'{"current_stage":"rendering","scenes_completed":3,"scenes_total":5,"percent":58.0},'
    b'"version":7,"error":null,"result_url":null,"created_at":"2026-11-26T10:00:00.000000Z",'
    b'"updated_at":"2026-11-26T10:00:21.000000Z"}'
)


def create_const_app() -> FastAPI:
    """(a) constant bytes: FastAPI's own per-request cost."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/const")
    async def const() -> Response:
        return Response(content=SAMPLE_BODY, media_type="application/json")

    return app


def create_redis_app() -> FastAPI:
    """(b) one redis.asyncio GET passed through as bytes: FastAPI plus one Redis round trip."""
    url = os.environ["BENCH_REDIS_URL"]
    key = os.environ["BENCH_REDIS_KEY"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = Redis.from_url(url, socket_timeout=1.0, max_connections=256)
        app.state.redis = client
        yield
        await client.aclose()

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.get("/redis")
    async def passthrough() -> Response:
        raw = await app.state.redis.get(key)
        if raw is None:
            return Response(status_code=404)
        return Response(content=raw, media_type="application/json")

    return app


GET_SCRIPT = "return redis.call('GET', KEYS[1])"


class RawEvalshaApp:
    """Raw ASGI: every GET answers the bytes of one EVALSHA (no routing, no framework)."""

    def __init__(self) -> None:
        self.url = os.environ["BENCH_REDIS_URL"]
        self.key = os.environ["BENCH_REDIS_KEY"]
        self.client: Redis | None = None
        self.sha = ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client = Redis.from_url(self.url, socket_timeout=1.0, max_connections=256)
                    self.sha = await self.client.script_load(GET_SCRIPT)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.client is not None
        raw = await self.client.evalsha(self.sha, 1, self.key)
        status, body = (200, raw) if raw is not None else (404, b"")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_evalsha_app() -> RawEvalshaApp:
    return RawEvalshaApp()


FACTORIES = {
    "const": "bench.refapps:create_const_app",
    "redis": "bench.refapps:create_redis_app",
    "evalsha": "bench.refapps:create_evalsha_app",
}


def serve(factory: str, port: int, workers: int = 1) -> None:
    """Serve like the API does: uvloop, httptools, no access log."""
    uvicorn.run(
        factory,
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    serve(FACTORIES[sys.argv[1]], int(sys.argv[2]))
