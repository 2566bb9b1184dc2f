"""Redis key names (`shared.cache.keys`): the DESIGN patterns, namespaces and Cluster hash
tags (keys touched together must live in one slot)."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from shared.cache.keys import KeySpace
from tests.cache_helpers import STEPS, RecordingClient, make_harness, open_db


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_the_design_patterns_without_a_namespace() -> None:
    keys = KeySpace()
    assert keys.job(123) == "job:{123}:progress"
    assert keys.jobs("user@example.com") == "jobs:{user@example.com}"
    assert keys.storyboard(123) == "storyboard:{123}"


def test_a_namespace_and_a_prefix_precede_every_key() -> None:
    keys = KeySpace(namespace="prod-eu:", job_prefix="render")
    names = [keys.job(1), keys.lease(1), keys.channel(1), keys.jobs("c"), keys.storyboard(1)]
    names.append(keys.stats())
    assert all(name.startswith("prod-eu:") for name in names)
    assert keys.job(1) == "prod-eu:render:{1}:progress"


@pytest.mark.parametrize("namespace", ["", "ns:", "t-0123456789ab:"])
@pytest.mark.parametrize("job_id", [1, 42, 99_999, 2**40])
def test_a_jobs_keys_share_one_cluster_slot(namespace: str, job_id: int) -> None:
    keys = KeySpace(namespace=namespace)
    each = (keys.job, keys.lease, keys.seal, keys.floor, keys.channel, keys.storyboard)
    slots = {slot(k(job_id)) for k in each}
    assert len(slots) == 1


@pytest.mark.parametrize("namespace", ["", "ns:", "t-0123456789ab:"])
def test_statistics_batch_markers_share_the_stats_hash_slot_and_namespace(namespace: str) -> None:
    keys = KeySpace(namespace=namespace)
    marker = keys.stats_batch("0a1b-7")
    assert slot(marker) == slot(keys.stats())
    assert marker.startswith(namespace) and marker != keys.stats()


def test_keys_are_distinct_per_job_and_per_client() -> None:
    keys = KeySpace()
    assert len({keys.job(i) for i in range(1_000)}) == 1_000
    assert keys.jobs("a") != keys.jobs("b")
    assert keys.job(1) != keys.lease(1) != keys.channel(1)


def test_namespaces_cannot_break_the_hash_tags(make_settings: Any) -> None:
    assert make_settings(cache_namespace="team-a.prod_1").key_namespace == "team-a.prod_1:"
    assert make_settings(cache_namespace="").key_namespace == ""
    for bad in ("a{b}", "a:b", "a b", "a}"):
        with pytest.raises(ValidationError):
            make_settings(cache_namespace=bad)


def test_the_lists_of_clients_are_independent_of_each_other() -> None:
    keys = KeySpace()
    assert keys.jobs("alice") != keys.jobs("alice2")
    assert slot(keys.jobs("alice")) == slot("{alice}")


def test_every_script_call_touches_a_single_cluster_slot(sqlite_url: str) -> None:
    engine, sessions = open_db(sqlite_url)
    server = fakeredis.FakeServer()
    try:
        h = make_harness(lambda: fakeredis.FakeRedis(server=server), sessions, "ns", recording=True)
        job = h.new_job()
        h.cache.get(job.job_id)
        h.cache.update_progress(job.job_id, STEPS[0])
        h.cache.get_list("alice@example.com", "p1", lambda: b"[]")
        h.cache.invalidate_job(job.job_id)
        h.cache.get(9_999)
        client = h.client
        assert isinstance(client, RecordingClient)
        scripts = [args for name, args in client.commands if name == "EVALSHA"]
        assert len(scripts) >= 5
        for args in scripts:
            count = int(args[1])
            keys = [str(k) for k in args[2 : 2 + count]]
            assert len({slot(k) for k in keys}) == 1, keys
    finally:
        engine.dispose()
