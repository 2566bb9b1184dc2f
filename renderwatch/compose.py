"""docker-compose.yml, the one source of truth for service commands, and a local runner for it.

`load_services` reads the file with compose's variable interpolation. `Stack` runs the
services of our image (the one-shot migrate, which builds it, and api, worker, beat,
flower, which use it) as local processes, with the commands and environment *from the
file*, overridden by the mapping it is given and with every setting left to the caller
(see `load_document`'s `supplied`); services of other images (redis, postgres) are not
started: the machine's own servers stand in for them. `renderwatch up` (`up()`) runs
the app services in the foreground this way, with each output line prefixed by its
service's name.

Each process runs in its own process group (uvicorn and Celery fork children), logs to
`<log_dir>/<service>.log`, and is stopped with SIGTERM to the group, then SIGKILL after
a grace period.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TextIO

import yaml
from pydantic import ValidationError

from shared.settings import REPO_ROOT, Settings

logger = logging.getLogger(__name__)

DEFAULT_COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
APP_SERVICES = ("api", "worker", "beat", "flower")
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
LOG_TAIL_LINES = 40

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Longest operators first, so ":-" is never read as ":" followed by "-".
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class ComposeError(ValueError):
    """The compose file is malformed, or a required variable has no value."""


# --------------------------------------------------------------------------- interpolation


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose variable interpolation: `$VAR`, `${VAR}`, `${VAR:-d}`, `${VAR-d}`, `:?`, `:+`, `$$`.

    Defaults may themselves hold variables (`${A:-${B}}`); `$$` is a literal `$`.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < n else ""
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            value, i = _braced(text, i + 2, env)
            out.append(value)
        else:
            match = _NAME.match(text, i + 1)
            if match is None:
                raise ComposeError(f"invalid interpolation format in {text!r}: write '$$' for '$'")
            out.append(env.get(match.group(), ""))
            i = match.end()
    return "".join(out)


def _braced(text: str, start: int, env: Mapping[str, str]) -> tuple[str, int]:
    """Evaluate `${...}` whose body starts at `start`; returns (value, index after `}`)."""
    match = _NAME.match(text, start)
    if match is None:
        raise ComposeError(f"invalid interpolation format in {text!r}: bad variable name")
    name, pos = match.group(), match.end()
    if text.startswith("}", pos):
        return env.get(name, ""), pos + 1
    op = next((o for o in _OPERATORS if text.startswith(o, pos)), None)
    if op is None:
        raise ComposeError(f"invalid interpolation format in {text!r}: after ${{{name}")
    word_start = pos + len(op)
    end = _closing_brace(text, word_start)
    word = text[word_start:end]
    value = env.get(name)
    is_set = value is not None
    non_empty = bool(value)
    if op in (":-", "-"):
        use_default = not non_empty if op == ":-" else not is_set
        result = interpolate(word, env) if use_default else (value or "")
    elif op in (":?", "?"):
        if not non_empty if op == ":?" else not is_set:
            message = interpolate(word, env) or "it must be set"
            raise ComposeError(f"required variable {name} is missing a value: {message}")
        result = value or ""
    else:  # ":+" / "+": the alternative when set
        use_alt = non_empty if op == ":+" else is_set
        result = interpolate(word, env) if use_alt else ""
    return result, end + 1


def _closing_brace(text: str, pos: int) -> int:
    depth = 0
    while pos < len(text):
        if text.startswith("$$", pos):
            pos += 2
            continue
        if text.startswith("${", pos):
            depth += 1
            pos += 2
            continue
        if text[pos] == "}":
            if depth == 0:
                return pos
            depth -= 1
        pos += 1
    raise ComposeError(f"invalid interpolation format in {text!r}: unterminated '${{'")


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    # Values only: compose never interpolates mapping keys.
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


# --------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class Service:
    """One compose service, interpolated and normalised.

    `healthcheck` is the compose `test` (`["CMD", ...]` or `["CMD-SHELL", "..."]`), None
    when there is none; `depends_on` maps a service name to its condition.
    """

    name: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str] | None
    depends_on: dict[str, str]
    image: str | None = None
    build: bool = False
    restart: str | None = None
    our_image: bool = False  # runs the image another service of the file builds

    @property
    def local(self) -> bool:
        """Runs our image (builds it, or uses the one built), so runnable as a local process."""
        return self.build or self.our_image

    def healthcheck_argv(self) -> list[str] | None:
        """The healthcheck as a local argv (CMD-SHELL runs through /bin/sh)."""
        if not self.healthcheck:
            return None
        kind, *rest = self.healthcheck
        if kind == "CMD":
            return rest
        if kind == "CMD-SHELL":
            return ["/bin/sh", "-c", " ".join(rest)]
        raise ComposeError(f"{self.name}: healthcheck test must start with CMD or CMD-SHELL")


def load_document(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    supplied: Collection[str] = (),
) -> dict[str, Any]:
    """The whole compose file as a mapping, every string value interpolated against `env`.

    `supplied`: environment variables a local run sets itself (its settings). Their
    values in the services of our image are dropped before interpolation, and the
    environment of image-only services (redis, postgres: not run locally) is not read,
    so a `${SECRET:?message}` that guards a container deployment does not stop a local
    run that never uses the file's value.
    """
    path = path or DEFAULT_COMPOSE_FILE
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ComposeError(f"{path.name}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise ComposeError(f"{path.name}: needs a top-level 'services' mapping")
    if supplied:
        raw = _for_local_run(raw, frozenset(supplied))
    document: dict[str, Any] = _interpolate_tree(raw, env)
    return document


def _built_images(services: Mapping[str, Any]) -> set[str]:
    return {
        str(spec["image"])
        for spec in services.values()
        if isinstance(spec, dict) and "build" in spec and spec.get("image") is not None
    }


def _for_local_run(raw: dict[str, Any], supplied: frozenset[str]) -> dict[str, Any]:
    built = _built_images(raw["services"])
    services: dict[str, Any] = {}
    for name, spec in raw["services"].items():
        if not isinstance(spec, dict):
            services[name] = spec
            continue
        spec = dict(spec)  # anchors share mappings between services: never edit in place
        environment = spec.get("environment")
        if "build" not in spec and spec.get("image") not in built:
            spec.pop("environment", None)
        elif isinstance(environment, dict):
            spec["environment"] = {k: v for k, v in environment.items() if k not in supplied}
        elif isinstance(environment, list):
            spec["environment"] = [
                e for e in environment if str(e).partition("=")[0] not in supplied
            ]
        services[name] = spec
    # `x-` extension fields are only anchors here: their copies in the services count.
    kept = {key: value for key, value in raw.items() if not str(key).startswith("x-")}
    return {**kept, "services": services}


def load_services(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    supplied: Collection[str] = (),
) -> dict[str, Service]:
    """The services of the compose file (default: the repo's docker-compose.yml).

    `supplied`: see `load_document`.
    """
    env = os.environ if env is None else env
    document = load_document(path, env, supplied=supplied)
    built = _built_images(document["services"])
    services: dict[str, Service] = {}
    for name, spec in document["services"].items():
        if not isinstance(spec, dict):
            raise ComposeError(f"service {name!r}: must be a mapping")
        services[name] = _service(str(name), spec, env, built)
    for service in services.values():
        for dep, condition in service.depends_on.items():
            if dep not in services:
                raise ComposeError(f"{service.name}: depends on unknown service {dep!r}")
            if condition not in CONDITIONS:
                raise ComposeError(f"{service.name}: unknown depends_on condition {condition!r}")
    return services


def _service(
    name: str, spec: dict[str, Any], env: Mapping[str, str], built: Collection[str] = ()
) -> Service:
    restart = spec.get("restart")
    image = spec.get("image")
    return Service(
        name=name,
        command=_command(name, spec.get("command")),
        environment=_environment(name, spec.get("environment"), env),
        healthcheck=_healthcheck(name, spec.get("healthcheck")),
        depends_on=_depends_on(name, spec.get("depends_on")),
        image=str(image) if image is not None else None,
        build="build" in spec,
        restart=str(restart) if restart is not None else None,
        our_image="build" not in spec and image is not None and str(image) in built,
    )


def _command(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(part) for part in value]
    raise ComposeError(f"{name}: command must be a string or a list")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _environment(name: str, value: Any, env: Mapping[str, str]) -> dict[str, str]:
    result: dict[str, str] = {}
    if value is None:
        return result
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for entry in value:
            key, sep, val = str(entry).partition("=")
            items.append((key, val if sep else None))
    else:
        raise ComposeError(f"{name}: environment must be a mapping or a list")
    for key, val in items:
        if val is None:
            # A bare name passes the caller's value through, as compose does.
            if str(key) in env:
                result[str(key)] = env[str(key)]
        else:
            result[str(key)] = _scalar(val)
    return result


def _healthcheck(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ComposeError(f"{name}: healthcheck must be a mapping")
    if value.get("disable"):
        return None
    test = value.get("test")
    if test is None:
        return None
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    if not isinstance(test, list) or not test:
        raise ComposeError(f"{name}: healthcheck test must be a string or a non-empty list")
    parts = [str(part) for part in test]
    if parts[0] == "NONE":
        return None
    if parts[0] not in ("CMD", "CMD-SHELL"):
        raise ComposeError(f"{name}: healthcheck test must start with CMD, CMD-SHELL or NONE")
    return parts


def _depends_on(name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):
        return {str(dep): "service_started" for dep in value}
    if isinstance(value, dict):
        result: dict[str, str] = {}
        for dep, spec in value.items():
            condition = spec.get("condition", "service_started") if isinstance(spec, dict) else None
            if condition is None:
                raise ComposeError(f"{name}: depends_on.{dep} must be a mapping")
            result[str(dep)] = str(condition)
        return result
    raise ComposeError(f"{name}: depends_on must be a list or a mapping")


def start_order(
    services: Mapping[str, Service], wanted: Sequence[str], *, first: Collection[str] = ()
) -> list[str]:
    """`wanted` and everything they depend on, dependencies first, cycle-checked.

    Among services whose dependencies are met, those in `first` (the one-shots) go first,
    so that e.g. migrations run before anything that does not strictly wait for them.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name not in services:
            raise ComposeError(f"unknown service {name!r}; the file has {sorted(services)}")
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ComposeError("dependency cycle: " + " -> ".join((*path, name)))
        state[name] = "visiting"
        for dep in services[name].depends_on:
            visit(dep, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    # Kahn's algorithm over the acyclic closure; ties keep the depth-first order.
    rank = {name: (name not in first, index) for index, name in enumerate(order)}
    pending = {name: set(services[name].depends_on) for name in order}
    result: list[str] = []
    while pending:
        ready = min((n for n, deps in pending.items() if not deps), key=rank.__getitem__)
        result.append(ready)
        del pending[ready]
        for deps in pending.values():
            deps.discard(ready)
    return result


# --------------------------------------------------------------------------- the runner


def venv_bin() -> Path:
    """The project virtualenv's bin dir (the one the services' programs come from)."""
    candidate = REPO_ROOT / ".venv" / "bin"
    return candidate if candidate.is_dir() else Path(sys.executable).parent


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Process:
    service: Service
    popen: subprocess.Popen[bytes]
    log_path: Path
    reader: threading.Thread
    one_shot: bool
    stopped: bool = False


@dataclass
class _Echo:
    stream: TextIO
    width: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, service: str, line: str) -> None:
        with self.lock:
            self.stream.write(f"{service:<{self.width}} | {line}")
            if not line.endswith("\n"):
                self.stream.write("\n")
            self.stream.flush()


_LIVE_STACKS: weakref.WeakSet[Stack] = weakref.WeakSet()


@atexit.register
def _stop_live_stacks() -> None:
    # A test session or `renderwatch up` that dies on an exception must not leave
    # servers holding ports behind it.
    for stack in list(_LIVE_STACKS):
        stack.stop()


class Stack:
    """Runs compose services as local processes; a context manager (`start` / `stop`).

    The services' commands and environment come from the compose file; `env` overrides
    the file's environment and feeds its interpolation (on top of `os.environ`).
    """

    def __init__(
        self,
        services: Sequence[str],
        env: Mapping[str, str],
        *,
        compose_file: Path | None = None,
        log_dir: Path | None = None,
        echo: TextIO | None = None,
        grace_seconds: float = 10.0,
        start_timeout: float = 120.0,
        check_interval: float = 0.5,
        check_timeout: float = 15.0,
    ) -> None:
        self._overrides = {key: str(value) for key, value in env.items()}
        self._lookup = {**os.environ, **self._overrides}
        # Every setting comes from the caller (its Settings: environment or .env), never
        # from the file's container values (hosts `redis`/`postgres`, required secrets).
        supplied = {*self._overrides, *(name.upper() for name in Settings.model_fields)}
        self.services = load_services(compose_file, self._lookup, supplied=supplied)
        self._one_shots = {
            dep
            for service in self.services.values()
            for dep, condition in service.depends_on.items()
            if condition == "service_completed_successfully"
        }
        order = start_order(self.services, list(services), first=self._one_shots)
        self.plan = [name for name in order if self.services[name].local]
        self.skipped = [name for name in order if not self.services[name].local]
        if log_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="renderwatch-stack-"
            )
            log_dir = Path(self._tmp.name)
        else:
            self._tmp = None
            log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._echo = (
            _Echo(echo, max((len(name) for name in self.plan), default=0)) if echo else None
        )
        self._grace = grace_seconds
        self._start_timeout = start_timeout
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._procs: dict[str, _Process] = {}
        self._healthy: set[str] = set()
        self._lock = threading.Lock()

    # -- lifecycle

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the planned services in dependency order; one-shot deps run to completion first."""
        if self._procs:
            raise RuntimeError("this stack was started already; build a new Stack to rerun it")
        _LIVE_STACKS.add(self)
        for name in self.skipped:
            logger.info("%s: image-only service, not started locally (using the machine's)", name)
        try:
            for name in self.plan:
                service = self.services[name]
                self._await_dependencies(service)
                self._spawn(service, one_shot=name in self._one_shots)
                if name in self._one_shots:
                    self._run_to_completion(name)
        except BaseException:
            self.stop()
            raise

    def _await_dependencies(self, service: Service) -> None:
        for dep, condition in service.depends_on.items():
            if dep not in self._procs:
                continue  # not ours to run (redis/postgres): the machine's server stands in
            if condition == "service_healthy":
                self._wait_one(dep, time.monotonic() + self._start_timeout)

    def _environment(self, service: Service) -> dict[str, str]:
        env = {**os.environ, **service.environment, **self._overrides}
        env["PATH"] = os.pathsep.join(filter(None, [str(venv_bin()), env.get("PATH", "")]))
        return env

    def _resolve(self, argv: list[str], env: Mapping[str, str], what: str) -> list[str]:
        if not argv:
            raise ComposeError(f"{what}: no command in the compose file")
        program = shutil.which(argv[0], path=env.get("PATH"))
        if program is None:
            raise ComposeError(f"{what}: {argv[0]!r} not found on PATH (is .venv synced?)")
        return [program, *argv[1:]]

    def _spawn(self, service: Service, *, one_shot: bool) -> None:
        env = self._environment(service)
        argv = self._resolve(service.command, env, service.name)
        log_path = self.log_dir / f"{service.name}.log"
        log_path.write_bytes(b"")
        logger.info("%s: starting %s", service.name, shlex.join(service.command))
        popen = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals the whole tree
        )
        assert popen.stdout is not None
        reader = threading.Thread(
            target=self._pump,
            args=(service.name, popen.stdout, log_path),
            name=f"stack-log-{service.name}",
            daemon=True,
        )
        reader.start()
        self._procs[service.name] = _Process(service, popen, log_path, reader, one_shot)

    def _pump(self, name: str, stream: IO[bytes], log_path: Path) -> None:
        with log_path.open("ab") as log:
            for line in iter(stream.readline, b""):
                log.write(line)
                log.flush()
                if self._echo is not None:
                    self._echo.write(name, line.decode("utf-8", "replace"))
        stream.close()

    def _run_to_completion(self, name: str) -> None:
        proc = self._procs[name]
        code = _wait_exit(proc.popen, self._start_timeout)
        if code is None:
            raise RuntimeError(
                f"{name}: one-shot service did not finish within {self._start_timeout:.0f}s\n"
                + self._log_tail(name)
            )
        self._finish(proc)
        if code != 0:
            raise RuntimeError(
                f"{name}: one-shot service exited with status {code}\n" + self._log_tail(name)
            )
        logger.info("%s: completed successfully", name)

    def _finish(self, proc: _Process) -> None:
        # The leader is still unreaped here, so its pid (= the group id) cannot have been
        # reused: SIGKILL reaches only our own stragglers (uvicorn/celery children).
        _signal_group(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()
        proc.reader.join(timeout=5)
        proc.stopped = True

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """Run each service's compose healthcheck until it passes; RuntimeError names a laggard."""
        deadline = time.monotonic() + timeout
        for name, proc in list(self._procs.items()):
            if not proc.one_shot:
                self._wait_one(name, deadline)

    def _wait_one(self, name: str, deadline: float) -> None:
        if name in self._healthy:
            return
        proc = self._procs[name]
        argv = proc.service.healthcheck_argv()
        env = self._environment(proc.service)
        last = "no healthcheck has run yet"
        while True:
            code = _exit_status(proc.popen)
            if code is not None:
                raise RuntimeError(
                    f"{name}: exited with status {code} before it was healthy\n"
                    + self._log_tail(name)
                )
            if argv is None:
                break  # no healthcheck declared: running is all compose would know
            ok, last = self._check(name, argv, env)
            if ok:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{name}: not healthy in time; last healthcheck said: {last}\n"
                    + self._log_tail(name)
                )
            time.sleep(self._check_interval)
        self._healthy.add(name)
        logger.info("%s: healthy", name)

    def _check(self, name: str, argv: list[str], env: Mapping[str, str]) -> tuple[bool, str]:
        try:
            argv = self._resolve(argv, env, f"{name} healthcheck")
            result = subprocess.run(
                argv,
                cwd=REPO_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self._check_timeout,
                check=False,
            )
        except ComposeError as exc:
            return False, str(exc)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {self._check_timeout:.0f}s"
        output = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
        return result.returncode == 0, f"exit {result.returncode}: {_tail(output, 5)}"

    def wait_any(self, poll_seconds: float = 0.5) -> tuple[str, int]:
        """Block until a long-running service exits; returns (name, exit status)."""
        while True:
            for name, proc in self._procs.items():
                code = _exit_status(proc.popen)
                if not proc.one_shot and code is not None:
                    return name, code
            time.sleep(poll_seconds)

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after the grace period; idempotent."""
        with self._lock:
            live = [proc for proc in self._procs.values() if not proc.stopped]
            for proc in reversed(live):
                _signal_group(proc.popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + self._grace
            for proc in live:
                if _wait_exit(proc.popen, max(0.0, deadline - time.monotonic())) is None:
                    logger.warning(
                        "%s: still running %.0fs after SIGTERM, killing it",
                        proc.service.name,
                        self._grace,
                    )
            for proc in live:
                self._finish(proc)
            _LIVE_STACKS.discard(self)

    # -- inspection

    def logs(self, service: str) -> str:
        """Everything the service has printed so far ("" if it never started)."""
        if service not in self.services:
            raise KeyError(service)
        proc = self._procs.get(service)
        if proc is None or not proc.log_path.exists():
            return ""
        return proc.log_path.read_bytes().decode("utf-8", "replace")

    def _log_tail(self, service: str) -> str:
        return f"--- last lines of {service}'s log ---\n{_tail(self.logs(service))}"

    def running(self) -> Iterator[str]:
        """Names of the services whose process is alive."""
        for name, proc in self._procs.items():
            if _exit_status(proc.popen) is None:
                yield name

    def pid(self, service: str) -> int:
        """The process id (= process group id) of a started service."""
        return self._procs[service].popen.pid


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, sig)


def _exit_status(popen: subprocess.Popen[bytes]) -> int | None:
    """The leader's exit status once it has exited, without reaping it (None while running).

    Leaving the zombie unreaped keeps its pid, which is also the process group id, from
    being reused by a stranger before `stop()` has signalled the group.
    """
    if popen.returncode is not None:
        return popen.returncode
    if not hasattr(os, "waitid"):  # macOS: no WNOWAIT; reaping is the only way to know
        return popen.poll()
    try:
        info = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return popen.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _wait_exit(popen: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Wait up to `timeout` seconds for the leader to exit (unreaped); None if it has not."""
    deadline = time.monotonic() + timeout
    while True:
        code = _exit_status(popen)
        if code is not None or time.monotonic() >= deadline:
            return code
        time.sleep(0.05)


# --------------------------------------------------------------------------- renderwatch up


def settings_environment(settings: Settings) -> dict[str, str]:
    """Every setting as the environment variable that sets it, so children see the same config."""
    return settings.as_environment()


def up(argv: list[str] | None = None) -> int:
    """`renderwatch up`: run api, worker, beat and flower in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="renderwatch up",
        description="Run the stack from docker-compose.yml as local processes, in the "
        "foreground, against REDIS_URL and DATABASE_URL from the environment or .env.",
    )
    parser.add_argument("services", nargs="*", default=list(APP_SERVICES))
    parser.add_argument("--compose-file", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to become healthy")
    args = parser.parse_args(argv)

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"renderwatch up: bad settings: {exc}", file=sys.stderr)
        return 2
    env = settings_environment(settings)
    # Flower's address is no setting of ours; on a developer's machine it stays on loopback.
    env["FLOWER_ADDRESS"] = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")
    env.update(local_flower_access(os.environ, env["FLOWER_ADDRESS"]))
    schedule_dir = REPO_ROOT / "var"
    schedule_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack = Stack(
            args.services,
            env,
            compose_file=args.compose_file,
            log_dir=REPO_ROOT / "var" / "log",
            echo=sys.stdout,
        )
    except ComposeError as exc:
        print(f"renderwatch up: {exc}", file=sys.stderr)
        return 2

    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        stack.start()
        stack.wait_healthy(args.timeout)
        _print_banner(settings, stack)
        name, code = stack.wait_any()
        print(f"renderwatch up: {name} exited with status {code}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nrenderwatch up: stopping (this takes a few seconds)", file=sys.stderr)
        return 0
    except (RuntimeError, ComposeError) as exc:
        print(f"renderwatch up: {exc}", file=sys.stderr)
        return 1
    finally:
        # The stop is bounded (grace, then SIGKILL), so a second Ctrl-C need not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stack.stop()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)


def local_flower_access(environ: Mapping[str, str], address: str) -> dict[str, str]:
    """Flower on loopback with no credentials given: open on purpose (renderwatch.flower
    refuses an unauthenticated Flower otherwise). Bound elsewhere, the user decides."""
    chosen = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_UNAUTHENTICATED_API")
    if address in ("127.0.0.1", "localhost", "::1") and not any(environ.get(k) for k in chosen):
        return {"FLOWER_UNAUTHENTICATED_API": "true"}
    return {}


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _print_banner(settings: Settings, stack: Stack) -> None:
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "") else settings.api_host  # noqa: S104
    lines = ["renderwatch up: all services healthy (Ctrl-C stops them)"]
    if "api" in stack.plan:
        lines.append(f"  API     http://{host}:{settings.api_port}/docs")
    if "flower" in stack.plan:
        lines.append(f"  Flower  http://127.0.0.1:{settings.flower_port}/")
    lines.append(f"  logs    {stack.log_dir}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(up(sys.argv[1:]))
