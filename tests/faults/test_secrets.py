"""Scenario 13: passwords in DATABASE_URL and REDIS_URL never show, whatever happens.

A PostgreSQL role with a random password owns a private database; a private
redis-server requires another random password (it is the cache and, derived from
REDIS_URL, the Celery broker). The CLI, an API process, a worker and beat run with
both URLs. They do work (migrate, create a key, render a job, snapshot statistics)
and fail (bad requests; Redis stopped: cache, broker and enqueue down; the database
role refused: 503s), then everything they printed or answered is searched: every log
line, every HTTP response (status line, headers, body; errors included), the
statistics, /metrics and `renderwatch stats`. Neither password may appear, nor the
CACHE_SEAL_KEY secret set beside them.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from renderwatch.localproc import RedisServer, private_database
from shared.settings import Settings
from tests import procs
from tests.conftest import require

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis, pytest.mark.celery]


@dataclass
class Secrets:
    pg_password: str
    redis_password: str
    seal_key: str = field(default_factory=lambda: f"seal-{secrets.token_urlsafe(24)}")

    @property
    def named(self) -> tuple[tuple[str, str], ...]:
        return (
            ("PostgreSQL password", self.pg_password),
            ("Redis password", self.redis_password),
            ("CACHE_SEAL_KEY", self.seal_key),
        )

    def leaks(self, text: str) -> list[str]:
        """Which secret (raw or URL-encoded) appears in `text`."""
        return [
            name for name, value in self.named if value in text or quote(value, safe="") in text
        ]

    def mask(self, text: str) -> str:
        for name, value in self.named:
            text = text.replace(value, f"<{name}>")
        return text


@dataclass
class Transcript:
    """Everything the system said: named texts to search."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, text: str) -> None:
        key = name
        n = 1
        while key in self.texts:
            n += 1
            key = f"{name} #{n}"
        self.texts[key] = text

    def record(self, response: httpx.Response) -> None:
        response.read()
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.add(
            f"{response.request.method} {response.request.url.path} -> {response.status_code}",
            f"{response.status_code} {response.reason_phrase}\n{head}\n\n{response.text}",
        )


class PasswordRedis(RedisServer):
    """A private redis-server with `requirepass`, restartable on the same port."""

    def __init__(self, workdir: Path, password: str) -> None:
        super().__init__(workdir, extra_args=("--requirepass", password))
        self.password = password

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"


@pytest.fixture
def secrets_world(
    pg_admin_url: str, tmp_path: Path
) -> Iterator[tuple[Secrets, str, PasswordRedis]]:
    """(the passwords, DATABASE_URL of a password role owning a fresh DB, a password Redis)."""
    require("redis-server (binary)", procs.redis_server_binary() is not None)
    tag = uuid.uuid4().hex[:10]
    role = f"rw_secret_{tag}"
    found = Secrets(
        pg_password=f"pg-{secrets.token_urlsafe(18)}",
        redis_password=f"rd-{secrets.token_urlsafe(18)}",
    )
    admin = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{found.pg_password}'")
    redis_server = PasswordRedis(tmp_path / "redis", found.redis_password)
    try:
        with private_database(pg_admin_url, "rw_secret_db", migrate=False, owner=role) as url:
            database = url.rsplit("/", 1)[1]
            redis_server.start()
            host = pg_admin_url.split("@", 1)[1].rsplit("/", 1)[0]
            yield (
                found,
                f"postgresql+psycopg://{role}:{found.pg_password}@{host}/{database}",
                redis_server,
            )
    finally:
        redis_server.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def cli(
    env: dict[str, str], transcript: Transcript, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run `renderwatch ARGS`; its stdout and stderr go to the transcript."""
    done = subprocess.run(
        [sys.executable, "-m", "renderwatch.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    transcript.add(f"renderwatch {args[0]} (exit {done.returncode})", done.stdout + done.stderr)
    return done


@pytest.mark.timeout(240)
def test_no_password_appears_in_any_log_answer_statistic_or_metric(
    secrets_world, pg_admin_url, make_settings, tmp_path, record_figures
):
    found, database_url, redis_server = secrets_world
    settings: Settings = make_settings(
        database_url=database_url,
        redis_url=redis_server.url,  # also the broker (CELERY_BROKER_URL is derived from it)
        cache_namespace=f"t-{uuid.uuid4().hex[:8]}",
        celery_queue=f"test-{uuid.uuid4().hex[:8]}",
        scene_seconds=0.05,
        stats_snapshot_seconds=1,
        redis_socket_timeout=0.25,
        breaker_reset_seconds=0.5,
        cache_seal_key=found.seal_key,  # a secret that is no URL password: never shown either
        log_level="DEBUG",  # the chattiest level: everything any module would say
    )
    assert settings.broker_url == redis_server.url
    env = procs.settings_env(settings)
    transcript = Transcript()
    role = database_url.split("//", 1)[1].split(":", 1)[0]
    admin = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")

    assert cli(env, transcript, "migrate").returncode == 0
    made = cli(env, transcript, "create-key", "secrets@example.com")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    cli_env = {**env, "RENDERWATCH_API_KEY": key}

    beat_args: list[str | Path] = [
        procs.CELERY, "-A", "worker.app", "beat", "-s", str(tmp_path / "beat-schedule"),
        "--pidfile", str(tmp_path / "beat.pid"), "-l", "DEBUG",
    ]  # fmt: skip
    beat_proc = procs.ServiceProcess("beat", beat_args, env, tmp_path / "beat.log")
    services: list[Any] = []
    # Beat boots while the API and the worker do (it is ready once a snapshot exists).
    with (
        procs.running(beat_proc, lambda p: None) as beat,
        procs.api_server(env, tmp_path) as api,
        procs.celery_worker(env, tmp_path, queue=settings.celery_queue) as worker,
    ):
        services += [api, worker, beat]
        cli_env["RENDERWATCH_API_URL"] = api.base_url
        http = httpx.Client(
            base_url=api.base_url,
            timeout=30,
            trust_env=False,
            event_hooks={"response": [transcript.record]},
        )
        # -- work -------------------------------------------------------------------
        created = http.post(
            "/api/v2/jobs", json={"prompt": "a secret garden", "scenes_total": 3}, headers=auth
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        procs.wait_until(
            lambda: (
                http.get(f"/api/v2/jobs/{job_id}", headers=auth).json()["status"] == "succeeded"
            ),
            timeout=60,
            what="the job to succeed",
        )
        procs.wait_until(
            lambda: http.get("/api/v2/cache/stats/history", headers=auth).json()["items"],
            timeout=30,
            what="a beat snapshot",
        )
        for path in (
            "/api/v2/jobs",
            "/api/v2/cache/stats",
            "/metrics",
            "/readyz",
            "/healthz",
            "/openapi.json",
            "/docs",
        ):
            http.get(path, headers=auth)
        assert cli(cli_env, transcript, "stats").returncode == 0
        assert cli(cli_env, transcript, "stats", "--json").returncode == 0
        assert cli(cli_env, transcript, "watch", str(job_id), "--interval", "0.1").returncode == 0

        # -- bad input ----------------------------------------------------------------
        http.get("/api/v2/jobs/abc", headers=auth)
        http.get("/api/v2/jobs/999999", headers=auth)
        http.get("/api/v2/jobs", headers={"Authorization": "Bearer wrong"})
        http.post(
            "/api/v2/jobs", content=b"{", headers={**auth, "Content-Type": "application/json"}
        )
        http.post("/api/v2/jobs", content=b"x", headers={**auth, "Content-Type": "text/plain"})
        http.post(
            "/api/v2/jobs",
            content=b"x" * 70_000,
            headers={**auth, "Content-Type": "application/json"},
        )
        http.post(f"/api/v2/jobs/{job_id}/cancel", headers=auth)  # 409: finished

        # -- Redis down: cache, broker and enqueue fail ---------------------------------
        redis_server.stop()
        down_at = time.monotonic()
        for _ in range(5):
            assert http.get(f"/api/v2/jobs/{job_id}", headers=auth).status_code == 200
        refused = http.post(
            "/api/v2/jobs", json={"prompt": "no queue", "scenes_total": 1}, headers=auth
        )
        assert refused.status_code == 503, refused.text
        stats_down = http.get("/api/v2/cache/stats", headers=auth)
        assert stats_down.json()["statistics"]["redis_available"] is False
        http.get("/metrics")
        http.get("/readyz")
        assert cli(cli_env, transcript, "stats").returncode == 0
        # Let the worker and beat notice and complain about the lost broker.
        worker.wait_for_log(r"Cannot connect to|Connection to broker lost|consumer: ", timeout=30)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))
        redis_server.start()

        # -- the database refuses the role: 503s ------------------------------------------
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER ROLE "{role}" NOLOGIN')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
        try:
            db_down = [
                http.get("/api/v2/jobs?limit=3", headers=auth),
                http.get("/readyz"),
                http.get("/api/v2/cache/stats/history", headers=auth),
            ]
            assert {r.status_code for r in db_down} == {503}, [r.text for r in db_down]
            failed_cli = cli(env, transcript, "create-key", "nobody@example.com")
            assert failed_cli.returncode == 4  # refused (README "The command line")
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER ROLE "{role}" LOGIN')
        # Back to normal: the same processes recover by themselves.
        procs.wait_until(
            lambda: http.get("/readyz").status_code == 200, timeout=30, what="readiness"
        )
        http.get("/api/v2/cache/stats", headers=auth)
        http.get("/metrics")
        http.close()
    for service in services:
        transcript.add(f"log of {service.name}", service.log())

    leaks = {name: found.leaks(text) for name, text in transcript.texts.items()}
    leaked = {name: which for name, which in leaks.items() if which}
    record_figures(
        scenario=13,
        fault="passwords in DATABASE_URL and REDIS_URL; Redis stopped; DB role refused",
        texts_searched=len(transcript.texts),
        http_answers=sum(1 for name in transcript.texts if "->" in name),
        log_lines=sum(t.count("\n") for n, t in transcript.texts.items() if n.startswith("log of")),
        leaks=len(leaked),
    )
    assert not leaked, {
        name: (which, _context(transcript.texts[name], found)) for name, which in leaked.items()
    }
    # The search is only worth something if the texts did talk about these URLs.
    everything = "\n".join(transcript.texts.values())
    assert f":***@127.0.0.1:{redis_server.port}" in everything or "redis://:**@" in everything
    assert f"{role}:***@" in everything, "the redacted database URL should be logged"


def _context(text: str, found: Secrets) -> list[str]:
    """The lines holding a password, with the password masked (the report must not leak)."""
    return [found.mask(line) for line in text.splitlines() if found.leaks(line)][:5]
