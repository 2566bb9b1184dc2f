"""redis+cluster:// for real: 3 masters with a replica each (`redis-cli --cluster create`).

The whole cache contract (tests/unit/test_cache_contract.py) runs against the cluster;
then the faults that make sense there, under a writer and pollers: a master SIGKILLed
(its replica takes over) and a slot migrating (`redis-cli --cluster reshard`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.cache.backend import connect
from tests.cache_helpers import make_harness, open_db
from tests.topologies import Cluster, Load, redis_cluster, served_from_redis_after
from tests.unit.test_cache_contract import CacheContract

pytestmark = [pytest.mark.redis]


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the contract suite (its tests use private key namespaces)."""
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of the test's own, for the tests that break it."""
    with redis_cluster(tmp_path) as own:
        yield own


def _factory(url: str, socket_timeout: float) -> tuple[Callable[[], Any], list[Any]]:
    clients: list[Any] = []

    def factory() -> Any:
        client = connect(url, socket_timeout=socket_timeout)
        clients.append(client)
        return client

    return factory, clients


class TestContractOnRedisCluster(CacheContract):
    """The contract on a 3-master cluster: every script's keys must share one slot."""

    @pytest.fixture
    def client_factory(self, shared_cluster: Cluster) -> Iterator[Callable[[], Any]]:
        # A generous timeout, as on the single real Redis: correctness, not speed.
        factory, clients = _factory(shared_cluster.url(), 5.0)
        yield factory
        for client in clients:
            client.close()

    @pytest.fixture
    def key_ns(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"


def test_redis_mode_cluster_turns_a_redis_url_into_a_cluster_client(
    shared_cluster: Cluster,
) -> None:
    first = shared_cluster.nodes[0]
    client = connect(f"redis://127.0.0.1:{first.port}", socket_timeout=2, mode="cluster")
    try:
        # Keys on every master: only a cluster client follows the slots to them.
        for i in range(30):
            client.set(f"mode-probe-{i}", i)
        owners = {client.get_node_from_key(f"mode-probe-{i}").port for i in range(30)}
        assert len(owners) == 3
        assert [int(client.get(f"mode-probe-{i}")) for i in range(30)] == list(range(30))
    finally:
        client.close()


def test_sharded_pubsub_delivers_a_job_event(shared_cluster: Cluster) -> None:
    """SPUBLISH/SSUBSCRIBE (Redis >= 7): the message goes to the channel's shard only,
    not to every node of the cluster as PUBLISH does."""
    client = connect(shared_cluster.url(), socket_timeout=2)
    channel = "job:{42}:events"
    pubsub = client.pubsub()
    try:
        pubsub.ssubscribe(channel)
        deadline = time.monotonic() + 10
        got = None
        while time.monotonic() < deadline and got is None:
            client.spublish(channel, b"v7")
            message = pubsub.get_sharded_message(timeout=0.2)
            while message is not None and message["type"] != "smessage":
                message = pubsub.get_sharded_message(timeout=0.2)
            got = message
        assert got is not None, "no sharded message arrived"
        assert got["data"] == b"v7"
    finally:
        pubsub.close()
        client.close()


# -- faults under load ---------------------------------------------------------------------


def _load_on(cluster: Cluster, db: Any) -> tuple[Load, list[Any]]:
    factory, clients = _factory(cluster.url(), 0.5)
    base = make_harness(factory, db, "fo", real_clock=True, reset_seconds=1.0)
    return Load(writer=base, pollers=[base.another() for _ in range(4)]), clients


def _run(load: Load, during: Callable[[], str]) -> str:
    threads = [threading.Thread(target=load.write_forever, daemon=True)]
    threads += [
        threading.Thread(target=load.poll_forever, args=(i,), daemon=True)
        for i in range(len(load.pollers))
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        what = during()
        time.sleep(2.0)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(30)
    return what


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Any]:
    engine, sessions = open_db(sqlite_url)
    yield sessions
    engine.dispose()


@pytest.mark.failover
@pytest.mark.timeout(240)
def test_a_master_killed_under_load_costs_no_error_and_serves_nothing_stale(
    cluster: Cluster, db: Any
) -> None:
    load, clients = _load_on(cluster, db)

    def kill_a_master() -> str:
        victim, _ = cluster.masters()[0]
        killed = time.monotonic()
        victim.kill()
        deadline = time.monotonic() + 60
        while not (cluster.state_ok() and len(cluster.masters()) == 3):
            assert time.monotonic() < deadline, "the replica never took over"
            time.sleep(0.05)
        promoted = time.monotonic()
        resumed = served_from_redis_after(load, promoted, timeout=20)
        return (
            f"cluster failover: replica promoted {promoted - killed:.2f}s after SIGKILL, "
            f"caching resumed {resumed - promoted:.2f}s after the promotion "
            f"(t: kill {killed:.3f}, promotion {promoted:.3f})"
        )

    try:
        what = _run(load, kill_a_master)
    finally:
        for client in clients:
            client.close()
    report = (
        f"{what}; reads {load.reads}, writes {load.writes}, client errors "
        f"{len(load.errors)}, stale versions served {len(load.stale)} "
        f"(+{len(load.stale_in_window)} inside the writer's breaker window)"
    )
    print(report)
    assert load.errors == [], report + "\n" + "\n".join(load.errors[:10])
    assert load.stale == [], report + "\n" + "\n".join(load.stale[:10])
    assert not load.db_only or load.writer_recoveries, "the writer never recovered: " + report


@pytest.mark.failover
@pytest.mark.timeout(240)
def test_a_slot_migrating_during_polls_costs_no_error_and_serves_nothing_stale(
    cluster: Cluster, db: Any
) -> None:
    load, clients = _load_on(cluster, db)

    def reshard() -> str:
        (source, source_id), (_target, target_id) = cluster.masters()[:2]
        started = time.monotonic()
        cluster.cli(
            "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", source_id, "--cluster-to", target_id,
            "--cluster-slots", "2000", "--cluster-yes", "--cluster-pipeline", "100",
        )  # fmt: skip
        moved = time.monotonic()
        # Not vacuous: after the move every poller is served from Redis again.
        resumed = served_from_redis_after(load, moved, timeout=20)
        return (
            f"cluster reshard: 2000 slots moved in {moved - started:.2f}s, every poller "
            f"served from Redis {resumed - moved:.2f}s later"
        )

    try:
        what = _run(load, reshard)
    finally:
        for client in clients:
            client.close()
    report = (
        f"{what}; reads {load.reads}, writes {load.writes}, client errors "
        f"{len(load.errors)}, stale versions served {len(load.stale)} "
        f"(+{len(load.stale_in_window)} inside the writer's breaker window)"
    )
    print(report)
    assert load.reads > 100, report
    assert load.errors == [], report + "\n" + "\n".join(load.errors[:10])
    assert load.stale == [], report + "\n" + "\n".join(load.stale[:10])
    assert not load.db_only or load.writer_recoveries, "the writer never recovered: " + report
