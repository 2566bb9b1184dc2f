"""API keys: random tokens shown once, stored as SHA-256 hashes.

`KeyResolver` keeps resolved keys in process for `api_key_cache_seconds`, so a
cached poll costs no database round trip for auth; a revoked key stops working
within that bound.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.models import ApiKey, utcnow
from shared.schemas import MAX_CLIENT_ID_CHARS

KEY_PREFIX = "rw_"
MAX_KEY_CHARS = 128


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(client_id: str, *, session: Session) -> str:
    """Create and store a key for `client_id`; returns the key (never stored in clear)."""
    client_id = client_id.strip()
    if not client_id or len(client_id) > MAX_CLIENT_ID_CHARS or not client_id.isprintable():
        raise ValueError(f"client_id: must be 1 to {MAX_CLIENT_ID_CHARS} printable characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(client_id=client_id, key_hash=hash_key(key)))
    session.commit()
    return key


def revoke_api_key(key: str, *, session: Session) -> bool:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def lookup_client(key: str, *, session: Session) -> str | None:
    """The client of a valid, unrevoked key, else None."""
    if not key or len(key) > MAX_KEY_CHARS:
        return None
    client = session.scalar(
        select(ApiKey.client_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    )
    session.rollback()
    return client


class KeyResolver:
    """Key → client_id with a short in-process memory (positive and negative answers)."""

    def __init__(
        self,
        lookup: Callable[[str], str | None],
        *,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self._lookup = lookup
        self._ttl = ttl_seconds
        self._clock = clock
        self._max = max_entries
        self._entries: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def remembered(self, key: str) -> tuple[bool, str | None]:
        """(True, client or None) when the answer is in memory; (False, None) if a lookup is due.

        Never does I/O, so an async caller can use it on the event loop.
        """
        entry = self._entries.get(hash_key(key))
        if entry is not None and entry[0] > self._clock():
            return True, entry[1]
        return False, None

    def resolve(self, key: str) -> str | None:
        """The key's client (None if invalid), from memory or from the lookup."""
        known, client = self.remembered(key)
        if known:
            return client
        digest = hash_key(key)
        now = self._clock()
        client = self._lookup(key)
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[digest] = (now + self._ttl, client)
        return client
