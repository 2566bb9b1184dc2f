"""Seals (`shared.cache.seal`): key ids, rotation through an accepted-keys list, and
secrets that never leave the process."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from shared.cache.seal import DEFAULT_SECRET, Sealer, key_id

KEY = "ns:job:{7}:progress"
VALUE = b'{"job_id":7,"client_id":"alice","version":3}'
OLD, NEW = b"s3cr3t-old-seal-key", b"s3cr3t-new-seal-key"


def sealed_in_another_process(secret: bytes, key: str, value: bytes) -> bytes:
    """A seal made by a separate Python process holding only `secret`."""
    code = (
        "import sys; from shared.cache.seal import Sealer; "
        "seal = Sealer(sys.argv[1].encode()).seal(sys.argv[2], sys.argv[3].encode()); "
        "sys.stdout.buffer.write(seal)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, secret.decode(), key, value.decode()],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_a_seal_names_its_key_by_id_and_never_carries_the_secret():
    seal = Sealer(NEW).seal(KEY, VALUE)
    kid, _, mac = seal.partition(b".")
    assert kid.decode() == key_id(NEW) and len(kid) == 8
    assert len(mac) == 32 and int(mac, 16) >= 0
    assert NEW not in seal and NEW.hex().encode() not in seal
    assert key_id(NEW) != key_id(OLD)


def test_an_entry_sealed_by_a_process_on_the_old_key_verifies_where_the_list_is_new_then_old():
    old_seal = sealed_in_another_process(OLD, KEY, VALUE)
    rotating = Sealer.from_secrets([NEW, OLD])

    assert rotating.verify(KEY, VALUE, old_seal)
    # It seals with the newest key only; a process still on the old key alone refuses that.
    new_seal = rotating.seal(KEY, VALUE)
    assert new_seal.startswith(key_id(NEW).encode())
    assert Sealer(NEW).verify(KEY, VALUE, new_seal)
    assert not Sealer(OLD).verify(KEY, VALUE, new_seal)


def test_a_key_removed_from_the_list_verifies_nothing():
    old_seal = Sealer(OLD).seal(KEY, VALUE)
    assert Sealer.from_secrets([NEW, OLD]).verify(KEY, VALUE, old_seal)
    assert not Sealer.from_secrets([NEW]).verify(KEY, VALUE, old_seal)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda seal: seal.replace(key_id(OLD).encode(), key_id(NEW).encode()),  # other key id
        lambda seal: seal[:-1] + (b"0" if seal[-1:] != b"0" else b"1"),  # one digit of the MAC
        lambda seal: seal.split(b".", 1)[0],  # the key id alone
        lambda seal: b"",
        lambda seal: b"not.a.seal",
    ],
)
def test_a_tampered_seal_is_refused(tamper):
    seal = Sealer(OLD).seal(KEY, VALUE)
    assert not Sealer.from_secrets([NEW, OLD]).verify(KEY, VALUE, tamper(seal))


def test_a_seal_binds_the_value_and_the_key_it_was_written_to():
    sealer = Sealer.from_secrets([NEW, OLD])
    seal = sealer.seal(KEY, VALUE)
    assert sealer.verify(KEY, VALUE, seal)
    assert not sealer.verify(KEY, VALUE + b" ", seal)
    assert not sealer.verify("ns:job:{8}:progress", VALUE, seal)
    assert not sealer.verify(KEY, VALUE, None)


def test_a_bare_seal_from_before_key_ids_verifies_with_any_listed_key():
    """Entries written by the previous version (no key id) stay hits through the upgrade."""
    bare = hashlib.blake2b(key=OLD, digest_size=16)
    bare.update(KEY.encode() + b"\x00" + VALUE)
    legacy = bare.hexdigest().encode()
    assert Sealer.from_secrets([NEW, OLD]).verify(KEY, VALUE, legacy)
    assert not Sealer.from_secrets([NEW]).verify(KEY, VALUE, legacy)


def test_no_list_means_the_public_default_and_one_key_is_the_same_as_a_list_of_one():
    assert Sealer.from_secrets([]).key_ids == Sealer().key_ids == (key_id(DEFAULT_SECRET),)
    assert Sealer.from_secrets([NEW]).key_ids == Sealer(NEW).key_ids
    # A secret listed twice is one key.
    assert Sealer.from_secrets([NEW, OLD, NEW]).key_ids == (key_id(NEW), key_id(OLD))


def test_the_secrets_never_show_in_repr_or_errors():
    sealer = Sealer.from_secrets([NEW, OLD])
    text = repr(sealer) + str(sealer.key_ids)
    assert key_id(NEW) in text and key_id(OLD) in text
    assert "s3cr3t" not in text
    with pytest.raises(ValueError) as info:
        Sealer.from_secrets([NEW, b""])
    assert "s3cr3t" not in str(info.value) and "empty" in str(info.value)
