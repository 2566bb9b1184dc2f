"""Child processes of the bench: started with an explicit environment, always stopped.

Every server the bench starts (API instances, reference apps, redis-server, the hung
TCP server) is registered in one `ProcessGroup`; leaving its `with` block stops them
all, on success and on failure alike (SIGTERM, then SIGKILL of the child's process
group after a grace period). Ports and processes come from `renderwatch.localproc`,
which the demo and the tests use too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from renderwatch.localproc import ServiceProcess, StartupError, free_port

__all__ = [
    "PYTHON",
    "REPO_ROOT",
    "Child",
    "ProcessGroup",
    "SpecRun",
    "StartupError",
    "base_env",
    "free_port",
    "group_cpu_seconds",
    "start_together",
    "wait_http",
    "wait_port",
]

PYTHON = sys.executable
REPO_ROOT = Path(__file__).resolve().parent.parent


def base_env(**overrides: str) -> dict[str, str]:
    """The parent's environment, minus settings the bench must control, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(overrides)
    return env


@dataclass
class Child:
    """One started process (a `renderwatch.localproc.ServiceProcess`) and its port."""

    name: str
    service: ServiceProcess
    port: int | None = None

    @property
    def proc(self) -> subprocess.Popen[Any]:
        assert self.service.popen is not None
        return self.service.popen

    @property
    def log(self) -> Path:
        return self.service.log_path

    def alive(self) -> bool:
        return self.service.alive()

    def tail(self, lines: int = 30) -> str:
        return self.service.tail(lines)


@dataclass
class ProcessGroup:
    """Starts children and stops every one of them on exit."""

    logdir: Path
    children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> Child:
        # Its own session (localproc): stopping it also stops uvicorn's worker processes.
        service = ServiceProcess(
            name,
            argv,
            env if env is not None else base_env(),
            self.logdir / f"{name}.log",
            cwd=REPO_ROOT,
        ).start()
        child = Child(name=name, service=service, port=port)
        self.children.append(child)
        return child

    def stop(self, child: Child, *, grace: float = 5.0) -> None:
        """Stop one child (and its process group); idempotent."""
        child.service.stop(grace)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def wait_port(child: Child, port: int, *, timeout: float = 30.0) -> None:
    """Wait until `port` accepts connections, or raise with the child's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupError(f"{child.name} exited early:\n{child.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise StartupError(f"{child.name} did not listen on {port} within {timeout}s:\n{child.tail()}")


def wait_http(child: Child, url: str, *, timeout: float = 30.0) -> None:
    """Wait until GET `url` answers 200, or raise with the child's log tail."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartupError(f"{child.name} exited early:\n{child.tail()}")
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise StartupError(
        f"{child.name} not ready at {url} within {timeout}s ({last}):\n{child.tail()}"
    )


def child_handshake(spec: dict[str, Any], *, poll: float = 0.005, timeout: float = 120.0) -> float:
    """In a child, once set up: say ready, wait for the parent's go, return its start time.

    The start time (`time.monotonic()`, system-wide on Linux) is chosen only when every
    child of a scenario is ready, so a slow start never eats into a measured window.
    """
    Path(spec["ready_path"]).write_text("ready")
    go = Path(spec["go_path"])
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the bench never said go")
        time.sleep(poll)
    return float(go.read_text())


class SpecRun:
    """`python -m MODULE SPEC.json OUT.json` started now; `wait()` returns OUT's JSON.

    Children that call `child_handshake` start together: `start_together(runs)`.
    """

    def __init__(self, module: str, spec: dict[str, Any], workdir: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.spec_path = workdir / f"{name}.spec.json"
        self.out_path = workdir / f"{name}.out.json"
        self.log_path = workdir / f"{name}.log"
        self.ready_path = workdir / f"{name}.ready"
        self.go_path = workdir / f"{name}.go"
        for stale in (self.out_path, self.ready_path, self.go_path):
            stale.unlink(missing_ok=True)
        spec = {**spec, "ready_path": str(self.ready_path), "go_path": str(self.go_path)}
        self.spec_path.write_text(json.dumps(spec))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", module, str(self.spec_path), str(self.out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=base_env(),
            )

    def wait(self, timeout: float) -> Any:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.name} ran over {timeout:.0f}s") from None
        if code != 0 or not self.out_path.exists():
            log = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{self.name} failed (exit {code}):\n{log}")
        return json.loads(self.out_path.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_path.exists():
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"{self.name} exited before it was ready:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s")
            time.sleep(0.01)

    def go(self, t0: float) -> None:
        tmp = self.go_path.with_suffix(".tmp")
        tmp.write_text(repr(t0))
        tmp.replace(self.go_path)  # atomic: the child never reads half a number


def start_together(runs: Sequence[SpecRun], *, lead: float = 0.2, timeout: float = 120.0) -> float:
    """Wait until every run is ready, then start them all at one time `t0` (returned)."""
    for run in runs:
        run.wait_ready(timeout)
    t0 = time.monotonic() + lead
    for run in runs:
        run.go(t0)
    return t0


_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process of a process group.

    Children are started in their own session, so a server's group is its uvicorn
    master and workers. CPU per request is steadier than req/s on a shared machine:
    it does not count the time the server waited for a core.
    """
    total = 0
    for _, fields in _group_processes(pgid):
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def _group_processes(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """(/proc/PID, the stat fields after the command name) of each live process of a
    process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start at ")".
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            yield stat.parent, fields


def can_pin() -> bool:
    """Whether the hot path puts the server on one CPU and the load on another: asked for
    with BENCH_PIN=1, and possible. Off by default: on this 2-core VM, wrk and Redis
    sharing one core slowed (c) more than (b) (README "Performance")."""
    return (
        os.environ.get("BENCH_PIN") == "1"
        and hasattr(os, "sched_setaffinity")
        and len(os.sched_getaffinity(0)) >= 2
    )


def pin_group(pgid: int, cpus: set[int]) -> int:
    """Move every thread of every process of a process group onto `cpus` (threads they
    start later inherit it); returns how many threads moved."""
    moved = 0
    for process, _ in _group_processes(pgid):
        for task in (process / "task").glob("[0-9]*"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(task.name), cpus)
                moved += 1
    return moved
