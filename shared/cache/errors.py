"""The cache's exceptions and error classes.

    CacheError                  a Redis call failed (refused, timed out, protocol)
     └── CorruptEntry           a key holds a value of the wrong Redis type

Redis's own exceptions never leave `shared.cache.backend` / `shared.cache.aio`; there
they become a `machine.Failed` result whose `ErrorClass` says what the failure means to
the cache (README "The cache and its guarantees"):

- UNAVAILABLE: connection, timeout, protocol, READONLY (a demoted master: the client must
  reconnect). The circuit breaker counts it.
- REFUSED: Redis is up but refuses work now (OOM under `noeviction`, BUSY). This call
  degrades to the database; the breaker does not flap on it.
- OVERLOAD: our own connection pool is full (a burst). This call goes to the database.
- DATA: our own data in Redis is bad (a wrong type, a non-integer counter). The bad key
  is dropped; caching is never disabled for it.
"""

from __future__ import annotations

import enum


class CacheError(Exception):
    """A Redis operation failed; the caller degrades to the database."""


class CorruptEntry(CacheError):
    """A key holds something that is not a cache value of ours (e.g. WRONGTYPE).

    Kept for callers that name it; the cache itself reports a bad key as a result
    (`machine.Foreign`), never by raising this.
    """

    def __init__(self, key: str, *, counted_hit: bool = False) -> None:
        super().__init__("a cache key holds a value that is not ours")
        self.key = key
        self.counted_hit = counted_hit


class ErrorClass(enum.Enum):
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    OVERLOAD = "overload"
    DATA = "data"


def classify_response(message: str) -> ErrorClass:
    """The class of a Redis error reply (its first word is the error code)."""
    code = message.split(" ", 1)[0].upper()
    if code == "READONLY":
        return ErrorClass.UNAVAILABLE
    if code in ("OOM", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN"):
        return ErrorClass.REFUSED
    if code == "WRONGTYPE" or "not an integer" in message or "not a valid float" in message:
        return ErrorClass.DATA
    return ErrorClass.UNAVAILABLE
