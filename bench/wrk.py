"""Throughput with wrk (a separate C process), or the Python generator when wrk is missing."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.httpload import run_load
from bench.stats import percentile

WRK_INSTALL_HINT = "wrk is not installed: `apt-get install wrk` (falling back to bench.httpload)"

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


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


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unparseable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Throughput:
    """Read req/s, p50, p99 and the error counts out of `wrk --latency` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = 0
    non_ok = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_ok:
        errors += int(non_ok.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(part) for part in sock.groups())
    return Throughput(rps=rps, p50_ms=p50, p99_ms=p99, requests=total, errors=errors, tool="wrk")


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
) -> Throughput:
    """wrk against `url`; headers go in through a Lua script (set once, no per-request hook)."""
    binary = wrk_path()
    assert binary is not None
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / f"{name}.lua"
    script.write_text(
        "".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}\n" for k, v in headers.items())
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
    )
    (workdir / f"{name}.wrk.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_wrk(proc.stdout)


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
) -> Throughput:
    """wrk when installed, else the Python generator."""
    if wrk_path() is not None:
        return run_wrk(
            url,
            headers=headers,
            duration=duration,
            connections=connections,
            threads=threads,
            workdir=workdir,
            name=name,
        )
    return run_python(
        url,
        headers=headers,
        duration=duration,
        connections=connections,
        workdir=workdir,
        name=name,
    )
