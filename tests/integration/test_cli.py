"""`renderwatch` as users run it: a real subprocess against a private PostgreSQL database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.apikeys import lookup_client
from shared.db import build_engine, build_session_factory

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

SCRIPT = Path(sys.executable).parent / "renderwatch"


def renderwatch(*args: str, database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd is a temporary folder, so a developer's .env cannot leak into the test.
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def client_of(url: str, key: str) -> str | None:
    engine = build_engine(url)
    try:
        with build_session_factory(engine)() as session:
            return lookup_client(key, session=session)
    finally:
        engine.dispose()


def test_the_console_script_is_installed():
    assert SCRIPT.exists(), "run `uv sync`: the renderwatch console script is missing"


def test_create_key_last_line_is_a_key_that_authenticates(pg_url, tmp_path):
    result = renderwatch("create-key", "alice@example.com", database_url=pg_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    key = lines[-1]
    assert len(lines) > 1, "explanatory lines come before the key"
    assert client_of(pg_url, key) == "alice@example.com"
    assert client_of(pg_url, key + "x") is None


def test_revoke_key_makes_the_key_stop_authenticating(pg_url, tmp_path):
    created = renderwatch("create-key", "bob@example.com", database_url=pg_url, cwd=tmp_path)
    key = created.stdout.strip().splitlines()[-1]
    assert client_of(pg_url, key) == "bob@example.com"
    revoked = renderwatch("revoke-key", key, database_url=pg_url, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert key not in revoked.stdout + revoked.stderr
    assert client_of(pg_url, key) is None


def test_migrate_is_idempotent_and_redacts_the_password(pg_url, tmp_path):
    with_password = pg_url.replace("postgres@", "postgres:not-a-real-pw@", 1)
    assert with_password != pg_url
    result = renderwatch("migrate", database_url=with_password, cwd=tmp_path)
    # Trust authentication ignores the password; the point is that it is never shown.
    assert result.returncode == 0, result.stderr
    assert "not-a-real-pw" not in result.stdout + result.stderr
    assert "postgres:***@" in result.stdout


def test_usage_errors_exit_2(tmp_path, pg_url):
    result = renderwatch("create-key", database_url=pg_url, cwd=tmp_path)
    assert result.returncode == 2
    assert "CLIENT_ID" in result.stderr and result.stdout == ""
