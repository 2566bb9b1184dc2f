"""The database's incarnation (`shared.meta`, migration 0002) and the default key namespace
derived from it.

`MetaContract` runs on SQLite here and on PostgreSQL in
`tests/integration/test_meta_postgres.py`; a subclass provides `new_database`, a factory
of empty databases (not migrated).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from renderwatch.migrate import alembic_config, upgrade
from shared.meta import IncarnationMissing, database_incarnation, new_incarnation
from shared.models import Base, DatabaseMeta
from shared.runtime import Runtime

NAMESPACE = re.compile(r"rw-[0-9a-f]{8}:")


class MetaContract:
    pytestmark = [pytest.mark.timeout(120)]

    @pytest.fixture
    def engines(self) -> Iterator[Callable[[str], Engine]]:
        made: list[Engine] = []

        def engine_for(url: str) -> Engine:
            made.append(create_engine(url, poolclass=NullPool))
            return made[-1]

        yield engine_for
        for engine in made:
            engine.dispose()

    @pytest.fixture
    def start(
        self, make_settings: Callable[..., Any], fake_redis: Any
    ) -> Iterator[Callable[..., Runtime]]:
        """Runtime.start with caching on (a fake Redis); closed afterwards."""
        started: list[Runtime] = []

        def run(url: str, **overrides: Any) -> Runtime:
            settings = make_settings(database_url=url, db_pool_size=1, **overrides)
            started.append(Runtime.start(settings, redis_client=fake_redis))
            return started[-1]

        yield run
        for runtime in started:
            runtime.close()

    def rows(self, engine: Engine) -> list[tuple[int, str]]:
        with engine.connect() as conn:
            return [(r.id, r.incarnation) for r in conn.execute(select(DatabaseMeta))]

    # -- the migration ----------------------------------------------------------------------

    def test_a_fresh_migrate_creates_exactly_one_incarnation(self, new_database, engines):
        url = new_database()
        upgrade(url)
        engine = engines(url)
        ((row_id, incarnation),) = self.rows(engine)
        assert row_id == 1 and uuid.UUID(incarnation).version == 4
        assert database_incarnation(engine) == incarnation
        upgrade(url)  # migrating again changes nothing
        assert self.rows(engine) == [(1, incarnation)]

    def test_the_table_holds_one_row_only(self, new_database, engines):
        url = new_database()
        upgrade(url)
        engine = engines(url)
        with pytest.raises(IntegrityError), engine.begin() as c:
            c.execute(text("INSERT INTO renderwatch_meta VALUES (2, 'x', CURRENT_TIMESTAMP)"))
        assert len(self.rows(engine)) == 1

    def test_the_migrations_match_the_models(self, new_database, engines):
        url = new_database()
        upgrade(url)
        with engines(url).connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []

    def test_the_migration_goes_down_and_up_again_with_a_new_incarnation(
        self, new_database, engines
    ):
        url = new_database()
        upgrade(url)
        engine = engines(url)
        first = database_incarnation(engine)
        command.downgrade(alembic_config(url), "0001")
        with pytest.raises(IncarnationMissing, match="renderwatch migrate"):
            database_incarnation(engine)
        upgrade(url)
        assert database_incarnation(engine) != first

    # -- the namespace ----------------------------------------------------------------------

    def test_two_databases_get_two_namespaces_and_one_database_one(self, new_database, start):
        one, two = new_database(), new_database()
        upgrade(one)
        upgrade(two)
        a, b, a_again = start(one), start(two), start(one)
        assert NAMESPACE.fullmatch(a.cache.keys.namespace)
        assert NAMESPACE.fullmatch(b.cache.keys.namespace)
        assert a.cache.keys.namespace != b.cache.keys.namespace
        assert a.incarnation != b.incarnation
        # Every process of one deployment derives the same namespace.
        assert (a_again.cache.keys.namespace, a_again.incarnation) == (
            a.cache.keys.namespace,
            a.incarnation,
        )

    def test_an_explicit_namespace_wins(self, new_database, start):
        url = new_database()
        upgrade(url)
        runtime = start(url, cache_namespace="mine")
        assert runtime.cache.keys.namespace == "mine:"
        assert runtime.cache.keys.job(5) == "mine:job:{5}:progress"
        assert runtime.incarnation, "the incarnation is read with an explicit namespace too"

    def test_the_namespace_is_logged_and_the_database_url_is_not(self, new_database, start, caplog):
        url = new_database()
        upgrade(url)
        with caplog.at_level(logging.DEBUG, logger="shared"):
            runtime = start(url)
        namespace = runtime.cache.keys.namespace
        assert f"namespace {namespace!r}" in caplog.text
        assert "derived from the database" in caplog.text
        database = url.rsplit("/", 1)[-1]
        assert database not in caplog.text

    def test_a_new_incarnation_moves_the_namespace_and_keeps_one_row(
        self, new_database, engines, start
    ):
        url = new_database()
        upgrade(url)
        engine = engines(url)
        before = start(url)
        fresh = new_incarnation(engine)
        assert fresh != before.incarnation
        assert self.rows(engine) == [(1, fresh)]
        after = start(url)
        assert after.incarnation == fresh
        assert after.cache.keys.namespace != before.cache.keys.namespace

    def test_a_lost_row_is_recreated_by_new_incarnation(self, new_database, engines):
        url = new_database()
        upgrade(url)
        engine = engines(url)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM renderwatch_meta"))
        with pytest.raises(IncarnationMissing, match="renderwatch new-incarnation"):
            database_incarnation(engine)
        fresh = new_incarnation(engine)
        assert self.rows(engine) == [(1, fresh)]

    def test_a_database_without_the_table_stops_the_start_saying_to_migrate(
        self, new_database, start
    ):
        url = new_database()
        command.upgrade(alembic_config(url), "0001")
        with pytest.raises(IncarnationMissing, match="renderwatch migrate"):
            start(url)

    def test_without_the_cache_the_incarnation_is_not_needed(self, new_database, make_settings):
        url = new_database()
        command.upgrade(alembic_config(url), "0001")
        runtime = Runtime.start(make_settings(database_url=url, redis_url=""))
        try:
            assert runtime.incarnation == "" and not runtime.cache.enabled
        finally:
            runtime.close()


class TestMetaOnSQLite(MetaContract):
    @pytest.fixture
    def new_database(self, tmp_path: Path) -> Callable[[], str]:
        made = iter(range(1_000))
        return lambda: f"sqlite:///{tmp_path / f'db{next(made)}.db'}"


def test_a_database_that_does_not_answer_at_start_leaves_caching_off(
    make_settings, tmp_path, fake_redis, caplog
):
    # A directory is no SQLite file: every connection attempt fails.
    settings = make_settings(database_url=f"sqlite:///{tmp_path}")
    with caplog.at_level(logging.WARNING, logger="shared.runtime"):
        runtime = Runtime.start(settings, redis_client=fake_redis)
    try:
        assert not runtime.cache.enabled and runtime.incarnation == ""
        assert "caching is off in this process" in caplog.text
        assert str(tmp_path) not in caplog.text
    finally:
        runtime.close()


def test_reading_the_incarnation_is_one_statement(sqlite_url):
    """`database_incarnation` runs at every process start: one SELECT, nothing else."""
    engine = create_engine(sqlite_url, poolclass=NullPool)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        database_incarnation(engine)
    finally:
        engine.dispose()
    assert len(statements) == 1 and "renderwatch_meta" in statements[0]
