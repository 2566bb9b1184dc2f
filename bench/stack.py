"""The system under test for one bench run: API instances, clients, jobs, a setup runtime.

Every API instance is a real `python -m api` process (uvicorn, factory mode) on the
run's private PostgreSQL database; "cache on" instances use the run's private
redis-server under a private `CACHE_NAMESPACE`, "cache off" ones have `REDIS_URL=""`.
A multi-worker instance gets its own `PROMETHEUS_MULTIPROC_DIR`, so its `/metrics`
DB-query counter sums every worker process.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import redis

from bench.procs import PYTHON, Child, ProcessGroup, base_env, free_port, wait_http
from bench.services import PrivateRedis
from shared import jobs
from shared.apikeys import create_api_key
from shared.runtime import Runtime
from shared.settings import Settings

API_PREFIX = "/api/v2"
# Keys resolved once stay resolved for the whole run: the figures count job reads,
# not the periodic re-check of a key (one query per key per worker per interval).
KEY_CACHE_SECONDS = "3600"
_BREAKER_OPENED = re.compile(r"unavailable \(.*\): serving from the database")
_DB_QUERIES = re.compile(rb"^renderwatch_db_queries_total\s+([0-9.eE+]+)", re.M)


class CountingConnection(redis.Connection):
    """Counts network round trips: one `send_packed_command` per command or pipeline,
    in all (`sent`) and by the thread that sent it (`sent_by`: the statistics flusher's
    round trips are not on the path of an update); a new connection's set-up commands
    are counted apart (`handshakes`)."""

    lock = threading.Lock()
    sent = 0
    sent_by: ClassVar[dict[int, int]] = {}

    handshakes = 0  # commands of a new connection's set-up (HELLO, CLIENT SETINFO, ...)

    def on_connect_check_health(self, check_health: bool = True) -> None:
        self._in_handshake = True
        try:
            super().on_connect_check_health(check_health)
        finally:
            self._in_handshake = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if getattr(self, "_in_handshake", False):
            with CountingConnection.lock:
                CountingConnection.handshakes += 1
            super().send_packed_command(command, check_health)
            return
        thread = threading.get_ident()
        with CountingConnection.lock:
            CountingConnection.sent += 1
            CountingConnection.sent_by[thread] = CountingConnection.sent_by.get(thread, 0) + 1
        super().send_packed_command(command, check_health)

    @classmethod
    def sent_here(cls) -> int:
        """Round trips sent by the calling thread."""
        with cls.lock:
            return cls.sent_by.get(threading.get_ident(), 0)


@dataclass(frozen=True)
class Client:
    client_id: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass(frozen=True)
class JobRef:
    job_id: int
    client: Client

    @property
    def path(self) -> str:
        return f"{API_PREFIX}/jobs/{self.job_id}"


@dataclass
class Api:
    """One running API instance."""

    name: str
    child: Child
    port: int
    cache: bool
    workers: int
    http: httpx.Client

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def db_queries(self) -> int:
        """The API's `renderwatch_db_queries_total` (every worker process summed)."""
        body = self.http.get(self.url("/metrics")).raise_for_status().content
        match = _DB_QUERIES.search(body)
        if match is None:
            raise RuntimeError(f"{self.name}: no renderwatch_db_queries_total in /metrics")
        return round(float(match.group(1)))

    def cache_counts(self, client: Client) -> dict[str, Any]:
        """`statistics` of GET /api/v2/cache/stats."""
        response = self.http.get(self.url(f"{API_PREFIX}/cache/stats"), headers=client.auth)
        stats: dict[str, Any] = response.raise_for_status().json()["statistics"]
        return stats

    def breaker_openings(self) -> int:
        """How often this instance's breaker opened so far (its WARNING lines in the log)."""
        try:
            text = self.child.log.read_text(errors="replace")
        except OSError:
            return 0
        return len(_BREAKER_OPENED.findall(text))

    def get(self, path: str, client: Client, **headers: str) -> httpx.Response:
        return self.http.get(self.url(path), headers={**client.auth, **headers})


@dataclass
class Stack:
    """What a run owns: processes, the private DB and Redis, and a runtime for setup."""

    group: ProcessGroup
    workdir: Path
    database_url: str
    redis: PrivateRedis
    namespace: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:10]}")
    apis: list[Api] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30.0))
    runtime: Runtime | None = None

    def settings(self, *, cache: bool = True) -> Settings:
        return Settings(
            _env_file=None,
            database_url=self.database_url,
            redis_url=self.redis.url if cache else "",
            cache_namespace=self.namespace,
            log_level="WARNING",
        )

    def start_runtime(self) -> Runtime:
        """The bench's own runtime (job setup, invalidations, the write-path bench).

        Its Redis client counts round trips, so the write path can be checked for one.
        """
        pool = redis.ConnectionPool.from_url(
            self.redis.url,
            connection_class=CountingConnection,
            socket_timeout=0.25,
            socket_connect_timeout=0.25,
        )
        client = redis.Redis(connection_pool=pool)
        self.runtime = Runtime.start(self.settings(), redis_client=client)
        return self.runtime

    def api_env(
        self, *, cache: bool, workers: int, port: int, redis_url: str | None
    ) -> dict[str, str]:
        env = base_env(
            DATABASE_URL=self.database_url,
            REDIS_URL=(redis_url or self.redis.url) if cache else "",
            CACHE_NAMESPACE=self.namespace,
            # The API only enqueues on POST, which the bench never sends.
            CELERY_BROKER_URL="memory://",
            API_HOST="127.0.0.1",
            API_PORT=str(port),
            API_WORKERS=str(workers),
            API_KEY_CACHE_SECONDS=KEY_CACHE_SECONDS,
            # INFO: the breaker's "unavailable" and "back" lines; no per-request lines.
            LOG_LEVEL="INFO",
        )
        if workers > 1:
            # Only then: /metrics must sum the workers' counters. One worker runs as
            # deployed by default (in-process counters, no files).
            metrics_dir = self.workdir / f"prom-{port}"
            metrics_dir.mkdir(parents=True, exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        return env

    def launch_api(
        self,
        name: str,
        *,
        cache: bool,
        workers: int = 1,
        redis_url: str | None = None,
        module: str = "api",
        extra_env: dict[str, str] | None = None,
    ) -> Api:
        """Start an API instance (readiness is checked by `wait_ready`).

        `module` is what `python -m` runs: `api`, or a wrapper of it such as `bench.slowapi`.
        """
        port = free_port()
        env = self.api_env(cache=cache, workers=workers, port=port, redis_url=redis_url)
        env.update(extra_env or {})
        child = self.group.start(name, [PYTHON, "-m", module], env=env, port=port)
        api = Api(name=name, child=child, port=port, cache=cache, workers=workers, http=self.http)
        self.apis.append(api)
        return api

    def wait_ready(self, *apis: Api) -> None:
        for api in apis:
            wait_http(api.child, api.url("/healthz"), timeout=60.0)
            self.warm_keys(api)

    def stop_api(self, api: Api) -> None:
        self.group.stop(api.child)
        if api in self.apis:
            self.apis.remove(api)

    def make_clients(self, count: int) -> list[Client]:
        assert self.runtime is not None
        with self.runtime.sessions() as session:
            for i in range(len(self.clients), count):
                client_id = f"bench-client-{i}@example.com"
                self.clients.append(Client(client_id, create_api_key(client_id, session=session)))
        return self.clients[:count]

    def warm_keys(self, api: Api) -> None:
        """Resolve every client's key once, so key lookups do not count as job reads."""
        for client in self.clients:
            api.cache_counts(client)

    def make_jobs(
        self, count: int, *, scenes: int, clients: list[Client] | None = None
    ) -> list[JobRef]:
        """Fresh queued jobs, round robin over the clients, straight into the DB.

        Not through POST (which pre-warms the entry): each job's first poll is a miss.
        """
        assert self.runtime is not None and self.clients
        owners = clients or self.clients
        made: list[JobRef] = []
        with self.runtime.sessions() as session:
            for i in range(count):
                client = owners[i % len(owners)]
                view = jobs.create_job(
                    session=session, client_id=client.client_id, prompt="bench", scenes_total=scenes
                )
                made.append(JobRef(view.job_id, client))
        return made

    def close(self) -> None:
        self.http.close()
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
