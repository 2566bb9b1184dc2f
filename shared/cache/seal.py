"""Seals: a keyed MAC over every cached value, bound to the Redis key it was written to.

A value read from Redis is served only when its seal verifies, that is when this cache
wrote exactly these bytes at exactly this key. Anything else found at a key we read is a
bad entry (a miss, deleted, counted as an error): garbage, another job's value copied
over, and the one case no shape check can see, a well-formed job object naming another
owner or carrying forged progress, planted by a bug, another deployment or whoever can
write to Redis. Ownership checks on hits compare the requester with the value's
`client_id`; the seal is what makes that field trustworthy without a database read.

Cost: one 128-bit BLAKE2b over the value (~0.5 KB) per hit, well under a microsecond;
the seal travels in the same script call as the value (no extra round trip).

The secret: `Sealer(secret)`. The default key is public (it is in this file), so
without a deployment secret the seal stops corrupted, misplaced and foreign values
but not a deliberate forger who has read this source: production passes a secret.
"""

from __future__ import annotations

import hashlib
import hmac

DEFAULT_SECRET = b"renderwatch cache seal v1 (public default: configure a deployment secret)"


class Sealer:
    """Computes and checks seals (hex BLAKE2b-128, keyed) of cached values."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes = DEFAULT_SECRET) -> None:
        if not secret:
            raise ValueError("the cache seal secret must not be empty")
        # BLAKE2b takes keys up to 64 bytes; a longer secret is hashed down to that.
        self._key = secret if len(secret) <= 64 else hashlib.sha512(secret).digest()

    def seal(self, key: str, value: bytes) -> bytes:
        """The seal of `value` stored at `key`."""
        mac = hashlib.blake2b(key=self._key, digest_size=16)
        mac.update(key.encode())
        mac.update(b"\x00")
        mac.update(value)
        return mac.hexdigest().encode()

    def verify(self, key: str, value: bytes, seal: bytes | None) -> bool:
        """True when `seal` is this cache's seal of `value` at `key` (constant time)."""
        return seal is not None and hmac.compare_digest(self.seal(key, value), bytes(seal))


def page_key(list_key: str, page: str) -> str:
    """What a list page's seal is bound to: the list's key and the page's field."""
    return f"{list_key}#{page}"
