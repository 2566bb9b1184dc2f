"""What the request metrics cost per request: `python -m bench.metricscost [--multiprocess]`.

Drives `api.metrics.RequestMetricsMiddleware` around a trivial ASGI app (no network, no
framework), once with every metric the middleware records (the request counter, the
latency histogram, the in-progress gauge) and once with the counter alone, which is
what the middleware recorded before the histogram and gauge. Prints the median time
per request of each over several rounds, and their difference: the cost the
histogram and gauge add to every request, the warm cached poll included.
`--multiprocess` runs it with `PROMETHEUS_MULTIPROC_DIR` set (in a child process,
since prometheus_client reads it at import): values then go to memory-mapped files.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

ROUNDS = 9
REQUESTS = 20_000


def _measure() -> dict[str, float]:
    from api.metrics import Metrics, RequestMetricsMiddleware

    class _Cache:
        def stats(self) -> dict[str, Any]:
            return {"cache_enabled": False, "statistics": {}, "message": ""}

    metrics = Metrics(_Cache())  # type: ignore[arg-type]
    route = SimpleNamespace(path="/api/v2/jobs/{job_id}")
    app = SimpleNamespace(state=SimpleNamespace(services=SimpleNamespace(metrics=metrics)))

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = route
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    full = RequestMetricsMiddleware(inner)

    class CounterOnly(RequestMetricsMiddleware):
        """The middleware as it was: the counter, no histogram, no gauge."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            status = 500

            async def send_status(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                method = scope["method"]
                metrics.http_requests.labels(method, scope["route"].path, str(status)).inc()

    before = CounterOnly(inner)

    async def run(middleware: Any) -> float:
        start = time.perf_counter()
        for _ in range(REQUESTS):
            scope = {"type": "http", "method": "GET", "app": app, "path": "/api/v2/jobs/1"}
            await middleware(scope, receive, send)
        return (time.perf_counter() - start) / REQUESTS * 1e6

    async def rounds() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"counter_only_us": [], "all_metrics_us": []}
        for _ in range(ROUNDS):  # interleaved, so drift hits both alike
            out["counter_only_us"].append(await run(before))
            out["all_metrics_us"].append(await run(full))
        return out

    samples = asyncio.run(rounds())
    result = {name: statistics.median(values) for name, values in samples.items()}
    result["added_us"] = result["all_metrics_us"] - result["counter_only_us"]
    return result


def main(argv: list[str]) -> int:
    if "--child" in argv:
        print(json.dumps(_measure()))
        return 0
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="rw-metrics-") as directory:
        if "--multiprocess" in argv:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        done = subprocess.run(
            [sys.executable, "-m", "bench.metricscost", "--child"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    figures = json.loads(done.stdout)
    mode = "multiprocess" if "--multiprocess" in argv else "single process"
    print(
        f"{mode}: median of {ROUNDS} rounds x {REQUESTS} requests: "
        f"counter only {figures['counter_only_us']:.2f} µs/request, "
        f"all metrics {figures['all_metrics_us']:.2f} µs/request, "
        f"added {figures['added_us']:.2f} µs/request"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
