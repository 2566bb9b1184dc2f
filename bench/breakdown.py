"""Where a cached poll's server time goes: the real app against variants of itself.

`python -m bench.breakdown [--seconds S] [--rounds R]` serves each variant like the
API (uvicorn, uvloop + httptools, 1 worker, no access log), loads it with wrk and
reads the server's CPU time per request (steadier than req/s on a shared machine).
Each step removes one layer, so the differences say what each layer costs:

- `real`: the API as shipped (`api.app:create_app`), GET /api/v2/jobs/{id};
- `no_middleware`: without the app's own middleware (request metrics, body limit);
- `no_dependencies`: same app, a route without FastAPI dependencies (auth by hand);
- `reader_only`: a route that only calls `AsyncJobReader.get` (no auth, no ETag);
- `app_get`: a route doing one redis.asyncio GET inside the same app;
- `fast_path`: a raw-ASGI prototype in front of the app that answers a cached poll
  (auth from memory, ownership, ETag/304, metrics) and hands anything else to FastAPI;
- references (a) and (b) of the main bench.

Results go to stdout and `bench/results/breakdown.md`. A diagnosis tool: it patches
the app's middleware list, so it may need care when `api/` changes shape.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response

from bench.procs import PYTHON, ProcessGroup, base_env, free_port, group_cpu_seconds, wait_http
from bench.services import DEFAULT_PG_ADMIN_URL, private_database, start_redis
from bench.stack import Stack
from bench.stats import median
from bench.wrk import throughput

RESULTS = Path(__file__).resolve().parent / "results"
_JOB_PATH = re.compile(r"^/api/v2/jobs/([1-9][0-9]{0,17})$")


# -- variants (served in their own process) ------------------------------------------------


def _app_without_middleware() -> FastAPI:
    from api.app import create_app
    from api.errors import BodyLimitMiddleware
    from api.metrics import RequestMetricsMiddleware

    app = create_app()
    dropped = {RequestMetricsMiddleware.__name__, BodyLimitMiddleware.__name__}
    app.user_middleware = [
        m for m in app.user_middleware if getattr(m.cls, "__name__", "") not in dropped
    ]
    return app


def real() -> FastAPI:
    from api.app import create_app

    return create_app()


def no_middleware() -> FastAPI:
    return _app_without_middleware()


def no_dependencies() -> FastAPI:
    app = _app_without_middleware()

    @app.get("/variant/{job_id}")
    async def variant(job_id: int, request: Request) -> Response:
        services = request.app.state.services
        auth = request.headers.get("authorization", "")
        known, client = services.keys.remembered(auth.removeprefix("Bearer "))
        if not known or client is None:
            return Response(status_code=401)
        job = await services.reader.get(job_id, client_id=client)
        if job is None:
            return Response(status_code=404)
        headers = {"ETag": f'"{job.version}"', "Cache-Control": "no-cache"}
        return Response(content=job.body, media_type="application/json", headers=headers)

    return app


def reader_only() -> FastAPI:
    app = _app_without_middleware()

    @app.get("/variant/{job_id}")
    async def variant(job_id: int, request: Request) -> Response:
        job = await request.app.state.services.reader.get(job_id)
        return Response(content=job.body, media_type="application/json")

    return app


def app_get() -> FastAPI:
    app = _app_without_middleware()

    @app.get("/variant/{job_id}")
    async def variant(job_id: int, request: Request) -> Response:
        reader = request.app.state.services.reader
        raw = await reader.client.get(reader.cache.keys.job(job_id))
        return Response(content=raw, media_type="application/json")

    return app


class FastPoll:
    """Prototype: answer a cached GET /api/v2/jobs/{id} before FastAPI's routing.

    Only the sure case is answered here (a remembered key, a job the reader returns
    for that client); anything else (no key, unknown key, not found, not a GET) goes
    to the FastAPI app unchanged, which answers it exactly as before.
    """

    def __init__(self, app: Any, outer: FastAPI) -> None:
        self.app, self.outer = app, outer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _JOB_PATH.match(scope["path"])
            services = getattr(self.outer.state, "services", None)
            if (
                match is not None
                and services is not None
                and await self._serve(services, int(match.group(1)), scope, send)
            ):
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(services: Any, job_id: int, scope: Any, send: Any) -> bool:
        auth = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"if-none-match":
                if_none_match = value
        if auth is None or not auth.startswith(b"Bearer "):
            return False
        known, client = services.keys.remembered(auth[7:].decode("latin-1"))
        if not known or client is None:
            return False
        job = await services.reader.get(job_id, client_id=client)
        if job is None:
            return False
        etag = b'"%d"' % job.version
        headers = [(b"etag", etag), (b"cache-control", b"no-cache")]
        tags = [] if if_none_match is None else if_none_match.split(b",")
        if any(tag.strip().removeprefix(b"W/") in (etag, b"*") for tag in tags):
            status, body = 304, b""
        else:
            status, body = 200, job.body
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        services.metrics.http_requests.labels("GET", "/api/v2/jobs/{job_id}", str(status)).inc()
        return True


def fast_path() -> FastAPI:
    from api.app import create_app

    app = create_app()
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: FastPoll(build(), app)  # type: ignore[method-assign]
    return app


VARIANTS = ("real", "no_middleware", "no_dependencies", "reader_only", "app_get", "fast_path")
USES_VARIANT_ROUTE = {"no_dependencies", "reader_only", "app_get"}


# -- the measurement ---------------------------------------------------------------------------


def measure(seconds: float, rounds: int, pg_admin_url: str) -> dict[str, dict[str, float]]:
    workdir = Path(tempfile.mkdtemp(prefix="rw-breakdown-"))
    with private_database(pg_admin_url) as database_url, ProcessGroup(workdir / "logs") as group:
        redis = start_redis(group, workdir / "redis")
        stack = Stack(group=group, workdir=workdir, database_url=database_url, redis=redis)
        try:
            stack.start_runtime()
            (client,) = stack.make_clients(1)
            (job,) = stack.make_jobs(1, scenes=5)
            targets: dict[str, tuple[str, dict[str, str], int]] = {}
            servers = {}
            for name in VARIANTS:
                port = free_port()
                env = stack.api_env(cache=True, workers=1, port=port, redis_url=None)
                argv = [PYTHON, "-m", "bench.breakdown", "--serve", name, "--port", str(port)]
                servers[name] = (group.start(name, argv, env=env, port=port), port)
            const_port, redis_port = free_port(), free_port()
            const = group.start(
                "ref-const", [PYTHON, "-m", "bench.refapps", "const", str(const_port)]
            )
            ref = group.start(
                "ref-redis",
                [PYTHON, "-m", "bench.refapps", "redis", str(redis_port)],
                env=base_env(BENCH_REDIS_URL=redis.url, BENCH_REDIS_KEY="bench:breakdown"),
            )
            for name, (child, port) in servers.items():
                base = f"http://127.0.0.1:{port}"
                wait_http(child, base + "/healthz", timeout=60)
                stack.http.get(base + "/api/v2/cache/stats", headers=client.auth)
                path = f"/variant/{job.job_id}" if name in USES_VARIANT_ROUTE else job.path
                answer = stack.http.get(base + path, headers=client.auth)
                answer.raise_for_status()
                targets[name] = (base + path, client.auth, child.proc.pid)
            redis.client().set("bench:breakdown", answer.content)
            wait_http(const, f"http://127.0.0.1:{const_port}/const")
            wait_http(ref, f"http://127.0.0.1:{redis_port}/redis")
            targets["(a) const"] = (f"http://127.0.0.1:{const_port}/const", {}, const.proc.pid)
            targets["(b) redis GET"] = (f"http://127.0.0.1:{redis_port}/redis", {}, ref.proc.pid)
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for i in range(rounds + 1):  # round 0 warms up and is dropped
                for name, (url, headers, pid) in targets.items():
                    before = group_cpu_seconds(pid)
                    result = throughput(
                        url, headers=headers, duration=seconds, workdir=workdir, name=name
                    )
                    cpu = group_cpu_seconds(pid) - before
                    if i:
                        runs[name].append((result.rps, 1e6 * cpu / max(1, result.requests)))
        finally:
            stack.close()
    return {
        name: {"rps": median([r for r, _ in rs]), "cpu_us": median([c for _, c in rs])}
        for name, rs in runs.items()
    }


def report(table: dict[str, dict[str, float]], *, seconds: float, rounds: int) -> str:
    lines = [
        "# Where a cached poll's server time goes",
        "",
        f"`python -m bench.breakdown --seconds {seconds:g} --rounds {rounds}`: wrk -t2 -c64, "
        "1 worker; medians of the rounds. CPU per request is the server process's user + "
        "system time over the requests it answered.",
        "",
        "| variant | req/s | server CPU per request (µs) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {row['rps']:,.0f} | {row['cpu_us']:,.0f} |" for name, row in table.items()
    ]
    steps = [
        ("request-metrics + body-limit middleware", "real", "no_middleware"),
        ("FastAPI dependencies (bearer, services, reader, header)", "no_dependencies", None),
        ("auth by hand, ETag headers", "no_dependencies", "reader_only"),
        ("AsyncJobReader over one GET (EVALSHA, checks, decode)", "reader_only", "app_get"),
        ("the API app's shell around one GET vs the bare reference", "app_get", "(b) redis GET"),
    ]
    lines += ["", "| layer | µs per request |", "|---|---|"]
    for label, upper, lower in steps:
        if lower is None:
            value = table["no_middleware"]["cpu_us"] - table[upper]["cpu_us"]
        else:
            value = table[upper]["cpu_us"] - table[lower]["cpu_us"]
        lines.append(f"| {label} | {value:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-url", default=DEFAULT_PG_ADMIN_URL)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        uvicorn.run(
            f"bench.breakdown:{args.serve}",
            factory=True,
            host="127.0.0.1",
            port=args.port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
        )
        return 0
    table = measure(args.seconds, args.rounds, args.pg_url)
    text = report(table, seconds=args.seconds, rounds=args.rounds)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "breakdown.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
