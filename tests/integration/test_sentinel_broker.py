"""Redis Sentinel as the Celery broker: a render goes through kombu's `sentinel://` URL.

A private topology on free loopback ports (`SentinelBrokerTopology` below): a master
and a replica that both require a password, and a sentinel that requires a password of
its own and names the master `rwbroker`. The worker and the sender know only the
sentinel: the master's address comes from it, the passwords from the URL (the master's)
and CELERY_BROKER_SENTINEL_PASSWORD (the sentinel's). Neither password may show in the
worker's log.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from shared import jobs
from shared.queue import create_celery, enqueue_render
from shared.runtime import Runtime
from shared.settings import Settings
from tests import procs
from tests.conftest import require

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.celery]

MASTER_NAME = "rwbroker"


@dataclass
class SentinelBrokerTopology:
    """Master + replica + one sentinel as `redis-server` processes (a minimal launcher for
    the broker test; stopped together by the ExitStack that started them)."""

    master_port: int
    replica_port: int
    sentinel_port: int
    password: str
    sentinel_password: str
    servers: dict[str, procs.ServiceProcess] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, resources: ExitStack) -> SentinelBrokerTopology:
        binary = procs.redis_server_binary()
        assert binary is not None
        top = cls(
            procs.free_port(),
            procs.free_port(),
            procs.free_port(),
            password=f"master-{uuid.uuid4().hex}",
            sentinel_password=f"sentinel-{uuid.uuid4().hex}",
        )
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        auth = ["--requirepass", top.password, "--masterauth", top.password]
        replica_of = ["--replicaof", "127.0.0.1", str(top.master_port)]
        for name, port, extra in (
            ("master", top.master_port, []),
            ("replica", top.replica_port, replica_of),
        ):
            data = workdir / name
            data.mkdir(parents=True)
            args = [binary, "--port", str(port), "--dir", str(data), *common, *auth, *extra]
            proc = procs.ServiceProcess(f"redis {name}", args, {}, data / "redis.log")
            top.servers[name] = resources.enter_context(
                procs.running(proc, lambda p: p.wait_for_log("Ready to accept", timeout=10))
            )
        top.wait_replicated()
        # A sentinel rewrites its config file: it must be a writable file of its own.
        conf = workdir / "sentinel.conf"
        conf.write_text(
            f"port {top.sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"requirepass {top.sentinel_password}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {top.master_port} 1\n"
            f"sentinel auth-pass {MASTER_NAME} {top.password}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
        )
        args = [binary, str(conf), "--sentinel"]
        sentinel = procs.ServiceProcess("sentinel", args, {}, workdir / "sentinel.log")
        top.servers["sentinel"] = resources.enter_context(
            procs.running(sentinel, lambda p: p.wait_for_log(r"\+monitor master", timeout=10))
        )
        # Wait until the sentinel knows the replica: only then can it promote it.
        sentinel.wait_for_log(r"\+slave slave", timeout=20)
        return top

    def kill_master(self) -> None:
        """SIGKILL the master, then wait for the sentinel to promote the replica."""
        master = self.servers["master"]
        os.kill(master.pid, signal.SIGKILL)
        self.servers["sentinel"].wait_for_log(r"\+switch-master", timeout=30)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=2)

    def wait_replicated(self) -> None:
        replica = self.client(self.replica_port)
        try:
            procs.wait_until(
                lambda: replica.info("replication").get("master_link_status") == "up",
                timeout=15,
                what="the replica to sync with the master",
            )
        finally:
            replica.close()


@pytest.fixture
def sentinel_broker(tmp_path: Path) -> Iterator[SentinelBrokerTopology]:
    require("redis-server (binary)", procs.redis_server_binary() is not None)
    with ExitStack() as resources:
        yield SentinelBrokerTopology.start(tmp_path / "sentinel", resources)


def broker_settings(top: SentinelBrokerTopology, make_settings: Any, **values: Any) -> Settings:
    return cast(
        Settings,
        make_settings(
            celery_broker_url=(
                f"sentinel://:{top.password}@127.0.0.1:{top.sentinel_port}/0"
                f"?master_name={MASTER_NAME}"
            ),
            celery_broker_sentinel_password=top.sentinel_password,
            scene_seconds=0.05,
            log_level="INFO",
            **values,
        ),
    )


def finished(runtime: Runtime, job_id: int) -> Callable[[], bool]:
    def check() -> bool:
        with runtime.sessions() as session:
            view = jobs.get_job(job_id, session=session)
        assert view is not None
        return view.status == "succeeded"

    return check


def create_job(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return jobs.create_job(
            session=session, client_id="sentinel@test", prompt="a fox", scenes_total=3
        ).job_id


@pytest.mark.timeout(180)
def test_a_render_completes_through_a_sentinel_broker_url(
    sentinel_broker, pg_url, redis_url, namespace, make_settings, tmp_path
):
    top = sentinel_broker
    queue = f"test-{namespace}"
    settings = broker_settings(
        top,
        make_settings,
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        celery_queue=queue,
    )
    runtime = Runtime.start(settings)
    celery = create_celery(settings)
    master = top.client(top.master_port)
    replica = top.client(top.replica_port)
    try:
        job_id = create_job(runtime)
        env = procs.settings_env(settings)
        with procs.celery_worker(env, tmp_path, queue=queue) as worker:
            started = time.monotonic()
            enqueue_render(celery, job_id)
            procs.wait_until(finished(runtime, job_id), timeout=60, what=f"job {job_id}")
            elapsed = time.monotonic() - started
            log = worker.log()
        # The broker's state is on the master the sentinel named, and replicated.
        binding = f"_kombu.binding.{queue}".encode()
        on_master = master.exists(binding)
        top.wait_replicated()
        on_replica = replica.exists(binding)
    finally:
        master.close()
        replica.close()
        celery.close()
        runtime.close()

    print(f"\nSENTINEL BROKER: 3-scene render finished {elapsed:.2f}s after enqueue")
    assert on_master and on_replica, "the queue's binding is not on the sentinel's master"
    assert "sentinel://" in log, "the worker's banner should name the sentinel transport"
    assert top.password not in log and top.sentinel_password not in log, "a password leaked"


@pytest.mark.timeout(240)
def test_worker_and_sender_follow_the_broker_to_the_promoted_replica(
    sentinel_broker, pg_url, make_settings, tmp_path
):
    """The master is SIGKILLed and the sentinel promotes the replica: the running worker
    reconnects through the sentinel, and a job sent afterwards renders."""
    top = sentinel_broker
    settings = broker_settings(
        top, make_settings, database_url=pg_url, redis_url="", celery_queue="renders"
    )
    runtime = Runtime.start(settings)
    celery = create_celery(settings)
    try:
        env = procs.settings_env(settings)
        with procs.celery_worker(env, tmp_path, queue="renders") as worker:
            before = create_job(runtime)
            enqueue_render(celery, before)
            procs.wait_until(finished(runtime, before), timeout=60, what="the first job")
            top.kill_master()
            promoted_at = time.monotonic()
            after = create_job(runtime)
            enqueue_render(celery, after)
            procs.wait_until(finished(runtime, after), timeout=90, what="the job after failover")
            recovered = time.monotonic() - promoted_at
            log = worker.log()
        new_master = top.client(top.replica_port)
        try:
            role = new_master.info("replication")["role"]
        finally:
            new_master.close()
    finally:
        celery.close()
        runtime.close()
    print(f"\nSENTINEL BROKER FAILOVER: job sent after promotion rendered in {recovered:.2f}s")
    assert role == "master", "the sentinel did not promote the replica"
    assert top.password not in log and top.sentinel_password not in log, "a password leaked"
