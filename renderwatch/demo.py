"""`renderwatch demo` (`make demo`): the job cache measured for real, with Redis on and off.

One command on a fresh clone: it picks a Redis, migrates a private database, starts
api + worker + beat (+ flower) as local processes (`renderwatch.compose.Stack`), submits
jobs as two clients, polls them the way clients do, and prints the table of the
original cache module: total requests, database queries (the API's
`renderwatch_db_queries_total`), cache hits (`/api/v2/cache/stats`) and the average
response time seen by the clients, once with the cache on and once with it off.

Time is compressed: a client polls each job every 3 s of simulated time, which here
is a fraction of a second, so that a job is polled about 40 times over its life and
the whole demo takes well under two minutes.

Everything it starts (stack processes, a private redis-server) is stopped on the way
out, also on Ctrl-C or SIGTERM. It uses its own key namespace and queue, so it can
run next to a live stack.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from renderwatch import localproc
from renderwatch.client import ClientError, RenderwatchClient, metric_total
from renderwatch.localproc import free_port as free_port
from shared.settings import REPO_ROOT, Settings, redact_url

if TYPE_CHECKING:
    from renderwatch.compose import Stack

DEMO_DIR = REPO_ROOT / "var" / "demo"
CLIENTS = ("alice@example.com", "bob@example.com")
PROMPTS = (
    "a cat on a skateboard at sunset",
    "a paper boat sailing down a rainy street",
    "time-lapse of a city skyline from dawn to night",
    "a robot learning to paint",
    "a hummingbird in slow motion",
    "a lighthouse in a storm",
)
SCENE_COUNTS = (4, 5, 6)
SIMULATED_POLL_SECONDS = 3.0
# The simulated renderer spends a quarter of a scene on each of its four other stages.
NON_SCENE_STAGES_IN_SCENES = 1.0
TIMES = "\N{MULTIPLICATION SIGN}"
SERVICES = ("api", "worker", "beat", "flower")
PER_JOB_ERROR_LIMIT = 20
# Renders at once: enough that most jobs run soon after they are submitted.
WORKER_CONCURRENCY = 3


class DemoError(Exception):
    """The demo cannot go on; the message says why and where to look."""


# -- Redis choice --------------------------------------------------------------------------


@dataclass
class RedisChoice:
    """The Redis the demo uses: `url` is empty when caching must stay off."""

    url: str
    origin: str  # "configured", "private" or "none"
    note: str
    server: localproc.RedisServer | None = None

    @property
    def process(self) -> subprocess.Popen[Any] | None:
        """The private redis-server's process, if the demo started one."""
        return self.server.process if self.server is not None else None

    def stop(self) -> None:
        """Stop the private redis-server, if the demo started one; idempotent."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()


def redis_answers(url: str, *, timeout: float = 0.5) -> bool:
    """True when a Redis at `url` answers PING (False also when `redis` is not installed)."""
    if not url:
        return False
    try:
        import redis
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def start_redis_server(
    binary: str,
    workdir: Path,
    *,
    answers: Callable[[str], bool] = redis_answers,
    timeout: float = 10.0,
) -> localproc.RedisServer:
    """Start a private, non-persistent redis-server on a free loopback port.

    The returned server must be kept: dropping it stops the process.
    """
    server = localproc.RedisServer(workdir, binary=binary)
    try:
        server.start(timeout)
    except localproc.StartupError as exc:
        raise DemoError(str(exc)) from None
    process = server.process
    assert process is not None
    # The port is open; PING proves it is the server we started that answers.
    deadline = time.monotonic() + timeout
    while not answers(server.url):
        if process.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise DemoError(
                f"the private redis-server did not answer on port {server.port} "
                f"(see {server.logfile})"
            )
        time.sleep(0.05)
    return server


def choose_redis(
    configured_url: str,
    *,
    binary: str | None,
    workdir: Path,
    answers: Callable[[str], bool] = redis_answers,
    start: Callable[[str, Path], localproc.RedisServer] | None = None,
) -> RedisChoice:
    """REDIS_URL if a Redis answers there; else a private redis-server; else caching off."""
    if configured_url and answers(configured_url):
        return RedisChoice(
            url=configured_url,
            origin="configured",
            note=f"the Redis at {redact_url(configured_url)} (REDIS_URL)",
        )
    why = (
        f"nothing answers at {redact_url(configured_url)}"
        if configured_url
        else "REDIS_URL is empty"
    )
    if binary:
        launch = start or (lambda b, d: start_redis_server(b, d, answers=answers))
        try:
            server = launch(binary, workdir)
        except (DemoError, OSError) as exc:
            return RedisChoice(
                url="",
                origin="none",
                note=f"{why}, and a private redis-server would not start ({exc}): "
                "caching stays OFF, only the cache-off run is measured",
            )
        return RedisChoice(
            url=server.url,
            origin="private",
            note=f"a private redis-server at {server.url} ({why})",
            server=server,
        )
    return RedisChoice(
        url="",
        origin="none",
        note=f"{why}, and no redis-server binary is installed: caching stays OFF, "
        "only the cache-off run is measured",
    )


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What one run measured."""

    cache_enabled: bool
    requests: int
    db_queries: int | None  # None when the API exposes no query counter
    cache_hits: int
    cache_misses: int
    avg_ms: float
    jobs: int = 0
    succeeded: int = 0
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        reads = self.cache_hits + self.cache_misses
        return 100.0 * self.cache_hits / reads if reads else 0.0


def format_table(off: RunResult | None, on: RunResult | None) -> str:
    """The original module's table: cache off and cache on side by side, with ratios."""

    def cell(run: RunResult | None, value: Callable[[RunResult], str]) -> str:
        return value(run) if run is not None else "n/a"

    def queries(run: RunResult) -> str:
        return str(run.db_queries) if run.db_queries is not None else "n/a"

    rows = [
        ("", "cache off", "cache on", ""),
        (
            "Total requests",
            cell(off, lambda r: str(r.requests)),
            cell(on, lambda r: str(r.requests)),
            "",
        ),
        ("Database queries", cell(off, queries), cell(on, queries), _fewer(off, on)),
        (
            "Cache hits",
            cell(off, lambda r: str(r.cache_hits)),
            cell(on, lambda r: str(r.cache_hits)),
            f"(hit rate {on.hit_rate:.1f}%)" if on is not None else "",
        ),
        (
            "Avg response time",
            cell(off, lambda r: f"{r.avg_ms:.1f} ms"),
            cell(on, lambda r: f"{r.avg_ms:.1f} ms"),
            _faster(off, on),
        ),
    ]
    # The original module's layout: the header sits one column right of the numbers.
    header, *body = rows
    lines = [f"{header[0]:<20}{header[1]:>10}{header[2]:>11}"]
    lines += [f"{a:<20}{b:>9}{c:>11}   {d}".rstrip() for a, b, c, d in body]
    return "\n".join(lines)


def _fewer(off: RunResult | None, on: RunResult | None) -> str:
    if off is None or on is None or off.db_queries is None or on.db_queries is None:
        return ""
    if on.db_queries == 0:
        return "(none with the cache)" if off.db_queries else ""
    return f"({off.db_queries / on.db_queries:.1f}{TIMES} fewer)"


def _faster(off: RunResult | None, on: RunResult | None) -> str:
    if off is None or on is None or on.avg_ms <= 0 or off.avg_ms <= 0:
        return ""
    ratio = off.avg_ms / on.avg_ms
    return f"({ratio:.1f}{TIMES} faster)" if ratio >= 1 else f"({1 / ratio:.1f}{TIMES} slower)"


# -- workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs (command-line options)."""

    jobs: int = 6
    scene_seconds: float = 0.3
    polls_per_job: int = 40
    flower: bool = True
    startup_timeout: float = 90.0
    run_timeout: float = 120.0

    def scenes(self, index: int) -> int:
        return SCENE_COUNTS[index % len(SCENE_COUNTS)]

    @property
    def poll_interval(self) -> float:
        """Real seconds between two polls of a job: its expected life over `polls_per_job`."""
        mean = sum(self.scenes(i) for i in range(self.jobs)) / max(self.jobs, 1)
        life = self.scene_seconds * (mean + NON_SCENE_STAGES_IN_SCENES)
        return max(life / self.polls_per_job, 0.005)

    @property
    def compression(self) -> float:
        return SIMULATED_POLL_SECONDS / self.poll_interval


@dataclass
class Tally:
    """Requests and client-side response times, shared by the polling threads."""

    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    first_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, elapsed: float) -> None:
        with self.lock:
            self.requests += 1
            self.seconds += elapsed

    def error(self, message: str) -> None:
        with self.lock:
            self.errors += 1
            self.first_error = self.first_error or message

    @property
    def avg_ms(self) -> float:
        return 1000.0 * self.seconds / self.requests if self.requests else 0.0


@contextmanager
def timed(tally: Tally) -> Iterator[None]:
    """Count one request and its client-side response time."""
    start = time.perf_counter()
    try:
        yield
    finally:
        tally.record(time.perf_counter() - start)


def poll_until_done(
    client: RenderwatchClient,
    job_id: int,
    *,
    interval: float,
    tally: Tally,
    stop: threading.Event,
    finished: Callable[[int, str], None],
) -> None:
    """Poll one job like a client does (conditional GET) until it ends or `stop` is set."""
    etag: str | None = None
    errors = 0
    while not stop.is_set():
        try:
            with timed(tally):
                poll = client.get_job(job_id, etag=etag)
        except ClientError as exc:
            tally.error(f"job {job_id}: {exc}")
            errors += 1
            if errors >= PER_JOB_ERROR_LIMIT:
                finished(job_id, "abandoned after repeated errors")
                return
        else:
            if poll.view is not None:
                etag = poll.etag
                if poll.view.finished:
                    finished(job_id, poll.view.status.value)
                    return
        stop.wait(interval)


class Demo:
    """One demo: chooses Redis, runs the stack twice, prints the table."""

    def __init__(
        self,
        config: DemoConfig,
        settings: Settings,
        *,
        out: Callable[[str], None] = print,
        redis_binary: str | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.out = out
        self.redis_binary = redis_binary
        self.run_id = f"demo-{uuid.uuid4().hex[:8]}"
        self.redis: RedisChoice | None = None
        self._stacks: list[Stack] = []
        self._unforgotten: list[dict[str, str]] = []

    # -- the whole demo -------------------------------------------------------------------

    def run(self) -> int:
        """Run both measurements; returns the exit code."""
        say = self.out
        say("renderwatch demo: the job cache measured for real, with Redis on and off.\n")
        say("Setup")
        self.redis = redis = choose_redis(
            self.settings.redis_url,
            binary=self.redis_binary,
            workdir=DEMO_DIR / "redis",
        )
        say(f"  Redis:     {redis.note}")
        say(f"  Database:  {self._database_note()}")
        say(f"  Broker:    {redact_url(self._broker_url())} (private queue {self.run_id})")
        say(f"  Isolation: key namespace and queue {self.run_id!r}; logs under {_rel(DEMO_DIR)}/")
        cfg = self.config
        counts = [cfg.scenes(i) for i in range(cfg.jobs)]
        say(
            f"  Workload:  {cfg.jobs} jobs of {min(counts)}-{max(counts)} scenes for two clients "
            f"({', '.join(CLIENTS)}); each scene takes {cfg.scene_seconds:g} s."
        )
        say(
            f"             Clients poll each job every {SIMULATED_POLL_SECONDS:g} s of simulated "
            f"time = every {cfg.poll_interval * 1000:.0f} ms here (time compressed "
            f"{cfg.compression:.0f}x),\n             about {cfg.polls_per_job} polls over a "
            "job's life (more while it waits in the queue)."
        )
        on: RunResult | None = None
        runs = 2 if redis.url else 1
        if redis.url:
            on = self.measure(1, runs, cache=True)
        off = self.measure(runs, runs, cache=False)
        say("\nResults (requests and response times measured at the clients; database queries")
        say("from the API's renderwatch_db_queries_total; hits from /api/v2/cache/stats)\n")
        say(format_table(off, on))
        if on is not None and on.avg_ms > 0.8 * off.avg_ms:
            say(
                "\nResponse times are close: on one machine a primary-key read from the database "
                "costs about\nas much as a Redis round trip. What the cache saves is database "
                "work, which is what grows\nwith the number of polling clients."
            )
        if on is None:
            say(
                "\nCaching was OFF for this demo (no Redis answered and none could be started):"
                " only\nthe cache-off column was measured."
            )
        for run in (off, on):
            if run is not None and run.db_queries is None:
                say("\nNote: the API exposes no renderwatch_db_queries_total, so queries are n/a.")
                break
        failed = sum(r.jobs - r.succeeded for r in (off, on) if r is not None)
        if failed:
            say(f"\n{failed} job(s) did not succeed; see the worker logs under {_rel(DEMO_DIR)}.")
            return 1
        return 0

    def close(self) -> None:
        """Stop everything the demo started (idempotent)."""
        while self._stacks:
            stack = self._stacks.pop()
            stack.stop()
        while self._unforgotten:
            self._forget_run(self._unforgotten.pop())
        if self.redis is not None:
            self.redis.stop()

    # -- one run -------------------------------------------------------------------------

    def measure(self, number: int, of: int, *, cache: bool) -> RunResult:
        """Start the stack, run the workload, read the counters, stop the stack."""
        from renderwatch.compose import ComposeError, Stack

        label = "cache-on" if cache else "cache-off"
        say = self.out
        title = "cache ON" if cache else "cache OFF (REDIS_URL empty for api and worker)"
        say(f"\nRun {number} of {of}: {title}")
        database_url = self._database_url(label)
        self._prepare_database(database_url)
        keys = self._create_keys(database_url)
        say(f"  migrated the database and created API keys for {' and '.join(CLIENTS)}")
        api_port, flower_port = localproc.free_port(), localproc.free_port()
        env = self._stack_env(label, database_url, cache, api_port, flower_port)
        self._unforgotten.append(env)
        services = [s for s in SERVICES if s != "flower" or self.config.flower]
        log_dir = DEMO_DIR / "logs" / label
        say(f"  starting {', '.join(services)} (logs: {_rel(log_dir)}/) ...")
        started = time.monotonic()
        try:
            stack = Stack(services, env, log_dir=log_dir)
        except ComposeError as exc:
            raise DemoError(f"cannot run docker-compose.yml's services: {exc}") from None
        self._stacks.append(stack)
        try:
            stack.start()
            stack.wait_healthy(self.config.startup_timeout)
        except RuntimeError as exc:
            # The message names the service and ends with the tail of its log.
            hint = ""
            if env["CELERY_BROKER_URL"].startswith("sqla+"):
                hint = (
                    "\nHint: the SQL fallback broker cannot carry Celery's remote-control "
                    "pings that the worker and beat healthchecks use; install redis-server "
                    "or set CELERY_BROKER_URL (e.g. amqp://guest:guest@127.0.0.1:5672//)."
                )
            raise DemoError(f"the {label} stack did not come up: {exc}{hint}") from None
        base_url = f"http://127.0.0.1:{api_port}"
        self._wait_ready(base_url, stack, services)
        flower = f", Flower http://127.0.0.1:{flower_port}" if self.config.flower else ""
        say(f"  stack up in {time.monotonic() - started:.1f} s: API {base_url}{flower}")
        try:
            result = self._workload(base_url, keys, cache=cache)
        except DemoError as exc:
            raise DemoError(f"{exc}; {self._log_hint(stack, services)}") from None
        say(f"  stopping the {label} stack ...")
        self._stacks.remove(stack)
        stack.stop()
        self._forget_run(env)
        self._unforgotten.remove(env)
        return result

    def _workload(self, base_url: str, keys: Mapping[str, str], *, cache: bool) -> RunResult:
        say, cfg = self.out, self.config
        clients = {owner: RenderwatchClient(base_url, key) for owner, key in keys.items()}
        pollers: list[RenderwatchClient] = []
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            first = next(iter(clients.values()))
            stats_before = first.cache_stats()
            queries_before = metric_total(first.metrics())
            tally = Tally()
            owners = itertools.cycle(CLIENTS)
            submitted: list[int] = []
            outcomes: dict[int, str] = {}
            done = threading.Condition()

            def finished(job_id: int, outcome: str) -> None:
                with done:
                    outcomes[job_id] = outcome
                    done.notify_all()

            start = time.monotonic()
            for index in range(cfg.jobs):
                owner = next(owners)
                with timed(tally):
                    job = clients[owner].submit(PROMPTS[index % len(PROMPTS)], cfg.scenes(index))
                submitted.append(job.job_id)
                poller = RenderwatchClient(base_url, keys[owner])
                pollers.append(poller)
                thread = threading.Thread(
                    target=poll_until_done,
                    name=f"poll-{job.job_id}",
                    args=(poller, job.job_id),
                    kwargs={
                        "interval": cfg.poll_interval,
                        "tally": tally,
                        "stop": stop,
                        "finished": finished,
                    },
                    daemon=True,
                )
                thread.start()
                threads.append(thread)
            say(f"  submitted {cfg.jobs} jobs ({', '.join(map(str, submitted))}); polling ...")

            reported = 0
            deadline = start + cfg.run_timeout
            while reported < cfg.jobs:
                with done:
                    # Short waits keep Ctrl-C responsive in the main thread.
                    done.wait(timeout=0.5)
                    new = list(outcomes.items())[reported:]
                for job_id, outcome in new:
                    reported += 1
                    say(
                        f"  {reported}/{cfg.jobs} jobs finished (job {job_id} {outcome}), "
                        f"{tally.requests} requests so far"
                    )
                if time.monotonic() > deadline and reported < cfg.jobs:
                    raise DemoError(
                        f"only {reported} of {cfg.jobs} jobs ended within {cfg.run_timeout:g} s"
                        + (f" (last client error: {tally.first_error})" if tally.errors else "")
                    )
            elapsed = time.monotonic() - start
            queries_after = metric_total(first.metrics())
            stats_after = first.cache_stats()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            for client in [*clients.values(), *pollers]:
                client.close()
        hits = _stat(stats_after, "hits") - _stat(stats_before, "hits")
        misses = _stat(stats_after, "misses") - _stat(stats_before, "misses")
        succeeded = sum(1 for outcome in outcomes.values() if outcome == "succeeded")
        polls = tally.requests - cfg.jobs
        say(
            f"  all {cfg.jobs} jobs ended in {elapsed:.1f} s ({succeeded} succeeded); "
            f"{polls} polls, {polls / cfg.jobs:.0f} per job"
            + (
                f"; {tally.errors} client errors (first: {tally.first_error})"
                if tally.errors
                else ""
            )
        )
        db_queries = (
            round(queries_after - queries_before)
            if queries_before is not None and queries_after is not None
            else None
        )
        return RunResult(
            cache_enabled=cache,
            requests=tally.requests,
            db_queries=db_queries,
            cache_hits=hits,
            cache_misses=misses,
            avg_ms=tally.avg_ms,
            jobs=cfg.jobs,
            succeeded=succeeded,
            seconds=elapsed,
        )

    # -- plumbing --------------------------------------------------------------------------

    def _database_note(self) -> str:
        if "database_url" in self.settings.model_fields_set:
            return f"{redact_url(self.settings.database_url)} (DATABASE_URL), shared by both runs"
        return f"private SQLite files under {_rel(DEMO_DIR)}/ (a fresh one per run)"

    def _database_url(self, label: str) -> str:
        if "database_url" in self.settings.model_fields_set:
            return self.settings.database_url
        return f"sqlite:///{DEMO_DIR / (label + '.sqlite')}"

    def _prepare_database(self, url: str) -> None:
        from alembic.util.exc import CommandError
        from sqlalchemy.exc import SQLAlchemyError

        from renderwatch.migrate import upgrade

        if url.startswith("sqlite:///") and "database_url" not in self.settings.model_fields_set:
            path = Path(url.removeprefix("sqlite:///"))
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
        try:
            upgrade(url)
        except (SQLAlchemyError, CommandError) as exc:
            raise DemoError(f"cannot migrate {redact_url(url)}: {type(exc).__name__}") from exc

    def _create_keys(self, database_url: str) -> dict[str, str]:
        from shared.apikeys import create_api_key
        from shared.db import build_engine, build_session_factory

        engine = build_engine(database_url, pool_size=1)
        try:
            with build_session_factory(engine)() as session:
                return {owner: create_api_key(owner, session=session) for owner in CLIENTS}
        finally:
            engine.dispose()

    def _broker_url(self) -> str:
        # The broker stays put across both runs: only the cache is switched off.
        if self.settings.celery_broker_url:
            return self.settings.celery_broker_url
        if self.redis is not None and self.redis.url:
            return self.redis.url
        return "sqla+" + self._database_url("broker")

    def _stack_env(
        self, label: str, database_url: str, cache: bool, api_port: int, flower_port: int
    ) -> dict[str, str]:
        assert self.redis is not None
        return {
            "DATABASE_URL": database_url,
            "REDIS_URL": self.redis.url if cache else "",
            "CELERY_BROKER_URL": self._broker_url(),
            "CELERY_QUEUE": f"{self.run_id}-{label}",
            "CACHE_NAMESPACE": f"{self.run_id}-{label}",
            "SCENE_SECONDS": f"{self.config.scene_seconds:g}",
            "STATS_SNAPSHOT_SECONDS": "5",
            "API_HOST": "127.0.0.1",
            "API_PORT": str(api_port),
            "API_WORKERS": "1",
            "FLOWER_PORT": str(flower_port),
            "FLOWER_ADDRESS": "127.0.0.1",
            # Loopback only, for the length of the demo: open on purpose (renderwatch.flower).
            "FLOWER_UNAUTHENTICATED_API": "true",
            # Private node names and beat schedule: a live stack on the same broker and
            # checkout must neither answer our healthchecks nor share our schedule file.
            "WORKER_NAME": f"{self.run_id}-{label}-worker",
            "BEAT_NAME": f"{self.run_id}-{label}-beat",
            "BEAT_SCHEDULE": str(DEMO_DIR / f"{label}-celerybeat-schedule"),
            "WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
        }

    def _forget_run(self, env: Mapping[str, str]) -> None:
        """Drop this run's keys (cache namespace, queue bindings): a shared Redis keeps none."""
        namespace, queue = env["CACHE_NAMESPACE"], env["CELERY_QUEUE"]
        targets = [(self.redis.url if self.redis else "", [f"{namespace}:*"])]
        broker = env["CELERY_BROKER_URL"]
        if broker.startswith(("redis://", "rediss://", "unix://")):
            targets.append((broker, [queue, f"_kombu.binding*.{queue}", f"{queue}\x06*"]))
        for url, patterns in targets:
            if url:
                _delete_keys(url, patterns)

    def _wait_ready(self, base_url: str, stack: Stack, services: Sequence[str]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        with RenderwatchClient(base_url, timeout=2.0) as probe:
            while not probe.ready():
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"the API at {base_url} is not ready; {self._log_hint(stack, services)}"
                    )
                time.sleep(0.2)

    def _log_hint(self, stack: Stack, services: Sequence[str]) -> str:
        lines = []
        for name in services:
            try:
                text = stack.logs(name)
            except (OSError, KeyError):
                continue
            tail = text.strip().splitlines()[-8:]
            if tail:
                lines.append(f"--- last lines of {name} ---")
                lines += tail
        where = "logs under " + _rel(DEMO_DIR / "logs")
        return where + ("\n" + "\n".join(lines) if lines else "")


def _delete_keys(url: str, patterns: Sequence[str]) -> None:
    """Best effort: delete the keys matching `patterns` (SCAN, never KEYS)."""
    try:
        import redis
    except ImportError:
        return
    try:
        client = redis.Redis.from_url(url, socket_timeout=2.0)
    except ValueError:
        return
    try:
        for pattern in patterns:
            batch = list(client.scan_iter(match=pattern, count=1_000))
            if batch:
                client.delete(*batch)
    except (redis.RedisError, OSError):
        pass  # leftovers expire or stay harmless under a namespace nobody else uses
    finally:
        client.close()


def _stat(stats: Mapping[str, Any], name: str) -> int:
    values = stats.get("statistics")
    if not isinstance(values, Mapping):
        return 0
    try:
        return int(values.get(name, 0))
    except (TypeError, ValueError):
        return 0


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The demo's options."""
    parser = argparse.ArgumentParser(
        prog="renderwatch demo",
        description="Start the stack (api, worker, beat, flower) twice, with the cache on and "
        "off, run the same jobs for two clients, and print the measured table.",
    )
    defaults = DemoConfig()
    parser.add_argument("--jobs", type=int, default=defaults.jobs, help="jobs per run (default 6)")
    parser.add_argument(
        "--scene-seconds",
        type=float,
        default=defaults.scene_seconds,
        help="simulated render time per scene (default 0.3)",
    )
    parser.add_argument(
        "--polls-per-job",
        type=int,
        default=defaults.polls_per_job,
        help="about how many polls a job gets over its life (default 40)",
    )
    parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=defaults.run_timeout,
        help="give up when a run's jobs take longer (seconds, default 120)",
    )
    return parser


def _say(line: str) -> None:
    # The table has a multiplication sign: a terminal without it gets "?", not a crash.
    encoding = sys.stdout.encoding or "utf-8"
    print(line.encode(encoding, "replace").decode(encoding), flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C, so every `finally` stops what it started.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not 1 <= args.jobs <= 50 or args.polls_per_job < 1 or not 0 <= args.scene_seconds <= 60:
        print(
            "renderwatch demo: error: --jobs 1-50, --polls-per-job >= 1, --scene-seconds 0-60",
            file=sys.stderr,
        )
        return 2
    config = DemoConfig(
        jobs=args.jobs,
        scene_seconds=args.scene_seconds,
        polls_per_job=args.polls_per_job,
        flower=not args.no_flower,
        run_timeout=args.run_timeout,
    )
    demo = Demo(
        config,
        Settings(),
        out=_say,
        redis_binary=shutil.which("redis-server"),
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything the demo started ...", file=sys.stderr)
        return 130
    except (DemoError, ClientError) as exc:
        print(f"renderwatch demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            # Stopping is bounded (grace, then SIGKILL): a second Ctrl-C must not cut it short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            demo.close()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
