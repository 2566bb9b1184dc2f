"""The cache's exceptions.

    CacheError                  a Redis call failed (refused, timed out, protocol)
     └── CorruptEntry           a key holds a value of the wrong Redis type

Redis's own exceptions never leave `shared.cache.backend`; they are translated there.
"""

from __future__ import annotations


class CacheError(Exception):
    """A Redis operation failed; the caller degrades to the database."""


class CorruptEntry(CacheError):
    """A key holds something that is not a cache value of ours (e.g. WRONGTYPE)."""

    def __init__(self, key: str, *, counted_hit: bool = False) -> None:
        super().__init__("a cache key holds a value that is not ours")
        self.key = key
        # True when Redis counted the read as a hit (a value was there, its seal was bad).
        self.counted_hit = counted_hit
