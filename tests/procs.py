"""Real processes for tests: Celery workers, beat, API servers, private redis-server.

Ports, the private redis-server and the process class come from `renderwatch.localproc`
(shared with the demo and the bench); the old names here stay as re-exports. Each
process runs from the repository root with the virtualenv's `celery`, writes its output
to a log file under the test's tmp_path, and is stopped with SIGTERM, then SIGKILL of
its whole process group (and any descendant that left it) on timeout. When the body of
one of the context managers raises (a failed assertion included), the logs are printed
so that pytest shows them with the failure.

    with celery_worker(settings_env(settings), tmp_path, queue=settings.celery_queue) as w:
        ...
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from renderwatch import localproc
from renderwatch.localproc import ServiceProcess, free_port, redis_server_binary, wait_until
from shared.settings import Settings

__all__ = [
    "CELERY",
    "REPO_ROOT",
    "ServiceProcess",
    "api_server",
    "celery_beat",
    "celery_worker",
    "free_port",
    "private_redis",
    "redis_server_binary",
    "running",
    "settings_env",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CELERY = Path(sys.executable).parent / "celery"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


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


@contextmanager
def private_redis(log_dir: Path, *, attempts: int = 5) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL.

    Used as the Celery broker so that tests with short visibility timeouts never touch
    the messages (or kombu's global unacked index) of anyone sharing the main Redis.
    """
    with localproc.private_redis(log_dir, attempts=attempts) as server:
        yield server.url


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
