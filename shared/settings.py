"""Typed settings, read once from the environment and `.env` (pydantic-settings).

Build one `Settings` at start-up and pass it down; nothing else reads `os.environ`.
URLs may carry passwords: log them only through `redact_url`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = REPO_ROOT / "var" / "renderwatch.db"


def redact_url(url: str) -> str:
    """Return `url` with any password replaced by `***` (safe for logs and errors)."""
    if not url:
        return url
    # Query options may carry passwords too (`?sentinel_password=`, README "Running in
    # production").
    url = re.sub(r"((?:^|[?&;])[^=&;#]*password=)([^&;#]*)", r"\1***", url, flags=re.IGNORECASE)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class Settings(BaseSettings):
    """Everything configurable, with the defaults of DESIGN.md."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str = f"sqlite:///{DEFAULT_SQLITE_PATH}"
    db_pool_size: int = Field(default=5, ge=1, le=200)
    db_max_overflow: int = Field(default=10, ge=0, le=500)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    celery_broker_url: str = ""
    celery_queue: str = Field(default="renderwatch", min_length=1, max_length=64)

    cache_ttl_seconds: int = Field(default=30, ge=1, le=86_400)
    cache_finished_ttl_seconds: int = Field(default=3_600, ge=1, le=604_800)
    job_cache_key_prefix: str = Field(default="job", min_length=1, max_length=32)
    cache_namespace: str = Field(default="", max_length=64)
    # Keys the MAC that seals every cached value (shared.cache.seal); shared by every
    # process of a deployment. Empty: a public default (corruption and foreign values
    # are still caught, a deliberate forger with write access to Redis is not).
    cache_seal_key: SecretStr = SecretStr("")
    cache_lease_ms: int = Field(default=500, ge=10, le=10_000)
    redis_socket_timeout: float = Field(default=0.25, gt=0, le=10)
    breaker_failure_threshold: int = Field(default=1, ge=1, le=100)
    breaker_reset_seconds: float = Field(default=1.0, gt=0, le=300)

    api_key_cache_seconds: float = Field(default=10.0, ge=0, le=3_600)
    stats_snapshot_seconds: int = Field(default=60, ge=1, le=86_400)
    stats_retention: int = Field(default=10_000, ge=1)
    scene_seconds: float = Field(default=2.0, ge=0, le=3_600)
    renderer: str = "simulated"
    task_visibility_timeout: int = Field(default=3_600, ge=5)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65_535)
    api_workers: int = Field(default=1, ge=1, le=64)
    flower_port: int = Field(default=5555, ge=1, le=65_535)
    log_level: str = "INFO"
    # Seal secrets, comma-separated, newest first: the first seals new cache entries, every
    # one is accepted when reading, so keys rotate without a refill storm (README, "Rotating
    # the seal key"). When set, it replaces CACHE_SEAL_KEY.
    cache_seal_keys: SecretStr = SecretStr("")
    # PostgreSQL statement timeout of every query (0: none); the fill lease outlasts it.
    db_statement_timeout_ms: int = Field(default=2_000, ge=0, le=600_000)
    # The async poll reads the DB when Redis is silent for this long (0: no hedging).
    cache_hedge_ms: int = Field(default=10, ge=0, le=10_000)
    # Each process flushes its statistics to Redis at most this often (and periodically).
    cache_stats_flush_seconds: float = Field(default=1.0, gt=0, le=3_600)
    # "No such job" is cached this long (a tombstone that a create or write overrides).
    cache_missing_ttl_seconds: int = Field(default=5, ge=1, le=3_600)
    # The async poll sends the cache reads that arrive within one event-loop tick to
    # Redis as one script call (README "Performance"); off: one call per read.
    cache_read_batching: bool = True

    # The Celery broker (README "Choosing a broker"). Redis Sentinel (`sentinel://`): the
    # master's name (else `?master_name=` on the URL, or the service of a
    # `redis+sentinel://` REDIS_URL) and the sentinels' own password, if they have one.
    celery_broker_master_name: str = Field(default="", max_length=128)
    celery_broker_sentinel_password: SecretStr = SecretStr("")
    # RabbitMQ (`amqp://`): the task queue is a quorum queue (replicated, delivery
    # counted); a message delivered more often than the limit is dropped by RabbitMQ.
    celery_quorum_queues: bool = True
    celery_delivery_limit: int = Field(default=20, ge=1, le=10_000)

    # Live progress (README "Following a job live"): the SSE stream and the poll hint.
    sse_max_streams: int = Field(default=5_000, ge=1, le=1_000_000)
    sse_send_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    sse_keepalive_seconds: float = Field(default=15.0, gt=0, le=3_600)
    events_fallback_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    poll_interval_seconds: float = Field(default=2.0, gt=0, le=3_600)

    @field_validator("redis_url", "celery_broker_url", "database_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("cache_namespace")
    @classmethod
    def _namespace_shape(cls, value: str) -> str:
        if value and not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError("CACHE_NAMESPACE may hold letters, digits, '-', '_' and '.'")
        return value

    def as_environment(self) -> dict[str, str]:
        """Every setting as the environment variable that sets it (secrets revealed), for
        child processes that must share this configuration. Never log the result."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[name.upper()] = str(value)
        return env

    @property
    def broker_url(self) -> str:
        """The Celery broker: explicit, else the Redis URL, else the SQL database."""
        if self.celery_broker_url:
            return self.celery_broker_url
        if self.redis_url:
            return self.redis_url
        return "sqla+" + self.database_url

    @property
    def key_namespace(self) -> str:
        """The CACHE_NAMESPACE prefix (empty or ending in ':'). Empty means the runtime
        derives one from the database's incarnation (see `shared.meta`)."""
        return f"{self.cache_namespace}:" if self.cache_namespace else ""

    def seal_secrets(self) -> list[bytes]:
        """The seal secrets, newest first (revealed: never log them); empty: none set."""
        if listed := self.cache_seal_keys.get_secret_value():
            return [part.strip().encode() for part in listed.split(",") if part.strip()]
        single = self.cache_seal_key.get_secret_value()
        return [single.encode()] if single else []


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
