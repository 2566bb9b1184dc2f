"""API keys (`shared.apikeys`): shown once, stored hashed, revocable, resolved with a
short in-process memory."""

from __future__ import annotations

from collections.abc import Iterator
from unittest.mock import Mock

import pytest
from sqlalchemy import select

from shared.apikeys import (
    KEY_PREFIX,
    MAX_KEY_CHARS,
    KeyResolver,
    create_api_key,
    hash_key,
    lookup_client,
    revoke_api_key,
)
from shared.db import SessionFactory
from shared.models import ApiKey
from tests.cache_helpers import FakeClock, open_db


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[SessionFactory]:
    engine, factory = open_db(sqlite_url)
    yield factory
    engine.dispose()


def test_a_key_resolves_to_its_client_and_is_stored_only_hashed(sessions: SessionFactory):
    with sessions() as session:
        key = create_api_key("  alice@example.com ", session=session)
        assert key.startswith(KEY_PREFIX) and len(key) > 40
        assert lookup_client(key, session=session) == "alice@example.com"
        stored = session.scalars(select(ApiKey)).all()
    assert len(stored) == 1
    assert stored[0].key_hash == hash_key(key) and key not in stored[0].key_hash


def test_keys_are_unique_per_call(sessions: SessionFactory):
    with sessions() as session:
        keys = {create_api_key("alice@example.com", session=session) for _ in range(5)}
        assert len(keys) == 5
        assert {lookup_client(k, session=session) for k in keys} == {"alice@example.com"}


@pytest.mark.parametrize("key", ["", "rw_wrong", "x" * (MAX_KEY_CHARS + 1)])
def test_an_unknown_key_resolves_to_nobody(sessions: SessionFactory, key: str):
    with sessions() as session:
        create_api_key("alice@example.com", session=session)
        assert lookup_client(key, session=session) is None


def test_a_revoked_key_stops_working(sessions: SessionFactory):
    with sessions() as session:
        key = create_api_key("alice@example.com", session=session)
        other = create_api_key("alice@example.com", session=session)
        assert revoke_api_key(key, session=session) is True
        assert revoke_api_key(key, session=session) is False
        assert lookup_client(key, session=session) is None
        assert lookup_client(other, session=session) == "alice@example.com"


@pytest.mark.parametrize("client_id", ["", "   ", "x" * 256, "tab\there"])
def test_a_bad_client_id_is_refused(sessions: SessionFactory, client_id: str):
    with sessions() as session, pytest.raises(ValueError, match="client_id"):
        create_api_key(client_id, session=session)


def test_the_resolver_remembers_answers_for_its_ttl():
    clock = FakeClock()
    lookup = Mock(side_effect=lambda key: "alice" if key == "good" else None)
    resolver = KeyResolver(lookup, ttl_seconds=10, clock=clock)
    for _ in range(5):
        assert resolver.resolve("good") == "alice"
        assert resolver.resolve("bad") is None
    assert lookup.call_count == 2, "positive and negative answers are both remembered"
    clock.advance(10.5)
    lookup.side_effect = lambda key: None  # the key was revoked meanwhile
    assert resolver.resolve("good") is None
    assert lookup.call_count == 3


def test_the_resolver_stays_bounded():
    lookup = Mock(return_value="alice")
    resolver = KeyResolver(lookup, ttl_seconds=60, clock=FakeClock(), max_entries=3)
    for i in range(10):
        resolver.resolve(f"key-{i}")
    assert lookup.call_count == 10
    assert resolver.resolve("key-9") == "alice"
    assert lookup.call_count == 10, "the newest answer is still remembered"
    assert resolver.resolve("key-0") == "alice"
    assert lookup.call_count == 11, "old answers were dropped to stay within max_entries"
