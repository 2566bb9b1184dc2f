"""docker-compose.yml and the tools around it: interpolation, the file's structure, the
local runner (`Stack`, `renderwatch up`) on small fake services, and the healthchecks.

No external service is needed: the runner's tests start short Python scripts, the
healthchecks are pointed at tiny local HTTP servers and at a broker port nobody serves.
"""

from __future__ import annotations

import http.server
import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from renderwatch import health
from renderwatch.compose import (
    APP_SERVICES,
    ComposeError,
    Stack,
    interpolate,
    load_document,
    load_services,
    settings_environment,
    start_order,
    venv_bin,
)
from shared.settings import REPO_ROOT, Settings

COMPOSE = REPO_ROOT / "docker-compose.yml"
INFRA = ("redis", "postgres")
ONE_SHOT = "migrate"
# The secrets docker compose requires (`${VAR:?message}`); values for the tests only.
SECRETS = {"POSTGRES_PASSWORD": "pw-from-env", "CACHE_SEAL_KEY": "seal-from-env"}


# --------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("plain", {}, "plain"),
        ("${A}", {"A": "x"}, "x"),
        ("${A}", {}, ""),
        ("$A/$B", {"A": "x", "B": "y"}, "x/y"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A:-d}", {"A": "x"}, "x"),
        ("${A-d}", {}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A:+alt}", {"A": "x"}, "alt"),
        ("${A:+alt}", {"A": ""}, ""),
        ("${A+alt}", {"A": ""}, "alt"),
        ("${A+alt}", {}, ""),
        ("${A:-${B:-deep}}", {}, "deep"),
        ("${A:-${B}}/tail", {"B": "b"}, "b/tail"),
        ("$$HOME and $${A}", {"A": "x", "HOME": "/h"}, "$HOME and ${A}"),
        ("cost: 5$$", {}, "cost: 5$"),
        ("${A:-a}-${B:-b}", {"B": "B"}, "a-B"),
        ("${A:-x:y}", {}, "x:y"),
        ("${A:-}", {}, ""),
        ("%h@${A:-w}", {}, "%h@w"),
    ],
)
def test_interpolation_follows_compose(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_required_variables_fail_with_their_message() -> None:
    with pytest.raises(ComposeError, match=r"POSTGRES_PASSWORD.*set it"):
        interpolate("${POSTGRES_PASSWORD:?set it}", {})
    with pytest.raises(ComposeError, match="POSTGRES_PASSWORD"):
        interpolate("${POSTGRES_PASSWORD:?set it}", {"POSTGRES_PASSWORD": ""})
    assert interpolate("${POSTGRES_PASSWORD?set it}", {"POSTGRES_PASSWORD": ""}) == ""
    with pytest.raises(ComposeError, match="A"):
        interpolate("${A?}", {})
    assert interpolate("${A:?x}", {"A": "v"}) == "v"


def test_a_default_is_only_evaluated_when_used() -> None:
    # Like a shell: the unused branch may name a required variable without failing.
    assert interpolate("${A:-${B:?never}}", {"A": "a"}) == "a"


@pytest.mark.parametrize("text", ["$", "a $ b", "${}", "${A", "${A:-x", "${A!}", "${1A}"])
def test_malformed_interpolation_is_an_error(text: str) -> None:
    with pytest.raises(ComposeError, match="invalid interpolation"):
        interpolate(text, {"A": "x"})


def write_compose(tmp_path: Path, document: dict[str, Any] | str) -> Path:
    path = tmp_path / "compose.yml"
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    path.write_text(text)
    return path


def test_services_are_normalised_from_every_compose_form(tmp_path: Path) -> None:
    path = write_compose(
        tmp_path,
        textwrap.dedent(
            """
            x-env: &env
              SHARED: "${SHARED:-s}"
            services:
              a:
                build: .
                command: python -m thing --flag="two words"
                environment:
                  <<: *env
                  FLAG: true
                  COUNT: 3
                  PASSED:
                  MISSING:
                healthcheck:
                  test: curl -f http://localhost/ || exit 1
                depends_on: [b]
              b:
                image: redis:7
                environment: ["X=1", "Y", "EMPTY="]
                healthcheck: {test: ["NONE"]}
              c:
                image: x
                healthcheck: {disable: true, test: ["CMD", "true"]}
                depends_on:
                  a: {condition: service_healthy}
            """
        ),
    )
    services = load_services(path, {"PASSED": "through", "Y": "why"})
    a, b, c = services["a"], services["b"], services["c"]
    assert a.command == ["python", "-m", "thing", "--flag=two words"]
    assert a.environment == {"SHARED": "s", "FLAG": "true", "COUNT": "3", "PASSED": "through"}
    assert a.healthcheck == ["CMD-SHELL", "curl -f http://localhost/ || exit 1"]
    assert a.healthcheck_argv() == ["/bin/sh", "-c", "curl -f http://localhost/ || exit 1"]
    assert a.depends_on == {"b": "service_started"}
    assert a.local and not b.local and not c.local
    assert b.environment == {"X": "1", "Y": "why", "EMPTY": ""}
    assert b.healthcheck is None and b.command == []
    assert c.healthcheck is None
    assert c.depends_on == {"a": "service_healthy"}


@pytest.mark.parametrize(
    ("services", "message"),
    [
        ({"a": {"image": "x", "depends_on": ["ghost"]}}, "unknown service 'ghost'"),
        (
            {"a": {"image": "x", "depends_on": {"b": {"condition": "service_ready"}}}, "b": {}},
            "unknown depends_on condition",
        ),
        ({"a": "not a mapping"}, "must be a mapping"),
        ({"a": {"command": 42}}, "command must be"),
        ({"a": {"healthcheck": {"test": ["RUN", "x"]}}}, "CMD, CMD-SHELL or NONE"),
    ],
)
def test_malformed_services_are_refused(
    tmp_path: Path, services: dict[str, Any], message: str
) -> None:
    with pytest.raises(ComposeError, match=message):
        load_services(write_compose(tmp_path, {"services": services}), {})


def test_a_file_without_services_or_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="services"):
        load_services(write_compose(tmp_path, {"volumes": {}}), {})
    with pytest.raises(ComposeError, match="not valid YAML"):
        load_services(write_compose(tmp_path, "services: [unclosed"), {})


def test_start_order_puts_dependencies_first_and_refuses_cycles(tmp_path: Path) -> None:
    path = write_compose(
        tmp_path,
        {
            "services": {
                "web": {"image": "x", "depends_on": ["db", "cache"]},
                "cache": {"image": "x"},
                "db": {"image": "x", "depends_on": ["disk"]},
                "disk": {"image": "x"},
            }
        },
    )
    services = load_services(path, {})
    order = start_order(services, ["web"])
    assert order.index("disk") < order.index("db") < order.index("web")
    assert order.index("cache") < order.index("web")
    assert start_order(services, ["cache"]) == ["cache"]
    with pytest.raises(ComposeError, match="unknown service 'nope'"):
        start_order(services, ["nope"])

    cyclic = write_compose(
        tmp_path,
        {"services": {"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}}},
    )
    with pytest.raises(ComposeError, match="cycle: a -> b -> a"):
        start_order(load_services(cyclic, {}), ["a"])


# --------------------------------------------------------------------------- the real file


@pytest.fixture
def compose() -> dict[str, Any]:
    """The repo's docker-compose.yml with only the required secrets set (defaults apply)."""
    return load_document(COMPOSE, SECRETS)


def test_compose_declares_the_whole_stack(compose: dict[str, Any]) -> None:
    services = load_services(COMPOSE, SECRETS)
    assert {*APP_SERVICES, *INFRA, ONE_SHOT} <= services.keys()
    for name in (*APP_SERVICES, ONE_SHOT):
        assert services[name].local, f"{name} must be built from our Dockerfile"
        assert services[name].image == "renderwatch:local"
    assert services["redis"].image == "redis:7"
    assert services["postgres"].image == "postgres:16"
    assert not services["redis"].local and not services["postgres"].local
    assert "--appendonly" in services["redis"].command
    assert services["redis"].command[services["redis"].command.index("--appendonly") + 1] == "yes"


def test_every_service_has_a_healthcheck_and_apps_use_renderwatch_healthcheck() -> None:
    services = load_services(COMPOSE, SECRETS)
    for name in APP_SERVICES:
        assert services[name].healthcheck == ["CMD", "renderwatch", "healthcheck", name]
        assert name in health.SERVICES
    assert services["redis"].healthcheck == ["CMD", "redis-cli", "ping"]
    postgres_check = services["postgres"].healthcheck
    assert postgres_check is not None and "pg_isready" in " ".join(postgres_check)
    assert services[ONE_SHOT].healthcheck is None  # a one-shot is judged by its exit status


def test_depends_on_conditions_are_valid_and_satisfiable(compose: dict[str, Any]) -> None:
    services = load_services(COMPOSE, SECRETS)
    for service in services.values():
        for dep, condition in service.depends_on.items():
            assert dep in services, f"{service.name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert services[dep].healthcheck, f"{dep} needs a healthcheck for {service.name}"
            if condition == "service_completed_successfully":
                # Restarting a finished one-shot would run it forever.
                assert services[dep].restart == "no", f"{dep} must not restart"
    for name in ("api", "worker", "beat"):
        assert services[name].depends_on == {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "migrate": "service_completed_successfully",
        }
    assert services[ONE_SHOT].depends_on == {"postgres": "service_healthy"}
    assert services["flower"].depends_on == {"redis": "service_healthy"}
    start_order(services, list(services))  # no cycle


def test_app_services_get_the_environment_they_need() -> None:
    services = load_services(COMPOSE, SECRETS)
    for name in ("api", "worker", "beat", ONE_SHOT):
        env = services[name].environment
        assert env["DATABASE_URL"].startswith("postgresql+psycopg://renderwatch:")
        assert env["DATABASE_URL"].endswith("@postgres:5432/renderwatch")
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["CELERY_BROKER_URL"].startswith("redis://redis:6379/")
        for key in ("STATS_SNAPSHOT_SECONDS", "SCENE_SECONDS", "CELERY_QUEUE", "WORKER_NAME"):
            assert key in env, f"{name} lacks {key}"
        # Every value that is a setting must be valid for Settings.
        values: dict[str, Any] = {
            k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields
        }
        Settings.model_validate(values)
    api = services["api"].environment
    assert api["API_HOST"] == "0.0.0.0"
    assert api["API_WORKERS"] == "2"
    assert services["flower"].environment["FLOWER_PORT"] == "5555"


def test_passwords_come_from_the_environment_never_from_the_file() -> None:
    services = load_services(COMPOSE, SECRETS)
    assert services["postgres"].environment["POSTGRES_PASSWORD"] == "pw-from-env"
    for name in ("api", "worker", "beat", ONE_SHOT):
        assert ":pw-from-env@postgres:" in services[name].environment["DATABASE_URL"]
        assert services[name].environment["CACHE_SEAL_KEY"] == "seal-from-env"
    raw = yaml.safe_load(COMPOSE.read_text())
    literal = raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert literal.startswith("${POSTGRES_PASSWORD:?")  # required: no silent fallback


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_a_missing_secret_stops_compose_with_a_message_naming_it(missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    with pytest.raises(ComposeError, match=f"{missing} is missing a value: set {missing}"):
        load_services(COMPOSE, env)
    with pytest.raises(ComposeError, match=missing):
        load_services(COMPOSE, {**env, missing: ""})


def test_no_secret_has_a_fallback_in_the_file() -> None:
    text = COMPOSE.read_text()
    for secret in (*SECRETS, "FLOWER_BASIC_AUTH"):
        for match in re.finditer(r"\$\{" + secret + r"(:?[-?+])?", text):
            assert match.group(1) in (":?", ":-"), f"{secret}: {match.group()}"
            if match.group(1) == ":-":
                # Only an empty default, which renderwatch.flower refuses to run open with.
                assert text[match.end() : match.end() + 1] == "}", f"{secret} has a fallback"


def test_flower_gets_no_database_password_and_passes_its_auth_through() -> None:
    services = load_services(
        COMPOSE, {**SECRETS, "FLOWER_BASIC_AUTH": "ops:s3cret", "FLOWER_UNAUTHENTICATED_API": ""}
    )
    flower = services["flower"].environment
    assert "DATABASE_URL" not in flower and "CACHE_SEAL_KEY" not in flower
    assert not any("pw-from-env" in value for value in flower.values())
    assert flower["FLOWER_BASIC_AUTH"] == "ops:s3cret"
    assert flower["FLOWER_UNAUTHENTICATED_API"] == ""
    assert services["flower"].command[:3] == ["python", "-m", "renderwatch.flower"]


def test_one_service_builds_the_image_and_the_others_use_it(compose: dict[str, Any]) -> None:
    builders = [name for name, spec in compose["services"].items() if "build" in spec]
    assert builders == [ONE_SHOT]
    image = compose["services"][ONE_SHOT]["image"]
    for name in APP_SERVICES:
        spec = compose["services"][name]
        assert spec["image"] == image and "build" not in spec
        assert spec.get("pull_policy") == "never", f"{name} must not pull {image}"


def test_healthchecks_start_fast(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        check = spec.get("healthcheck")
        if check is None:
            continue
        assert "start_interval" in check, f"{name}: `up --wait` would sit out a full interval"
        assert _seconds(check["start_interval"]) < _seconds(check["interval"])
        assert "start_period" in check


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", value)
    assert match, value
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_the_api_aggregates_metrics_across_its_workers(compose: dict[str, Any]) -> None:
    api = load_services(COMPOSE, SECRETS)["api"].environment
    assert int(api["API_WORKERS"]) > 1
    assert api["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    for name in ("worker", "beat", "flower", ONE_SHOT):
        env = load_services(COMPOSE, SECRETS)[name].environment
        assert "PROMETHEUS_MULTIPROC_DIR" not in env  # no /metrics there


def test_a_local_run_needs_no_container_secret(tmp_path: Path) -> None:
    """The local runner takes settings from its caller: the file's `:?` guards don't apply."""
    stack = Stack(list(APP_SERVICES), {"DATABASE_URL": "sqlite://"}, log_dir=tmp_path)
    for name in stack.plan:
        env = stack.services[name].environment
        assert "DATABASE_URL" not in env and "CACHE_SEAL_KEY" not in env
        assert "REDIS_URL" not in env  # the machine's Redis (settings), not host `redis`
    assert stack.services["worker"].environment["WORKER_NAME"] == "worker"


def test_named_volumes_are_declared_and_keep_the_data(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith(("/", ".", "~")):
                used.add(source)
                assert source in declared, f"{name} uses undeclared volume {source}"
    mounts = {
        name: [v.split(":", 1)[1] for v in spec.get("volumes", [])]
        for name, spec in compose["services"].items()
    }
    assert "/var/lib/postgresql/data" in mounts["postgres"]
    assert "/data" in mounts["redis"]
    assert used == declared


def test_published_ports_bind_to_loopback_only(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        for port in spec.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the world"


def test_commands_follow_the_settings_they_name() -> None:
    env = {
        "WORKER_CONCURRENCY": "5",
        "CELERY_QUEUE": "q1",
        "WORKER_NAME": "w1",
        "BEAT_NAME": "b1",
        "BEAT_SCHEDULE": "/tmp/x/schedule",
        "FLOWER_PORT": "5999",
        "FLOWER_ADDRESS": "127.0.0.1",
        "API_PORT": "8123",
    }
    services = load_services(COMPOSE, {**SECRETS, **env})
    worker = services["worker"].command
    assert worker[:4] == ["celery", "-A", "worker.app", "worker"]
    assert "-E" in worker  # task events, so Flower sees every task
    assert worker[worker.index("-P") + 1] == "prefork"
    assert "--concurrency=5" in worker
    assert worker[worker.index("-Q") + 1] == "q1"
    assert worker[worker.index("-n") + 1] == "w1@%h"
    assert services["worker"].environment["CELERY_QUEUE"] == "q1"
    assert services["worker"].environment["WORKER_NAME"] == "w1"

    beat = services["beat"].command
    assert beat[:4] == ["celery", "-A", "worker.app", "beat"]
    assert "--enable-remote-control" in beat
    assert beat[beat.index("-n") + 1] == "b1@%h"
    assert "--schedule=/tmp/x/schedule" in beat
    assert services["beat"].environment["BEAT_NAME"] == "b1"

    flower = services["flower"].command
    assert flower[:3] == ["python", "-m", "renderwatch.flower"]
    assert "--port=5999" in flower and "--address=127.0.0.1" in flower
    assert services["flower"].environment["FLOWER_PORT"] == "5999"

    assert services["api"].command == ["python", "-m", "api"]
    assert services["api"].environment["API_PORT"] == "8123"
    assert services[ONE_SHOT].command == ["renderwatch", "migrate"]

    defaults = load_services(COMPOSE, SECRETS)
    assert "--concurrency=2" in defaults["worker"].command
    assert defaults["worker"].command[defaults["worker"].command.index("-Q") + 1] == "renderwatch"


def test_the_programs_and_modules_the_file_names_exist() -> None:
    services = load_services(COMPOSE, SECRETS)
    for name in (*APP_SERVICES, ONE_SHOT):
        program = services[name].command[0]
        assert (venv_bin() / program).exists(), f"{name}: {program} is not in .venv/bin"
        check = services[name].healthcheck_argv()
        if check:
            assert (venv_bin() / check[0]).exists()
    assert importlib.util.find_spec("api.__main__") is not None
    assert importlib.util.find_spec("worker.app") is not None


def test_the_local_plan_runs_migrate_first_and_leaves_redis_and_postgres_to_the_machine(
    tmp_path: Path,
) -> None:
    stack = Stack(list(APP_SERVICES), {}, log_dir=tmp_path)
    assert stack.plan[0] == ONE_SHOT
    assert set(stack.plan) == {ONE_SHOT, *APP_SERVICES}
    assert set(stack.skipped) == set(INFRA)
    assert list(stack.running()) == []


def test_settings_environment_round_trips(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(api_port=8123, cache_namespace="ns-1", scene_seconds=0.25)
    env = settings_environment(settings)
    assert env["API_PORT"] == "8123" and env["CACHE_NAMESPACE"] == "ns-1"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert make_settings().model_dump() == settings.model_dump()


# --------------------------------------------------------------------------- the runner

APP_SCRIPT = """
import os, pathlib, signal, subprocess, sys, time
work = pathlib.Path(os.environ["WORK"])
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("prepared=" + str((work / "prepared").exists()), flush=True)
print("dep_ready=" + str((work / "dep-ready").exists()), flush=True)
print("FROM_FILE=" + os.environ.get("FROM_FILE", "-"), flush=True)
print("OVERRIDDEN=" + os.environ.get("OVERRIDDEN", "-"), flush=True)
print("PATH0=" + os.environ["PATH"].split(os.pathsep)[0], flush=True)
print("CWD=" + os.getcwd(), flush=True)
if os.environ.get("FAIL"):
    print("fatal: " + os.environ["FAIL"], flush=True)
    sys.exit(4)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
(work / (os.environ["NAME"] + ".child")).write_text(str(child.pid))
time.sleep(float(os.environ.get("READY_AFTER", "0")))
(work / (os.environ["NAME"] + "-ready")).write_text("")
while True:
    time.sleep(1)
"""

CHECK = (
    "import os, pathlib, sys; "
    "ok = (pathlib.Path(os.environ['WORK']) / (os.environ['NAME'] + '-ready')).exists(); "
    "print('ready' if ok else 'not yet'); sys.exit(0 if ok else 1)"
)


def fake_compose(tmp_path: Path, **tweaks: Any) -> Path:
    """A compose file of small Python services: prep (one-shot), dep, app, and db (image)."""
    script = tmp_path / "app.py"
    script.write_text(APP_SCRIPT)
    prep_code = tweaks.pop(
        "prep", "import os, pathlib; (pathlib.Path(os.environ['WORK']) / 'prepared').write_text('')"
    )
    document: dict[str, Any] = {
        "services": {
            "db": {"image": "postgres:16", "healthcheck": {"test": ["CMD", "false"]}},
            "prep": {
                "build": ".",
                "restart": "no",
                "command": ["python", "-c", prep_code],
            },
            "dep": {
                "build": ".",
                "command": ["python", str(script)],
                "environment": {"NAME": "dep", "READY_AFTER": "1"},
                "healthcheck": {"test": ["CMD", "python", "-c", CHECK]},
            },
            "app": {
                "build": ".",
                "command": ["python", str(script)],
                "environment": {
                    "NAME": "app",
                    "FROM_FILE": "file-${FLAVOUR:-plain}",
                    "OVERRIDDEN": "from-file",
                },
                "depends_on": {
                    "db": {"condition": "service_healthy"},
                    "prep": {"condition": "service_completed_successfully"},
                    "dep": {"condition": "service_healthy"},
                },
                "healthcheck": {"test": ["CMD", "python", "-c", CHECK]},
            },
        }
    }
    for service, changes in tweaks.items():
        document["services"][service].update(changes)
    return write_compose(tmp_path, document)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie nobody reaped yet is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.mark.timeout(60)
def test_stack_runs_one_shots_first_then_services_in_dependency_order(
    tmp_path: Path, work: Path
) -> None:
    compose = fake_compose(tmp_path)
    env = {"WORK": str(work), "OVERRIDDEN": "from-caller", "FLAVOUR": "spicy"}
    stack = Stack(["app"], env, compose_file=compose, log_dir=tmp_path / "logs")
    assert stack.plan == ["prep", "dep", "app"]
    assert stack.skipped == ["db"]  # image only: the machine's own server stands in
    with stack:
        stack.wait_healthy(timeout=30)
        assert set(stack.running()) == {"dep", "app"}
        log = stack.logs("app")
        children = [int((work / f"{name}.child").read_text()) for name in ("dep", "app")]
        assert all(alive(pid) for pid in children)
    assert "prepared=True" in log  # the one-shot finished before the app started
    assert "dep_ready=True" in log  # service_healthy: dep was healthy before app started
    assert "FROM_FILE=file-spicy" in log  # the file's environment, interpolated
    assert "OVERRIDDEN=from-caller" in log  # the caller's env wins over the file
    assert f"PATH0={venv_bin()}" in log
    assert f"CWD={REPO_ROOT}" in log
    assert (tmp_path / "logs" / "app.log").read_text() == log
    # stop() took the whole process groups down, grandchildren included.
    assert eventually(lambda: not any(alive(pid) for pid in children))
    assert list(stack.running()) == []
    stack.stop()  # idempotent


@pytest.mark.timeout(60)
def test_a_failing_one_shot_stops_the_start_and_shows_its_log(tmp_path: Path, work: Path) -> None:
    compose = fake_compose(tmp_path, prep="import sys; print('migration exploded'); sys.exit(3)")
    stack = Stack(["app"], {"WORK": str(work)}, compose_file=compose, log_dir=tmp_path / "logs")
    with pytest.raises(RuntimeError, match="prep: one-shot service exited with status 3") as info:
        stack.start()
    assert "migration exploded" in str(info.value)
    assert stack.logs("app") == ""  # never started
    assert list(stack.running()) == []


@pytest.mark.timeout(60)
def test_a_service_that_dies_is_named_with_the_tail_of_its_log(tmp_path: Path, work: Path) -> None:
    compose = fake_compose(tmp_path)
    stack = Stack(
        ["app"], {"WORK": str(work), "FAIL": "bad config"}, compose_file=compose, log_dir=tmp_path
    )
    # dep dies first, before it is healthy: app must not even start.
    with pytest.raises(RuntimeError, match="dep: exited with status 4") as info:
        stack.start()
    assert "fatal: bad config" in str(info.value)
    assert stack.logs("app") == ""
    assert list(stack.running()) == []


@pytest.mark.timeout(60)
def test_wait_healthy_names_the_service_that_never_gets_healthy(tmp_path: Path, work: Path) -> None:
    never = {"healthcheck": {"test": ["CMD", "python", "-c", "print('still warming up'); exit(1)"]}}
    compose = fake_compose(tmp_path, app=never)
    stack = Stack(["app"], {"WORK": str(work)}, compose_file=compose, log_dir=tmp_path)
    with stack:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="app: not healthy in time") as info:
            stack.wait_healthy(timeout=2)
        assert time.monotonic() - started < 20
        assert "still warming up" in str(info.value)
        assert "--- last lines of app's log ---" in str(info.value)


@pytest.mark.timeout(60)
def test_stop_kills_a_service_that_ignores_sigterm(tmp_path: Path, work: Path) -> None:
    compose = fake_compose(tmp_path)
    stack = Stack(
        ["app"],
        {"WORK": str(work), "IGNORE_TERM": "1"},
        compose_file=compose,
        log_dir=tmp_path,
        grace_seconds=0.5,
    )
    stack.start()
    stack.wait_healthy(timeout=30)
    leader = stack.pid("app")
    stack.stop()
    assert not alive(leader)
    assert list(stack.running()) == []


@pytest.mark.timeout(60)
def test_the_context_manager_stops_everything_when_the_body_fails(
    tmp_path: Path, work: Path
) -> None:
    compose = fake_compose(tmp_path)
    stack = Stack(["dep"], {"WORK": str(work)}, compose_file=compose, log_dir=tmp_path)
    with pytest.raises(ZeroDivisionError), stack:
        stack.wait_healthy(timeout=30)
        leader = stack.pid("dep")
        _ = 1 / 0
    assert not alive(leader)


@pytest.mark.timeout(60)
def test_echo_prefixes_every_line_with_the_service_name(tmp_path: Path, work: Path) -> None:
    compose = fake_compose(tmp_path)
    echo = io.StringIO()
    with Stack(
        ["dep"], {"WORK": str(work)}, compose_file=compose, log_dir=tmp_path, echo=echo
    ) as stack:
        stack.wait_healthy(timeout=30)
    lines = echo.getvalue().splitlines()
    assert "dep | prepared=False" in lines
    assert all(line.startswith("dep | ") for line in lines)


def test_a_program_missing_from_path_is_a_clear_error(tmp_path: Path, work: Path) -> None:
    compose = fake_compose(tmp_path, dep={"command": ["no-such-program-here", "--x"]})
    stack = Stack(["dep"], {"WORK": str(work)}, compose_file=compose, log_dir=tmp_path)
    with pytest.raises(ComposeError, match="'no-such-program-here' not found on PATH"):
        stack.start()


@pytest.mark.timeout(90)
def test_renderwatch_up_prefixes_output_and_stops_everything_on_ctrl_c(
    tmp_path: Path, work: Path
) -> None:
    compose = fake_compose(tmp_path)
    env = {**os.environ, "WORK": str(work), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "renderwatch.compose", "--compose-file", str(compose), "app"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "all services healthy" in line:
                break
        assert any(line.startswith("app  | prepared=True") for line in seen), seen
        assert any(line.startswith("dep  | ") for line in seen), seen
        children = [int((work / f"{name}.child").read_text()) for name in ("dep", "app")]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(seen) + rest
    assert "stopping" in rest
    assert eventually(lambda: not any(alive(pid) for pid in children))


# --------------------------------------------------------------------------- healthchecks


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}

    def do_GET(self) -> None:
        code, body = self.routes.get(self.path, (404, b"no"))
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, tuple[int, bytes]]], int]]:
    """Start a loopback HTTP server answering fixed routes; returns its port."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(routes: dict[str, tuple[int, bytes]]) -> int:
        handler = type("Handler", (_Handler,), {"routes": routes})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_api_check_asks_readyz(serve: Any, make_settings: Callable[..., Settings]) -> None:
    ready = serve({"/readyz": (200, b'{"status":"ready"}')})
    ok, detail = health.check_service("api", make_settings(api_port=ready, api_host="0.0.0.0"))
    assert ok, detail
    unready = serve({"/readyz": (503, b'{"status":"unavailable"}')})
    ok, detail = health.check_service("api", make_settings(api_port=unready))
    assert not ok and "503" in detail
    ok, detail = health.check_service("api", make_settings(api_port=closed_port()))
    assert not ok and "unreachable" in detail


def test_flower_check_wants_ok(serve: Any, make_settings: Callable[..., Settings]) -> None:
    good = serve({"/healthcheck": (200, b"OK")})
    assert health.check_service("flower", make_settings(flower_port=good))[0]
    odd = serve({"/healthcheck": (200, b"maybe")})
    ok, detail = health.check_service("flower", make_settings(flower_port=odd))
    assert not ok and "OK" in detail
    assert not health.check_service("flower", make_settings(flower_port=closed_port()))[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("service", ["worker", "beat"])
def test_celery_checks_fail_fast_without_leaking_the_broker_password(
    service: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(celery_broker_url=f"redis://:s3cret@127.0.0.1:{closed_port()}/0")
    started = time.monotonic()
    ok, detail = health.check_service(service, settings)
    assert not ok
    assert "broker unreachable" in detail and service in detail
    assert "s3cret" not in detail
    assert time.monotonic() - started < 20


@pytest.mark.timeout(30)
@pytest.mark.parametrize("service", ["worker", "beat"])
def test_a_broker_without_remote_control_is_reported_not_pretended(
    service: str, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    # The SQL fallback broker (no Redis on the machine) carries no pings: the check can
    # only vouch for the broker, and says so.
    settings = make_settings(celery_broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    ok, detail = health.check_service(service, settings)
    assert ok
    assert "no remote control" in detail and "not asked" in detail


def test_unknown_services_are_unhealthy(make_settings: Callable[..., Settings]) -> None:
    ok, detail = health.check_service("postgres", make_settings())
    assert not ok and "unknown service 'postgres'" in detail


def test_node_names_follow_celery_hostname_format() -> None:
    assert health.node("w1") == f"w1@{socket.gethostname()}"


def test_main_exit_status_and_message(
    serve: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(Path(__file__).parent)  # away from any developer's .env
    monkeypatch.setenv("API_PORT", str(serve({"/readyz": (200, b"{}")})))
    assert health.main("api") == 0
    assert "answered 200" in capsys.readouterr().out
    monkeypatch.setenv("API_PORT", str(closed_port()))
    assert health.main("api") == 1
    assert "unreachable" in capsys.readouterr().err


# --------------------------------------------------------------------------- flower's guard


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({}, True),
        ({"FLOWER_BASIC_AUTH": ""}, True),
        ({"FLOWER_UNAUTHENTICATED_API": ""}, True),
        ({"FLOWER_UNAUTHENTICATED_API": "false"}, True),
        ({"FLOWER_UNAUTHENTICATED_API": "0"}, True),
        ({"FLOWER_UNAUTHENTICATED_API": "true"}, False),
        ({"FLOWER_UNAUTHENTICATED_API": "1"}, False),
        ({"FLOWER_BASIC_AUTH": "ops:s3cret"}, False),
        ({"FLOWER_AUTH": ".*@example\\.com"}, False),
    ],
)
def test_flower_refuses_to_run_open_unless_told_on_purpose(
    env: dict[str, str], refused: bool
) -> None:
    from renderwatch import flower

    assert (flower.refusal(env) is not None) is refused


def test_flower_drops_empty_variables_that_flower_would_misread() -> None:
    from renderwatch import flower

    env = flower.flower_environment(
        {"FLOWER_BASIC_AUTH": "", "FLOWER_PORT": "5555", "FLOWER_AUTH": " ", "PATH": ""}
    )
    assert env == {"FLOWER_PORT": "5555", "PATH": ""}


def test_flower_without_auth_exits_with_the_reason_before_starting_anything() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_UNAUTHENTICATED_API")
    }
    done = subprocess.run(
        [sys.executable, "-m", "renderwatch.flower", "--port=1"],
        env={**env, "FLOWER_BASIC_AUTH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "refusing to start Flower without authentication" in done.stderr
    assert "FLOWER_BASIC_AUTH=user:password" in done.stderr


def test_renderwatch_up_opens_flower_only_on_loopback_and_only_when_nothing_was_chosen() -> None:
    from renderwatch.compose import local_flower_access

    assert local_flower_access({}, "127.0.0.1") == {"FLOWER_UNAUTHENTICATED_API": "true"}
    assert local_flower_access({}, "0.0.0.0") == {}
    assert local_flower_access({"FLOWER_BASIC_AUTH": "a:b"}, "127.0.0.1") == {}
    assert local_flower_access({"FLOWER_UNAUTHENTICATED_API": "false"}, "127.0.0.1") == {}


# --------------------------------------------------------------------------- the Dockerfile

DOCKERFILE = REPO_ROOT / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Instructions of each stage (continuation lines joined), by stage name."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            name = line.split()[-1] if " AS " in line.upper() else str(len(stages))
            current = stages.setdefault(name, [])
        current.append(line)
    return stages


def test_the_dockerfile_builds_in_one_stage_and_runs_in_another() -> None:
    stages = _stages()
    assert list(stages) == ["builder", "runtime"]
    builder, runtime = stages["builder"], stages["runtime"]
    make_uv = re.search(r"^UV_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert make_uv is not None
    assert f"COPY --from=ghcr.io/astral-sh/uv:{make_uv.group(1)} /uv /bin/uv" in builder
    text = DOCKERFILE.read_text()
    assert "pip install" not in text
    syncs = [line for line in builder if "uv sync" in line]
    assert len(syncs) == 2 and all("--locked" in s and "--no-dev" in s for s in syncs)
    assert all("--mount=type=cache,target=/root/.cache/uv" in s for s in syncs)
    # The dependency layer comes from the lock alone, before any source or the README.
    first = builder.index(syncs[0])
    assert "--no-install-project" in syncs[0]
    assert not any(line.startswith("COPY") and "README" in line for line in builder[:first])
    assert "--no-editable" in syncs[1]
    # The runtime stage: the virtualenv from the builder, no uv, no sources, not root.
    copies = [line for line in runtime if line.startswith("COPY")]
    assert copies == ["COPY --from=builder /app/.venv /app/.venv"]
    users = [line.split()[1] for line in runtime if line.startswith("USER")]
    assert users and users[-1] not in ("root", "0")


def _docker_context(files: list[str]) -> set[str]:
    """The files a build context holds under .dockerignore (last matching rule wins)."""
    import fnmatch

    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    kept = set()
    for path in files:
        included = True
        for negate, pattern in rules:
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            pattern = pattern.replace("**/", "*/") if pattern.startswith("**/") else pattern
            if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(path, pattern):
                included = negate
        if included:
            kept.add(path)
    return kept


def test_the_build_context_holds_no_tests_benchmarks_ci_or_secrets() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    context = _docker_context([*files, ".env", "var/renderwatch.db"])
    for path in context:
        assert not path.startswith(("tests/", "bench/", ".ci/", ".env", "var/", ".git")), path
    for needed in ("pyproject.toml", "uv.lock", "README.md", "api/app.py", "worker/app.py"):
        assert needed in context
    assert any(p.startswith("renderwatch/migrations/") for p in context)


def test_the_package_floors_allow_what_the_file_and_the_code_use() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # 3.12 and 3.13 users too
    floors = {re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0]: dep for dep in project["dependencies"]}
    beat = load_services(COMPOSE, SECRETS)["beat"].command
    if "--enable-remote-control" in beat:  # beat's remote control came with Celery 5.7
        assert floors["celery"] == "celery>=5.7"
    assert floors["starlette"] == "starlette>=0.48"  # RFC 9110 status names in api/errors.py
