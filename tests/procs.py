"""Real processes for tests: Celery workers, beat, and private redis-server instances.

Each process runs from the repository root with the virtualenv's `celery`, writes its
output to a log file under the test's tmp_path, and is stopped with SIGTERM, then
SIGKILL of its whole process group on timeout. When the body of one of the context
managers raises (a failed assertion included), the logs are printed so that pytest
shows them with the failure.

    with celery_worker(settings_env(settings), tmp_path, queue=settings.celery_queue) as w:
        ...
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
CELERY = Path(sys.executable).parent / "celery"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "it"
) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def settings_env(settings: Settings, **extra: object) -> dict[str, str]:
    """Environment for a child process: every setting explicit, so no `.env` leaks in."""
    env = {
        key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields
    }
    env.update(settings.as_environment())
    for name, value in extra.items():
        env[name.upper()] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServiceProcess:
    """A child process with its log file; its own session, so its group can be killed."""

    def __init__(self, name: str, args: Sequence[str | Path], env: Mapping[str, str], log: Path):
        self.name = name
        self.args = [str(a) for a in args]
        self.env = dict(env)
        self.log_path = log
        self._log_file: IO[bytes] | None = None
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def start(self) -> ServiceProcess:
        self._log_file = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, *, timeout: float, start: int = 0) -> re.Match[str]:
        """Wait until the log (from character `start`) matches `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log(), start)
            if match:
                return match
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited ({self.popen and self.popen.returncode}) "
                    f"before its log matched {pattern!r}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} in its log after {timeout}s")
            time.sleep(0.05)

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
        """SIGTERM (warm shutdown), then SIGKILL to the process group; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"--- {self.name} ignored SIGTERM for {timeout}s: SIGKILL", flush=True)
                self._kill_group()
                self.popen.wait(10)
        # Children left behind by a killed parent belong to the same group.
        self._kill_group()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.popen.returncode

    def _kill_group(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def dump(self) -> None:
        print(f"\n----- log of {self.name} ({self.log_path}) -----\n{self.log()}", flush=True)


@contextmanager
def running(proc: ServiceProcess, ready: Callable[[ServiceProcess], object]) -> Iterator[Any]:
    """Start `proc`, wait for `ready`, yield it; print its log if anything fails; stop it."""
    proc.start()
    try:
        ready(proc)
        yield proc
    except BaseException:
        proc.stop()
        proc.dump()
        raise
    finally:
        proc.stop()


def celery_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    queue: str,
    concurrency: int = 1,
    pool: str = "prefork",
    name: str | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT,
) -> Any:
    """A context manager running `celery -A worker.app worker` on `queue` until exit."""
    name = name or f"w-{uuid.uuid4().hex[:8]}"
    args: list[str | Path] = [
        CELERY, "-A", "worker.app", "worker",
        "-P", pool, "-c", str(concurrency), "-E", "-Q", queue,
        "--without-mingle", "--without-gossip",
        "-n", f"{name}@%h", "-l", "INFO",
        *extra_args,
    ]  # fmt: skip
    proc = ServiceProcess(f"worker {name}", args, env, log_dir / f"worker-{name}.log")
    # "<name>@<host> ready." is logged once the consumer listens on the queue.
    return running(proc, lambda p: p.wait_for_log(r"@\S+ ready\.", timeout=ready_timeout))


def celery_beat(
    env: Mapping[str, str], log_dir: Path, *, ready_timeout: float = READY_TIMEOUT
) -> Any:
    """A context manager running `celery -A worker.app beat` with a private schedule file."""
    tag = uuid.uuid4().hex[:8]
    args: list[str | Path] = [
        CELERY, "-A", "worker.app", "beat",
        "-s", str(log_dir / f"beat-{tag}-schedule"),
        "--pidfile", str(log_dir / f"beat-{tag}.pid"),
        "-l", "INFO",
    ]  # fmt: skip
    proc = ServiceProcess(f"beat {tag}", args, env, log_dir / f"beat-{tag}.log")
    return running(proc, lambda p: p.wait_for_log(r"beat: Starting", timeout=ready_timeout))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@contextmanager
def private_redis(log_dir: Path, *, attempts: int = 5) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL.

    Used as the Celery broker so that tests with short visibility timeouts never touch
    the messages (or kombu's global unacked index) of anyone sharing the main Redis.
    """
    binary = redis_server_binary()
    assert binary is not None, "redis-server is not installed"
    last_log = ""
    for _ in range(attempts):
        port = free_port()
        data = log_dir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(data),
        ]  # fmt: skip
        proc = ServiceProcess(f"redis-server :{port}", args, os.environ, data / "redis.log")
        proc.start()
        try:
            proc.wait_for_log(r"Ready to accept connections", timeout=10)
        except AssertionError:
            last_log = proc.log()
            proc.stop()
            continue  # most likely someone took the port in between: try another
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.stop()
        return
    raise AssertionError(f"could not start a private redis-server:\n{last_log}")


def api_server(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    port: int | None = None,
    workers: int = 1,
    ready_timeout: float = READY_TIMEOUT,
) -> Any:
    """A context manager running `python -m api` (the compose command) on a free port.

    Yields the `ServiceProcess`; its `base_url` attribute is the server's address.
    """
    port = port or free_port()
    child_env = {**env, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_WORKERS": str(workers)}
    proc = ServiceProcess(
        f"api :{port}", [sys.executable, "-m", "api"], child_env, log_dir / f"api-{port}.log"
    )
    proc.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]

    def healthy(p: ServiceProcess) -> None:
        import httpx

        def answers() -> bool:
            if not p.alive():
                raise AssertionError(f"{p.name} exited before answering /healthz")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout=ready_timeout, interval=0.1, what=f"{p.name} /healthz")

    return running(proc, healthy)
