"""Health checks of the app services, as docker-compose.yml declares them.

`renderwatch healthcheck NAME` (or `python -m renderwatch.health NAME`) exits 0 when healthy:

- api: `GET /readyz` on the API port answers 200 (the database is reachable).
- worker: the worker node (`WORKER_NAME@host`) answers over the broker and consumes
  `CELERY_QUEUE`.
- beat: the beat node (`BEAT_NAME@host`, beat runs with `--enable-remote-control`)
  answers a ping over the broker; Celery's beat stops answering once its scheduler
  has not ticked for a while, so a reply means "alive and scheduling".
- worker and beat over a broker without remote control (the SQL fallback broker of a
  machine without Redis): the broker answers, and the message says the node was not
  asked.
- flower: `GET /healthcheck` on the Flower port answers "OK".

The check runs where the service runs (inside its container, or on the same machine
for the local runner), so it reaches it on loopback and shares its host name.
Messages never carry URLs or passwords.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Connection

T = TypeVar("T")

HTTP_TIMEOUT_SECONDS = 3.0
REPLY_TIMEOUT_SECONDS = 2.0
BROKER_TIMEOUT_SECONDS = 3
SERVICES = ("api", "worker", "beat", "flower")


class NodeNames(BaseSettings):
    """Celery node names (`WORKER_NAME`, `BEAT_NAME`) that docker-compose.yml gives `-n NAME@%h`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    worker_name: str = Field(default="worker", min_length=1, max_length=64)
    beat_name: str = Field(default="celerybeat", min_length=1, max_length=64)


def node(name: str) -> str:
    """`name@<this host>`, the way `celery -n name@%h` spells it."""
    from celery.utils.nodenames import host_format

    return host_format(f"{name}@%h")


def _loopback(host: str) -> str:
    # A wildcard bind is reached on loopback; a specific address only on itself.
    if host in ("", "0.0.0.0", "localhost"):  # noqa: S104
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _http_ok(service: str, url: str, expect: str | None = None) -> tuple[bool, str]:
    import httpx

    try:
        # trust_env=False: a proxy from the environment must never sit in front of loopback.
        response = httpx.get(url, timeout=HTTP_TIMEOUT_SECONDS, trust_env=False)
    except httpx.HTTPError as exc:
        return False, f"{service}: {url} unreachable ({type(exc).__name__})"
    if response.status_code != 200:
        return False, f"{service}: {url} answered {response.status_code}"
    if expect is not None and response.text.strip() != expect:
        return False, f"{service}: {url} answered 200 without {expect!r}"
    return True, f"{service}: {url} answered 200"


def check_api(settings: Settings) -> tuple[bool, str]:
    """The API answers /readyz with 200."""
    return _http_ok("api", f"http://{_loopback(settings.api_host)}:{settings.api_port}/readyz")


def check_flower(settings: Settings) -> tuple[bool, str]:
    """Flower answers /healthcheck with OK."""
    return _http_ok("flower", f"http://127.0.0.1:{settings.flower_port}/healthcheck", "OK")


class _NoRemoteControl:
    """The broker answers but its transport has no fanout (the SQL fallback broker)."""


NO_REMOTE_CONTROL = _NoRemoteControl()


def _over_broker(
    settings: Settings, what: str, call: Callable[[Celery, Connection], T]
) -> T | str | _NoRemoteControl:
    """`call(app, connection)` once the broker answers; a message string if it does not."""
    from kombu.exceptions import OperationalError

    from shared.queue import create_celery

    app = create_celery(settings)
    try:
        with app.connection_for_write() as conn:
            # Fail fast: a healthcheck must answer within its own timeout, not retry forever.
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS)
            if not conn.supports_exchange_type("fanout"):
                return NO_REMOTE_CONTROL
            return call(app, conn)
    except (OperationalError, OSError) as exc:
        return f"{what}: broker unreachable ({type(exc).__name__})"
    finally:
        app.close()


def _unaskable(what: str, target: str) -> str:
    # Without Redis the broker may be the SQL fallback, which carries no remote control:
    # the best this check can say is that the broker answers (the local runner also
    # watches the process itself). Docker's stack always has Redis as its broker.
    return (
        f"{what}: broker reachable, but its transport has no remote control, so {target} "
        "was not asked (use Redis or RabbitMQ as CELERY_BROKER_URL for a full check)"
    )


def check_worker(settings: Settings, names: NodeNames | None = None) -> tuple[bool, str]:
    """Our worker node answers over the broker and consumes CELERY_QUEUE."""
    target = node((names or NodeNames()).worker_name)

    def active_queues(app: Celery, conn: Connection) -> dict[str, Any]:
        inspect = app.control.inspect(
            destination=[target], timeout=REPLY_TIMEOUT_SECONDS, connection=conn
        )
        return inspect.active_queues() or {}

    replies = _over_broker(settings, "worker", active_queues)
    if isinstance(replies, str):
        return False, replies
    if isinstance(replies, _NoRemoteControl):
        return True, _unaskable("worker", target)
    if target not in replies:
        return False, f"worker: {target} did not answer"
    queues = {q.get("name") for q in replies[target] or [] if isinstance(q, dict)}
    if settings.celery_queue not in queues:
        return False, f"worker: {target} answered but does not consume {settings.celery_queue!r}"
    return True, f"worker: {target} consumes {settings.celery_queue!r}"


def check_beat(settings: Settings, names: NodeNames | None = None) -> tuple[bool, str]:
    """Our beat node answers a ping (it stays silent once its scheduler has stalled)."""
    target = node((names or NodeNames()).beat_name)

    def ping(app: Celery, conn: Connection) -> list[dict[str, Any]]:
        replies = app.control.ping(
            destination=[target], timeout=REPLY_TIMEOUT_SECONDS, connection=conn
        )
        return list(replies or [])

    replies = _over_broker(settings, "beat", ping)
    if isinstance(replies, str):
        return False, replies
    if isinstance(replies, _NoRemoteControl):
        return True, _unaskable("beat", target)
    answered = {name for reply in replies if isinstance(reply, dict) for name in reply}
    if target not in answered:
        return False, f"beat: {target} did not answer (not running, or its scheduler stalled)"
    return True, f"beat: {target} answered"


CHECKS: dict[str, Callable[[Settings], tuple[bool, str]]] = {
    "api": check_api,
    "worker": check_worker,
    "beat": check_beat,
    "flower": check_flower,
}


def check_service(name: str, settings: Settings) -> tuple[bool, str]:
    """(healthy, one-line reason) for one app service."""
    check = CHECKS.get(name)
    if check is None:
        return False, f"unknown service {name!r}; expected one of {', '.join(SERVICES)}"
    return check(settings)


def main(name: str) -> int:
    """`renderwatch healthcheck NAME`: print the reason, exit 0 when healthy, 1 when not."""
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"{name}: bad settings: {exc}", file=sys.stderr)
        return 1
    ok, detail = check_service(name, settings)
    print(detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(f"usage: python -m renderwatch.health {{{'|'.join(SERVICES)}}}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1]))
