"""The database incarnation and the default namespace on PostgreSQL (see
`tests/unit/test_meta.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.unit.test_meta import MetaContract


@pytest.mark.postgres
class TestMetaOnPostgres(MetaContract):
    @pytest.fixture
    def new_database(self, pg_admin_url: str) -> Iterator[Callable[[], str]]:
        """Empty databases of this test alone, dropped afterwards."""
        admin = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
        names: list[str] = []

        def make() -> str:
            names.append(f"rw_meta_{uuid.uuid4().hex[:10]}")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{names[-1]}"')
            return f"{pg_admin_url.rsplit('/', 1)[0]}/{names[-1]}"

        yield make
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
