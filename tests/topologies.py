"""Redis topologies for tests, started for real on free loopback ports.

Each node is its own `redis-server` process in its own process group (tests/procs.py
`ServiceProcess`), with its data and log under the test's tmp_path; leaving a context
manager stops every node (SIGTERM, then SIGKILL of the group).

    with tls_redis(tmp_path) as tls:            # TLS server, certificates made by trustme
    with sentinel_setup(tmp_path) as s:         # master + replica + 3 sentinels
    with redis_cluster(tmp_path) as c:          # 3 masters (+ 1 replica each)

`Load` drives a writer and pollers (each its own JobCache) while a test breaks the
topology, recording errors and any version older than the DB's that was served.

`need_redis_binaries()` skips loudly without `redis-server`/`redis-cli` and fails when CI
is set (tests/conftest.py `require`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.cache_helpers import STEPS, Harness
from tests.conftest import require
from tests.procs import ServiceProcess, wait_until

SERVICE = "mymaster"


def need_redis_binaries() -> None:
    require("redis-server binary", shutil.which("redis-server") is not None)
    require("redis-cli binary", shutil.which("redis-cli") is not None)


def free_port_pair() -> int:
    """A free port whose +10000 neighbour (a cluster node's bus port) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


@dataclass
class Node:
    """One redis-server (or sentinel) process."""

    name: str
    port: int
    workdir: Path
    args: list[str]
    password: str | None = None
    proc: ServiceProcess | None = None

    def start(self, *, timeout: float = 15.0) -> Node:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = ServiceProcess(
            self.name, [binary, *self.args], os.environ, self.workdir / "server.log"
        ).start()
        wait_until(self.pings, timeout=timeout, what=f"{self.name} to answer PING")
        return self

    def client(self, **kwargs: Any) -> redis.Redis:
        options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 1}
        options.update(kwargs)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **options)

    def pings(self) -> bool:
        if self.proc is not None and not self.proc.alive():
            raise AssertionError(f"{self.name} exited:\n{self.proc.log()[-3000:]}")
        client = self.client(socket_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash (the process group, so nothing lingers)."""
        assert self.proc is not None and self.proc.popen is not None
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)


def _server_args(port: int, workdir: Path, *extra: str) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        *extra,
    ]  # fmt: skip


# -- TLS ----------------------------------------------------------------------------------


@dataclass
class TlsRedis:
    node: Node
    ca_file: Path
    wrong_ca_file: Path

    @property
    def port(self) -> int:
        return self.node.port


@contextmanager
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A redis-server that speaks only TLS, its certificate signed by a test CA."""
    import trustme

    need_redis_binaries()
    certs = tmp_path / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server_cert.private_key_pem.write_to_path(str(certs / "server.key"))
    server_cert.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    trustme.CA().cert_pem.write_to_path(str(certs / "wrong-ca.pem"))
    port = free_port_pair()
    workdir = tmp_path / f"tls-{port}"
    node = Node(
        f"redis-tls :{port}",
        port,
        workdir,
        _server_args(
            0, workdir,
            "--tls-port", str(port),
            "--tls-cert-file", str(certs / "server.pem"),
            "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "ca.pem"),
            "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    # The readiness check must itself speak TLS.
    original_client = node.client
    node.client = lambda **kw: original_client(  # type: ignore[method-assign]
        ssl=True, ssl_ca_certs=str(certs / "ca.pem"), **kw
    )
    try:
        node.start()
        yield TlsRedis(node, certs / "ca.pem", certs / "wrong-ca.pem")
    finally:
        node.stop()


# -- Sentinel -------------------------------------------------------------------------------


@dataclass
class SentinelSetup:
    master: Node
    replica: Node
    sentinels: list[Node]
    password: str | None
    nodes: dict[int, Node] = field(default_factory=dict)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/{db}"

    def master_address(self) -> tuple[str, int] | None:
        """What the sentinels agree the master is (None while any disagrees or is down)."""
        seen = set()
        for sentinel in self.sentinels:
            if sentinel.proc is None or not sentinel.proc.alive():
                continue
            client = sentinel.client(socket_timeout=1)
            try:
                reply: Any = client.sentinel_get_master_addr_by_name(SERVICE)
                host, port = reply
                seen.add((str(host), int(port)))
            except (redis.RedisError, OSError, TypeError):
                return None
            finally:
                client.close()
        return seen.pop() if len(seen) == 1 else None

    def current_master(self) -> Node:
        address = self.master_address()
        assert address is not None, "the sentinels do not agree on a master"
        return self.nodes[address[1]]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the replica and the two other sentinels."""

        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client(socket_timeout=1)
                try:
                    replicas: Any = client.sentinel_slaves(SERVICE)
                    peers: Any = client.sentinel_sentinels(SERVICE)
                    master: Any = client.sentinel_master(SERVICE)
                except (redis.RedisError, OSError):
                    return False
                finally:
                    client.close()
                flags = str(master.get("flags", ""))
                if len(peers) < 2 or "down" in flags:
                    return False
                if not any("s_down" not in str(r.get("flags", "")) for r in replicas):
                    return False
            return True

        wait_until(ready, timeout=timeout, interval=0.2, what="the sentinels to see everyone")


@contextmanager
def sentinel_setup(
    tmp_path: Path, *, password: str | None = None, down_after_ms: int = 1000
) -> Iterator[SentinelSetup]:
    """A master, its replica and 3 sentinels (quorum 2). With `password`, the data nodes
    require it and the sentinels do not (README "Running in production")."""
    need_redis_binaries()
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    with ExitStack() as stack:
        m_port = free_port_pair()
        master = Node(
            f"master :{m_port}",
            m_port,
            tmp_path / f"master-{m_port}",
            _server_args(m_port, tmp_path / f"master-{m_port}", *auth),
            password,
        ).start()
        stack.callback(master.stop)
        r_port = free_port_pair()
        replica = Node(
            f"replica :{r_port}",
            r_port,
            tmp_path / f"replica-{r_port}",
            _server_args(
                r_port,
                tmp_path / f"replica-{r_port}",
                *("--replicaof", "127.0.0.1", str(m_port), *auth),
            ),
            password,
        ).start()
        stack.callback(replica.stop)
        wait_until(
            lambda: replica.client().info("replication").get("master_link_status") == "up",
            timeout=20,
            what="the replica to sync",
        )
        sentinels = []
        for _ in range(3):
            port = free_port_pair()
            workdir = tmp_path / f"sentinel-{port}"
            workdir.mkdir(parents=True)
            conf = workdir / "sentinel.conf"
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {workdir}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {m_port} 2",
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
                f"sentinel failover-timeout {SERVICE} 10000",
                f"sentinel parallel-syncs {SERVICE} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {SERVICE} {password}")
            conf.write_text("\n".join(lines) + "\n")
            sentinel = Node(f"sentinel :{port}", port, workdir, [str(conf), "--sentinel"])
            sentinel.start()
            stack.callback(sentinel.stop)
            sentinels.append(sentinel)
        setup = SentinelSetup(master, replica, sentinels, password)
        setup.nodes = {m_port: master, r_port: replica}
        setup.wait_ready()
        yield setup


# -- Cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: list[Node]

    def url(self) -> str:
        masters = self.nodes[:3]
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in masters)

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        cli = shutil.which("redis-cli")
        assert cli is not None
        done = subprocess.run(
            [cli, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"redis-cli {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def masters(self) -> list[tuple[Node, str]]:
        """(node, node id) of every live master, from CLUSTER NODES as a live node sees it."""
        for node in self.nodes:
            if node.proc is None or not node.proc.alive():
                continue
            client = node.client()
            try:
                nodes: Any = client.execute_command("CLUSTER NODES")
            finally:
                client.close()
            by_port = {n.port: n for n in self.nodes}
            result = []
            for address, info in nodes.items():
                flags = str(info["flags"])
                if "master" in flags and "fail" not in flags and info.get("connected", True):
                    result.append((by_port[int(address.rsplit(":", 1)[1])], str(info["node_id"])))
            return result
        raise AssertionError("no cluster node is alive")

    def replicas_synced(self) -> bool:
        for node in self.nodes:
            if node.proc is None or not node.proc.alive():
                continue
            client = node.client(socket_timeout=1)
            try:
                info: Any = client.info("replication")
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def state_ok(self) -> bool:
        for node in self.nodes:
            if node.proc is None or not node.proc.alive():
                continue
            client = node.client(socket_timeout=1)
            try:
                info: Any = client.execute_command("CLUSTER INFO")
            except (redis.RedisError, OSError):
                return False
            finally:
                client.close()
            if info.get("cluster_state") != "ok":
                return False
        return True


@contextmanager
def redis_cluster(tmp_path: Path, *, masters: int = 3, replicas: int = 1) -> Iterator[Cluster]:
    """`masters` masters with `replicas` replicas each (`redis-cli --cluster create`)."""
    need_redis_binaries()
    with ExitStack() as stack:
        nodes: list[Node] = []
        for _ in range(masters * (1 + replicas)):
            port = free_port_pair()
            workdir = tmp_path / f"cluster-{port}"
            node = Node(
                f"cluster :{port}",
                port,
                workdir,
                _server_args(
                    port, workdir,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(workdir / "nodes.conf"),
                    "--cluster-node-timeout", "1000",
                    "--cluster-require-full-coverage", "yes",
                ),
            ).start()  # fmt: skip
            stack.callback(node.stop)
            nodes.append(node)
        cluster = Cluster(nodes)
        addresses: Sequence[str] = [f"127.0.0.1:{n.port}" for n in nodes]
        cluster.cli(
            "--cluster", "create", *addresses,
            "--cluster-replicas", str(replicas), "--cluster-yes",
        )  # fmt: skip
        wait_until(cluster.state_ok, timeout=30, interval=0.2, what="cluster_state:ok everywhere")
        # A replica that never finished its first sync cannot take over its master.
        wait_until(cluster.replicas_synced, timeout=60, interval=0.2, what="every replica in sync")
        # --cluster create gives the first `masters` addresses the masters.
        yield cluster


def wait_for(predicate: Any, *, timeout: float, what: str) -> float:
    """`wait_until` that returns the monotonic time at which `predicate` first held."""
    wait_until(predicate, timeout=timeout, interval=0.02, what=what)
    return time.monotonic()


# -- load under failover --------------------------------------------------------------------


@dataclass
class Load:
    """A writer walking jobs through their steps and pollers reading them, each its own
    JobCache (as separate processes would hold), all recording what they saw."""

    writer: Harness
    pollers: list[Harness]
    jobs: list[int] = field(default_factory=list)
    committed: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    # Versions older than the DB's served outside the window below: the cache's guarantee
    # says never.
    stale: list[str] = field(default_factory=list)
    # Older versions served inside the one window the README documents ("Known window"): the
    # DB's version was written while the writer's own breaker was open (DB only, no
    # pre-warm), and the writer had not yet recovered and repaired (plus `repair_slack`).
    stale_in_window: list[str] = field(default_factory=list)
    # (job, version) written to the database only -> when; and when the writer recovered.
    db_only: dict[tuple[int, int], float] = field(default_factory=dict)
    writer_recoveries: list[float] = field(default_factory=list)
    repair_slack: float = 0.5
    reads: int = 0
    writes: int = 0
    # (monotonic time, poller index, served from Redis?) of every read
    served: list[tuple[float, int, bool]] = field(default_factory=list)

    def write_forever(self) -> None:
        steps: dict[int, int] = {}
        while not self.stop.is_set():
            with self.lock:
                live = [j for j in self.jobs if steps.get(j, 0) < len(STEPS)]
            if len(live) < 4:
                job = self.writer.new_job().job_id
                with self.lock:
                    self.jobs.append(job)
                    self.committed[job] = 1
                continue
            for job in live:
                up_before = self.writer.cache.available()
                try:
                    self.writer.cache.update_progress(job, STEPS[steps.get(job, 0)])
                except Exception as exc:
                    self.errors.append(f"write: {type(exc).__name__}: {exc}")
                    continue
                up_after = self.writer.cache.available()
                steps[job] = steps.get(job, 0) + 1
                version = self.writer.db_version(job)
                now = time.monotonic()
                with self.lock:
                    if not (up_before and up_after):
                        self.db_only[(job, version)] = now
                    if up_after and not up_before:
                        self.writer_recoveries.append(now)
                    self.committed[job] = version
                    self.writes += 1
                time.sleep(0.01)

    def _in_writer_window(self, job: int, version: int, now: float) -> bool:
        """Whether `version` of `job` was written DB-only and the writer had not recovered
        (and repaired) more than `repair_slack` seconds before `now`. Call under the lock."""
        written = self.db_only.get((job, version))
        if written is None:
            return False
        recovered = [t for t in self.writer_recoveries if t >= written]
        return not recovered or now <= recovered[0] + self.repair_slack

    def poll_forever(self, index: int) -> None:
        h = self.pollers[index]
        while not self.stop.is_set():
            with self.lock:
                snapshot = dict(self.committed)
            for job, floor in snapshot.items():
                before = h.load.call_count
                try:
                    got = h.cache.get(job)
                except Exception as exc:
                    self.errors.append(f"read: {type(exc).__name__}: {exc}")
                    continue
                from_redis = h.load.call_count == before
                now = time.monotonic()
                with self.lock:
                    self.reads += 1
                    self.served.append((now, index, from_redis))
                    if got is None or got.view.version < floor:
                        version = None if got is None else got.view.version
                        line = (
                            f"job {job}: served v{version}, DB had v{floor} "
                            f"(poller {index}, t={now:.3f}, from Redis: {from_redis})"
                        )
                        if self._in_writer_window(job, floor, now):
                            self.stale_in_window.append(line)
                        else:
                            self.stale.append(line)
            time.sleep(0.005)


def served_from_redis_after(load: Load, since: float, *, timeout: float) -> float:
    """When every poller of `load` had been served from Redis at least once after `since`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with load.lock:
            firsts: dict[int, float] = {}
            for when, index, from_redis in load.served:
                if when >= since and from_redis and index not in firsts:
                    firsts[index] = when
        if len(firsts) == len(load.pollers):
            return max(firsts.values())
        time.sleep(0.05)
    raise AssertionError(f"not every poller was served from Redis within {timeout}s")
