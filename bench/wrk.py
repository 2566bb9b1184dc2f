"""Throughput with wrk (a separate C process), or the Python generator when wrk is missing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.httpload import run_load
from bench.stats import percentile

WRK_INSTALL_HINT = "wrk is not installed: `apt-get install wrk` (falling back to bench.httpload)"


@dataclass(frozen=True)
class Throughput:
    """One load run: requests per second and latency percentiles."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    tool: str
    server_cpu_us: float = math.nan  # server CPU time per request, when measured

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def wrk_path() -> str | None:
    """wrk's path; None when missing or when BENCH_LOAD_GENERATOR=python asks for the fallback."""
    if os.environ.get("BENCH_LOAD_GENERATOR", "").lower() == "python":
        return None
    return shutil.which("wrk")


# wrk's `done()` hook writes the run's figures as JSON (wrk's own numbers, in
# microseconds), so nothing is read back from its human-readable report.
DONE_HOOK = """
done = function(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(%s, "w"))
  out:write(string.format(
    '{"requests": %%d, "duration_us": %%d, "p50_us": %%.3f, "p99_us": %%.3f, '
    .. '"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
  out:close()
end
"""


def parse_wrk_json(text: str) -> Throughput:
    """The figures `DONE_HOOK` wrote: req/s, p50, p99, and every kind of error.

    `status` counts answers that are not 2xx or 3xx; the others are socket errors.
    """
    data = json.loads(text)
    errors = sum(int(data[kind]) for kind in ("connect", "read", "write", "status", "timeout"))
    seconds = float(data["duration_us"]) / 1e6
    requests = int(data["requests"])
    return Throughput(
        rps=requests / seconds if seconds > 0 else 0.0,
        p50_ms=float(data["p50_us"]) / 1000.0,
        p99_ms=float(data["p99_us"]) / 1000.0,
        requests=requests,
        errors=errors,
        tool="wrk",
    )


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    url: str,
    *,
    headers: dict[str, str],
    duration: float,
    connections: int,
    threads: int,
    workdir: Path,
    name: str,
    cpus: set[int] | None = None,
) -> Throughput:
    """wrk against `url`; a Lua script sets the headers (once, no per-request hook) and
    writes the results as JSON when the run is done. `cpus`: the CPUs wrk may run on."""
    binary = wrk_path()
    assert binary is not None
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / f"{name}.lua"
    result = workdir / f"{name}.wrk.json"
    result.unlink(missing_ok=True)
    script.write_text(
        "".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}\n" for k, v in headers.items())
        + DONE_HOOK % _lua_string(str(result))
    )
    seconds = max(1, round(duration))
    proc = subprocess.run(
        [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    (workdir / f"{name}.wrk.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_wrk_json(result.read_text())


def run_python(
    url: str,
    *,
    headers: dict[str, str],
    duration: float,
    connections: int,
    workdir: Path,
    name: str,
) -> Throughput:
    """The same measurement with bench.httpload (closed loop): slower client, same shape."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    t0 = time.monotonic() + 0.5
    spec = {
        "mode": "steady",
        "host": parts.hostname,
        "port": parts.port,
        "paths": [path],
        "headers": headers,
        "connections": min(connections, 32),
        "interval": 0.0,
        "t0": t0,
        "duration": duration,
    }
    result = run_load(spec, workdir, name, timeout=duration + 60)
    ok = frozenset({200, 304})
    return Throughput(
        rps=result.count / duration,
        p50_ms=percentile(result.latency_ms, 50),
        p99_ms=percentile(result.latency_ms, 99),
        requests=result.count,
        errors=result.failures(ok),
        tool="python",
    )


def throughput(
    url: str,
    *,
    headers: dict[str, str],
    duration: float,
    workdir: Path,
    name: str,
    connections: int = 64,
    threads: int = 2,
    cpus: set[int] | None = None,
) -> Throughput:
    """wrk when installed (on `cpus` when given), else the Python generator."""
    if wrk_path() is not None:
        return run_wrk(
            url,
            headers=headers,
            duration=duration,
            connections=connections,
            threads=threads,
            workdir=workdir,
            name=name,
            cpus=cpus,
        )
    return run_python(
        url,
        headers=headers,
        duration=duration,
        connections=connections,
        workdir=workdir,
        name=name,
    )
