"""Local processes for the demo, the benchmarks and every test suite.

One place for what all three need: a free loopback port, a private `redis-server`,
a private PostgreSQL database, and child processes that are stopped together with
everything they started.

- Ports come from `port_for`: it picks outside the kernel's ephemeral range, so an
  outgoing connection (a Redis or PostgreSQL client) cannot take the port between
  the choice and the server's bind, which `bind(("", 0))` does not promise.
- Processes run under `mirakuru` executors: each child gets its own session (so its
  process group can be signalled) and an environment marker, by which `mirakuru` also
  finds and kills descendants that left the group (a daemonised grandchild).
- `ServiceProcess` adds what the services here need on top: the output in a log file,
  waiting for a line in it, a warm stop (SIGTERM to the leader only: Celery and uvicorn
  then stop their own children) before the group is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import port_for
from mirakuru import SimpleExecutor, TCPExecutor
from mirakuru.base import ENV_UUID, cleanup_subprocesses
from mirakuru.exceptions import AlreadyRunning, ProcessExitedWithError, TimeoutExpired

# mirakuru's exit hook kills every process whose marker merely *contains* this
# process's PID as text (PID 345 matches another run's "12345:..."). On a machine
# where other test runs and agents start processes too, that may hit processes that
# are not ours; ours are stopped explicitly (and when their executor is collected).
atexit.unregister(cleanup_subprocesses)

__all__ = [
    "RedisServer",
    "ServiceProcess",
    "StartupError",
    "free_port",
    "private_database",
    "private_redis",
    "redis_server_argv",
    "redis_server_binary",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 20.0


class StartupError(RuntimeError):
    """A local process did not become ready; the message says where its log is."""


def free_port() -> int:
    """A loopback TCP port that is free now, outside the ephemeral range (see module doc)."""
    return int(port_for.select_random())


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "it"
) -> Any:
    """Poll `predicate` until it returns something truthy (returned); raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- child processes ----------------------------------------------------------------------


class _Executor(SimpleExecutor):
    """A mirakuru executor whose child sees exactly `env` (plus mirakuru's marker)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(list(argv), **kwargs)
        self._exact_env = dict(env)

    @property
    def envvars(self) -> dict[str, str]:
        return {**self._exact_env, ENV_UUID: self._uuid}

    def kill_group(self) -> None:
        """SIGKILL the process group and every marked descendant, then forget the process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.process is not None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._kill_all_kids(signal.SIGKILL)
        # Forgotten, so that the executor's __del__ (which kills) has nothing left to do.
        self._clear_process()


class ServiceProcess:
    """A child process with its log file, in its own session; see the module doc."""

    def __init__(
        self,
        name: str,
        args: Sequence[str | Path],
        env: Mapping[str, str],
        log: Path,
        *,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.env = dict(env)
        self.log_path = log
        self.cwd = cwd
        self.popen: subprocess.Popen[Any] | None = None
        self._log_file: IO[bytes] | None = None
        self._executor: _Executor | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self._executor = _Executor(
            self.args,
            self.env,
            cwd=str(self.cwd),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self._executor.start()
        self.popen = self._executor.process
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, *, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until the log (from character `start`) matches `pattern`."""
        regex = re.compile(pattern)

        def matched() -> re.Match[str] | None:
            match = regex.search(self.log(), start)
            if match is None and not self.alive():
                raise StartupError(
                    f"{self.name} exited ({self.popen and self.popen.returncode}) "
                    f"before its log matched {pattern!r} (log: {self.log_path})"
                )
            return match

        try:
            result: re.Match[str] = wait_until(matched, timeout=timeout, what=f"{pattern!r}")
        except StartupError as exc:
            raise StartupError(f"{self.name}: {exc} (log: {self.log_path})") from None
        return result

    def child_pids(self) -> list[int]:
        """Direct children (e.g. prefork pool processes), read from /proc."""
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command: state, ppid, ...
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.pid:
                children.append(int(entry.name))
        return sorted(children)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM to the leader (warm shutdown), then SIGKILL to what is left; exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"--- {self.name} ignored SIGTERM for {timeout}s: SIGKILL", flush=True)
        # Children left behind by a killed parent: the group, and any that left it.
        self.kill_group()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.popen.returncode

    def kill_group(self) -> None:
        if self._executor is not None:
            self._executor.kill_group()

    def dump(self) -> None:
        print(f"\n----- log of {self.name} ({self.log_path}) -----\n{self.log()}", flush=True)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a private redis-server -------------------------------------------------------------------


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def redis_server_argv(
    binary: str, port: int, workdir: Path, *extra: str, logfile: Path | None = None
) -> list[str]:
    """A throw-away redis-server: loopback only, no persistence, files under `workdir`."""
    argv = [
        binary, "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    if logfile is not None:
        argv += ["--logfile", str(logfile)]
    return [*argv, *extra]


@dataclass
class RedisServer:
    """A private `redis-server` on a free loopback port; `stop()` and `start()` keep the port.

    Never the shared Redis: tests and the bench pause, freeze and kill this one.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    binary: str | None = None  # default: `redis-server` on PATH
    executor: TCPExecutor | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def process(self) -> subprocess.Popen[Any] | None:
        return self.executor.process if self.executor is not None else None

    def start(self, timeout: float = 10.0) -> None:
        binary = self.binary or redis_server_binary()
        if binary is None:
            raise StartupError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = redis_server_argv(binary, self.port, self.workdir, *self.extra_args)
        argv += ["--logfile", str(self.logfile)]
        self.executor = TCPExecutor(
            argv,
            host="127.0.0.1",
            port=self.port,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        try:
            self.executor.start()
        except (TimeoutExpired, AlreadyRunning, ProcessExitedWithError) as exc:
            with contextlib.suppress(ProcessLookupError, OSError):
                self.executor.kill()
            self.executor = None
            raise StartupError(
                f"a private redis-server on port {self.port} did not start "
                f"({type(exc).__name__}; see {self.logfile})"
            ) from None

    def stop(self) -> None:
        """Clean shutdown (SIGTERM to its group); the port then refuses connections."""
        executor, self.executor = self.executor, None
        if executor is not None and executor.process is not None:
            with contextlib.suppress(ProcessExitedWithError):
                executor.stop()

    def kill(self) -> None:
        """SIGKILL: the server dies without a word, as in a crash."""
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.kill()

    def admin(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a private PostgreSQL database -------------------------------------------------------------


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextlib.contextmanager
def private_database(
    admin_url: str, prefix: str = "rw", *, migrate: bool = True, owner: str | None = None
) -> Iterator[str]:
    """A fresh PostgreSQL database (migrated unless told not to); dropped on the way out.

    `admin_url` is a SQLAlchemy or libpq URL of a role that may create databases;
    the yielded URL is the same server and credentials with the new database name.
    """
    import psycopg

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    owner_clause = f' OWNER "{owner}"' if owner else ""
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{owner_clause}')
    url = f"{admin_url.rsplit('/', 1)[0]}/{name}"
    try:
        if migrate:
            from renderwatch.migrate import upgrade

            upgrade(url)
        yield url
    finally:
        with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def private_redis(
    workdir: Path, *, attempts: int = 5, extra_args: Sequence[str] = ()
) -> Iterator[RedisServer]:
    """A started `RedisServer` under `workdir`, stopped on the way out.

    A port can still be taken between its choice and the server's bind (by another
    agent's server): then a new port is tried, up to `attempts` times.
    """
    last: StartupError | None = None
    for _ in range(attempts):
        server = RedisServer(workdir / f"redis-{uuid.uuid4().hex[:6]}", extra_args=extra_args)
        try:
            server.start()
        except StartupError as exc:
            last = exc
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    raise StartupError(f"could not start a private redis-server: {last}")
