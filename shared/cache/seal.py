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

Keys and rotation: `Sealer.from_secrets([newest, ..., oldest])` seals with the first
secret and verifies with any of them. A seal reads `<key id>.<mac>`: the key id (8 hex,
a keyed hash of the secret, never the secret) names the key that made it, so checking
a seal costs one MAC whichever key made it, and a process whose list holds both the old
and the new key accepts entries of processes that still seal with the old one (README,
"Rotating the seal key"). A key no longer in the list verifies nothing. Seals written
before key ids existed (a bare MAC) are checked against every key, so an upgrade costs
no refills either.

The default key is public (it is in this file), so without a deployment secret the seal
stops corrupted, misplaced and foreign values but not a deliberate forger who has read
this source: production passes a secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

DEFAULT_SECRET = b"renderwatch cache seal v1 (public default: configure a deployment secret)"

KEY_ID_BYTES = 4
_SEPARATOR = b"."
_KEY_ID_PERSON = b"rw-seal-key-id"


def _mac_key(secret: bytes) -> bytes:
    # BLAKE2b takes keys up to 64 bytes; a longer secret is hashed down to that.
    return secret if len(secret) <= 64 else hashlib.sha512(secret).digest()


def key_id(secret: bytes) -> str:
    """The public name of a seal secret: a keyed hash of a constant, 8 hex digits.

    It tells keys apart and reveals nothing a seal does not already reveal."""
    mac = hashlib.blake2b(
        b"key id", key=_mac_key(secret), digest_size=KEY_ID_BYTES, person=_KEY_ID_PERSON
    )
    return mac.hexdigest()


class Sealer:
    """Computes and checks seals (key id + hex BLAKE2b-128, keyed) of cached values."""

    __slots__ = ("_keys", "_sealing_id", "_sealing_key")

    def __init__(self, secret: bytes = DEFAULT_SECRET, *accepted: bytes) -> None:
        """Seal with `secret`; verify seals made with it or with any `accepted` older one."""
        secrets = (secret, *accepted)
        if not all(secrets):
            raise ValueError("a cache seal secret must not be empty")
        keys: dict[bytes, bytes] = {}
        for one in secrets:
            kid, mac_key = key_id(one).encode(), _mac_key(one)
            if keys.setdefault(kid, mac_key) != mac_key:
                # 1 in 4 billion per pair: say which position, never the secrets.
                position = secrets.index(one) + 1
                raise ValueError(
                    f"cache seal key #{position} has the same key id as another one: "
                    "replace one of them"
                )
        self._keys = keys
        self._sealing_id = key_id(secret).encode()
        self._sealing_key = keys[self._sealing_id]

    @classmethod
    def from_secrets(cls, secrets: Iterable[bytes]) -> Sealer:
        """From a list, newest first (the first seals, all verify); empty: the public key."""
        listed = list(secrets)
        return cls(*listed) if listed else cls()

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids this sealer accepts, the sealing one first (safe to log)."""
        return tuple(kid.decode() for kid in self._keys)

    def __repr__(self) -> str:
        return f"Sealer(key_ids={list(self.key_ids)!r})"

    def seal(self, key: str, value: bytes) -> bytes:
        """The seal of `value` stored at `key`, naming the key that made it."""
        return self._sealing_id + _SEPARATOR + _mac(self._sealing_key, key, value)

    def verify(self, key: str, value: bytes, seal: bytes | None) -> bool:
        """True when `seal` is a seal of `value` at `key` by one of our keys (constant time)."""
        if seal is None:
            return False
        kid, separator, mac = bytes(seal).rpartition(_SEPARATOR)
        if not separator:
            # A bare MAC from before key ids: whichever of our keys made it.
            return any(
                hmac.compare_digest(_mac(mac_key, key, value), mac)
                for mac_key in self._keys.values()
            )
        mac_key = self._keys.get(kid)
        return mac_key is not None and hmac.compare_digest(_mac(mac_key, key, value), mac)


def _mac(mac_key: bytes, key: str, value: bytes) -> bytes:
    mac = hashlib.blake2b(key=mac_key, digest_size=16)
    mac.update(key.encode())
    mac.update(b"\x00")
    mac.update(value)
    return mac.hexdigest().encode()


def page_key(list_key: str, page: str) -> str:
    """What a list page's seal is bound to: the list's key and the page's field."""
    return f"{list_key}#{page}"
