"""CPU per cached poll, in process: the API app's ASGI callable driven directly.

`python -m bench.pollcpu [--polls N] [--clients C] [--rounds R] [--profile]` builds the
API (`api.app:create_app`) on a migrated SQLite file and the Redis at `--redis-url` (keys
under a private namespace, deleted afterwards), warms one job and one key, then sends N
warm polls from C concurrent callers straight into the ASGI app (no HTTP server, no
sockets on the client side) and reports this process's CPU time per poll (median of
the rounds). The Redis server's CPU is not counted. With `--profile`, a cProfile of one
round (top functions by own time) shows where the remaining CPU per poll goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from bench.stats import median


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import redis

    from api.app import create_app
    from renderwatch.migrate import upgrade
    from shared.apikeys import create_api_key
    from shared.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="rw-pollcpu-"))
    url = f"sqlite:///{workdir / 'renderwatch.db'}"
    upgrade(url)
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        _env_file=None,
        database_url=url,
        redis_url=args.redis_url,
        cache_namespace=namespace,
        **dict(kv.split("=", 1) for kv in args.setting),
    )
    app = create_app(settings, enqueue=lambda job_id: f"task-{job_id}")
    results: dict[str, Any] = {}
    try:
        async with app.router.lifespan_context(app):
            with app.state.services.runtime.sessions() as session:
                key = create_api_key("bench@example.com", session=session)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                auth = {"Authorization": f"Bearer {key}"}
                created = await client.post(
                    "/api/v2/jobs", json={"prompt": "bench", "scenes_total": 5}, headers=auth
                )
                job_id = created.json()["job_id"]
                for _ in range(3):  # resolve the key, fill the cache
                    (await client.get(f"/api/v2/jobs/{job_id}", headers=auth)).raise_for_status()
            scope_base = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": f"/api/v2/jobs/{job_id}",
                "raw_path": f"/api/v2/jobs/{job_id}".encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [(b"host", b"t"), (b"authorization", f"Bearer {key}".encode())],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
                "app": app,
            }
            statuses: dict[int, int] = {}

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses[message["status"]] = statuses.get(message["status"], 0) + 1

            async def caller(count: int) -> None:
                for _ in range(count):
                    await app(
                        dict(scope_base),
                        receive,
                        send,
                    )

            per_caller = max(1, args.polls // args.clients)
            cpu: list[float] = []
            profile = cProfile.Profile() if args.profile else None
            for i in range(args.rounds + 1):  # round 0 warms up
                if profile is not None and i == args.rounds:
                    profile.enable()
                started = time.process_time()
                await asyncio.gather(*(caller(per_caller) for _ in range(args.clients)))
                spent = time.process_time() - started
                if profile is not None and i == args.rounds:
                    profile.disable()
                if i:
                    cpu.append(1e6 * spent / (per_caller * args.clients))
            results = {"cpu_us_per_poll": median(cpu), "rounds": cpu, "statuses": statuses}
            if profile is not None:
                out = io.StringIO()
                pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.lines)
                results["profile"] = out.getvalue()
    finally:
        client_ = redis.Redis.from_url(args.redis_url)
        keys = list(client_.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client_.delete(*keys)
        client_.close()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pollcpu", description=__doc__)
    parser.add_argument("--polls", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--setting", action="append", default=[], help="NAME=VALUE")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="profile order (pstats key)")
    parser.add_argument("--lines", type=int, default=25, help="profile rows shown")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    results = asyncio.run(_measure(args))
    print(results.pop("profile", ""))
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
