"""The Celery application's configuration, shared by the worker (runs tasks) and the API
(only sends them, by name, so `api` never imports `worker`).

The broker decides part of it (README "Choosing a broker"): Redis and Redis Sentinel
redeliver an unacknowledged task when its visibility timeout lapses; RabbitMQ redelivers
as soon as the consumer's channel closes, takes the task queue as a quorum queue and
confirms every publication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery import Celery
from kombu import Exchange, Queue

from shared.settings import Settings, redact_url

RENDER_VIDEO = "renderwatch.render_video"
SNAPSHOT_CACHE_STATS = "renderwatch.snapshot_cache_stats"

BrokerKind = Literal["redis", "sentinel", "amqp", "sql", "other"]

_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "socket"})
_AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


class BrokerConfigError(ValueError):
    """The broker URL or its settings cannot work; the message names the part (no password)."""


@dataclass(frozen=True)
class BrokerConfig:
    """What Celery needs for one broker: its URL (kombu's form), transport options, and the
    app settings that depend on the broker (queues, exchange type)."""

    kind: BrokerKind
    url: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    conf: dict[str, Any] = field(default_factory=dict)


def broker_config(settings: Settings) -> BrokerConfig:
    """The broker's configuration from settings (CELERY_BROKER_URL, else REDIS_URL, else the
    SQL database). Raises `BrokerConfigError` for a URL that cannot be a broker."""
    url = settings.broker_url
    derived = not settings.celery_broker_url
    if derived and settings.redis_url and settings.redis_mode == "cluster":
        raise BrokerConfigError(
            "REDIS_MODE=cluster: Celery cannot use a Redis Cluster as its broker; "
            "set CELERY_BROKER_URL (amqp://, redis:// or sentinel://)"
        )
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "redis+sentinel":
        return _sentinel(settings, *_from_redis_sentinel_url(url))
    if scheme == "redis+cluster":
        raise BrokerConfigError(
            "REDIS_URL is a Redis Cluster (redis+cluster://), which Celery cannot use as its "
            "broker; set CELERY_BROKER_URL (amqp://, redis:// or sentinel://)"
        )
    if scheme == "sentinel":
        return _sentinel(settings, *_split_master_name(url))
    if scheme == "unix":
        return BrokerConfig(
            "redis", _from_unix_url(url), _redis_options(settings), dict(_REDIS_CONF)
        )
    if scheme in _REDIS_SCHEMES:
        return BrokerConfig("redis", url, _redis_options(settings), dict(_REDIS_CONF))
    if scheme in _AMQP_SCHEMES:
        return _amqp(settings, url)
    if scheme.startswith("sqla+"):
        # The SQL fallback broker hands its options to create_engine, which refuses
        # visibility_timeout; that transport has no visibility timeout to set anyway.
        return BrokerConfig("sql", url)
    if not scheme:
        # Not echoed: without a scheme, no parser can be trusted to find the password in it.
        raise BrokerConfigError(
            "CELERY_BROKER_URL has no scheme: expected redis://, rediss://, sentinel://, "
            "amqp:// or amqps://"
        )
    return BrokerConfig("other", url)  # memory:// in tests, or a transport we do not tune


# When the worker loses the broker connection mid-render, its late ack can no longer
# land. Redis gives the task back only when the visibility timeout lapses: let the render
# finish (it is saved in the database; the later copy finds it done). RabbitMQ gives it
# back at once: stop the render, so that the copy resumes it instead of doing it twice.
_REDIS_CONF: dict[str, Any] = {"worker_cancel_long_running_tasks_on_connection_loss": False}
_AMQP_CONF: dict[str, Any] = {"worker_cancel_long_running_tasks_on_connection_loss": True}


def _redis_options(settings: Settings) -> dict[str, Any]:
    timeout = settings.task_visibility_timeout
    return {
        "visibility_timeout": timeout,
        # kombu's Redis transport looks for tasks whose visibility timeout has lapsed (their
        # worker died) every `interval` s, but scans only on every `throttle`-th look: by
        # default 10 x 10 = 100 s, which would add up to 100 s to any timeout (20x a short
        # one). Scan on every look, often enough that a lost task comes back within about
        # the timeout; a scan is one ZRANGE under a short mutex.
        "unacked_restore_interval": max(1, min(10, timeout // 5)),
        "unacked_restore_throttle": 1,
    }


def _sentinel(settings: Settings, url: str, url_master_name: str) -> BrokerConfig:
    master_name = settings.celery_broker_master_name or url_master_name
    if not master_name:
        raise BrokerConfigError(
            "a sentinel:// broker needs the master's name: set CELERY_BROKER_MASTER_NAME "
            "or add ?master_name=NAME to CELERY_BROKER_URL"
        )
    options: dict[str, Any] = {**_redis_options(settings), "master_name": master_name}
    password = settings.celery_broker_sentinel_password.get_secret_value()
    if password:
        options["sentinel_kwargs"] = {"password": password}
    return BrokerConfig("sentinel", url, options, dict(_REDIS_CONF))


def _split_master_name(url: str) -> tuple[str, str]:
    """`sentinel://h1:p1;sentinel://h2:p2/0?master_name=m` -> (the URL without it, "m")."""
    hosts = url.split(";")
    master_name = ""
    cleaned = []
    for host in hosts:
        parts = urlsplit(host)
        query = parse_qsl(parts.query, keep_blank_values=True)
        master_name = next((v for k, v in query if k == "master_name"), master_name)
        rest = urlencode([(k, v) for k, v in query if k != "master_name"])
        cleaned.append(urlunsplit(parts._replace(query=rest)))
    return ";".join(cleaned), master_name


def _from_unix_url(url: str) -> str:
    """`unix://[:pw@]/path/redis.sock[?db=N]` (the REDIS_URL form) as kombu's
    `redis+socket://[:pw@]/path/redis.sock?virtual_host=N`."""
    parts = urlsplit(url)
    query = [("virtual_host" if k == "db" else k, v) for k, v in parse_qsl(parts.query)]
    # Built by hand: urlunsplit drops the empty authority ("//") before the path.
    return f"redis+socket://{parts.netloc}{parts.path}" + (f"?{urlencode(query)}" if query else "")


def _from_redis_sentinel_url(url: str) -> tuple[str, str]:
    """`redis+sentinel://[:pw@]h1:p1,h2:p2/service[/db]` (the REDIS_URL form) as kombu's
    `sentinel://[:pw@]h1:p1;sentinel://[:pw@]h2:p2/db` and the service (master) name."""
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    segments = [s for s in path.split("/") if s]
    if not hosts or not segments or len(segments) > 2:
        raise BrokerConfigError(
            "REDIS_URL (as the broker): expected redis+sentinel://[:password@]host:port"
            f"[,host:port...]/service[/db], got {redact_url(url.split(',', 1)[0])!r}..."
        )
    service, db = segments[0], (segments[1] if len(segments) == 2 else "0")
    if not db.isdigit():
        raise BrokerConfigError(f"REDIS_URL (as the broker): the db must be a number, not {db!r}")
    prefix = f"{auth}@" if auth else ""
    suffix = f"?{query}" if query else ""
    urls = [f"sentinel://{prefix}{host}/{db}{suffix}" for host in hosts.split(",") if host]
    return ";".join(urls), service


def _amqp(settings: Settings, url: str) -> BrokerConfig:
    # Publisher confirms: send_task returns only once RabbitMQ has taken the message, so
    # a job's task is never lost between the API and the broker.
    options: dict[str, Any] = {"confirm_publish": True}
    conf: dict[str, Any] = dict(_AMQP_CONF)
    if settings.celery_quorum_queues:
        name = settings.celery_queue
        # A topic exchange, not Celery's default direct one: retries with a countdown then
        # wait in RabbitMQ (Celery's native delayed delivery for quorum queues) instead of
        # in a worker that, without global QoS, could not take other tasks meanwhile.
        exchange = Exchange(name, type="topic")
        conf |= {
            "task_queues": [
                Queue(
                    name,
                    exchange,
                    routing_key=name,
                    queue_arguments={
                        "x-queue-type": "quorum",
                        "x-delivery-limit": settings.celery_delivery_limit,
                    },
                )
            ],
            "task_default_exchange": name,
            "task_default_exchange_type": "topic",
            "task_default_routing_key": name,
            # Quorum queues refuse a global prefetch limit: Celery must use per-consumer QoS.
            "worker_detect_quorum_queues": True,
        }
    return BrokerConfig("amqp", url, options, conf)


def create_celery(settings: Settings) -> Celery:
    """A Celery app from settings: JSON only, late acks, one reserved task per process."""
    broker = broker_config(settings)
    app = Celery("renderwatch", set_as_current=False)
    app.conf.update(
        broker_url=broker.url,
        # Celery prefers the environment's CELERY_BROKER_URL to `broker_url`, raw: our
        # processes have that variable (it is our setting), and the raw value may be a form
        # only we understand (redis+sentinel://, ?master_name=). Connections are made from
        # the read and write URLs, which Celery takes from here first.
        broker_read_url=broker.url,
        broker_write_url=broker.url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker.transport_options,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=settings.celery_queue,
        worker_hijack_root_logger=False,
        timezone="UTC",
        beat_schedule={
            "snapshot-cache-stats": {
                "task": SNAPSHOT_CACHE_STATS,
                "schedule": timedelta(seconds=settings.stats_snapshot_seconds),
                # A snapshot older than its interval is worthless: let it expire.
                "options": {"expires": max(1.0, settings.stats_snapshot_seconds * 0.9)},
            }
        },
        **broker.conf,
    )
    return app


def enqueue_render(app: Celery, job_id: int) -> str:
    """Send `render_video(job_id)`; returns the Celery task id."""
    result = app.send_task(RENDER_VIDEO, args=[job_id])
    return str(result.id)
