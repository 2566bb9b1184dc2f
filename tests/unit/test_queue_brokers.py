"""The Celery configuration each broker gets (shared.queue): URLs, transport options, queues.

The brokers themselves run in tests/faults/test_worker_faults.py (Redis, RabbitMQ),
tests/e2e (Redis, RabbitMQ) and tests/integration/test_sentinel_broker.py (Sentinel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kombu import Connection

from shared.queue import BrokerConfigError, broker_config, create_celery
from shared.settings import Settings

Make = Callable[..., Settings]
REDIS_ONLY = {"visibility_timeout", "unacked_restore_interval", "unacked_restore_throttle"}


def app_conf(settings: Settings) -> Any:
    app = create_celery(settings)
    conf = app.conf
    app.close()
    return conf


def test_redis_gets_the_visibility_timeout_and_a_restore_scan_on_every_look(make_settings: Make):
    settings = make_settings(
        celery_broker_url="redis://127.0.0.1:6379/1", task_visibility_timeout=60
    )
    broker = broker_config(settings)
    assert broker.kind == "redis"
    assert broker.url == "redis://127.0.0.1:6379/1"
    assert broker.transport_options == {
        "visibility_timeout": 60,
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    }
    conf = app_conf(settings)
    assert conf.broker_transport_options == broker.transport_options
    assert not conf.task_queues, "Redis takes Celery's default queue declaration"
    # The task comes back only after the visibility timeout: let a running render finish.
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False


def test_without_a_broker_url_the_redis_url_is_the_broker(make_settings: Make):
    broker = broker_config(make_settings(redis_url="rediss://cache.example:6380/0"))
    assert broker.kind == "redis" and broker.url == "rediss://cache.example:6380/0"
    assert broker.transport_options["visibility_timeout"] == 3_600


def test_without_redis_the_database_is_the_broker_with_no_options(make_settings: Make):
    broker = broker_config(make_settings(redis_url="", database_url="sqlite:////tmp/x.db"))
    assert broker.kind == "sql" and broker.url == "sqla+sqlite:////tmp/x.db"
    assert broker.transport_options == {}


def test_memory_broker_gets_no_redis_options(make_settings: Make):
    broker = broker_config(make_settings(celery_broker_url="memory://"))
    assert broker.kind == "other" and broker.transport_options == {}


@pytest.mark.parametrize("scheme", ["amqp", "amqps", "pyamqp"])
def test_rabbitmq_confirms_publications_and_declares_a_quorum_queue(
    make_settings: Make, scheme: str
):
    url = f"{scheme}://app:s3cret@mq.example:5672/render"
    settings = make_settings(celery_broker_url=url, celery_queue="renders", celery_delivery_limit=7)
    broker = broker_config(settings)
    assert broker.kind == "amqp" and broker.url == url
    assert broker.transport_options == {"confirm_publish": True}
    assert not REDIS_ONLY & broker.transport_options.keys()

    conf = app_conf(settings)
    (queue,) = conf.task_queues
    assert queue.name == "renders" and queue.routing_key == "renders"
    assert queue.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": 7}
    # Native delayed delivery (countdown retries on quorum queues) needs a topic exchange.
    assert queue.exchange.name == "renders" and queue.exchange.type == "topic"
    assert conf.task_default_exchange_type == "topic"
    assert conf.task_default_queue == "renders"
    assert conf.worker_detect_quorum_queues is True
    # The task comes back at once: stop the running copy rather than render twice.
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    # What Celery itself concludes from it: per-consumer QoS and delayed delivery.
    from celery.utils.quorum_queues import detect_quorum_queues

    app = create_celery(settings)
    try:
        assert detect_quorum_queues(app, "amqp") == (True, "renders")
        # Late acks and redelivery on worker loss hold on every broker.
        assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
        assert app.conf.worker_prefetch_multiplier == 1
    finally:
        app.close()


def test_rabbitmq_classic_queues_when_quorum_queues_are_off(make_settings: Make):
    settings = make_settings(celery_broker_url="amqp://mq//", celery_quorum_queues=False)
    broker = broker_config(settings)
    assert broker.conf == {"worker_cancel_long_running_tasks_on_connection_loss": True}
    assert broker.transport_options == {"confirm_publish": True}
    assert not app_conf(settings).task_queues


def test_sentinel_url_takes_the_master_name_from_its_query(make_settings: Make):
    url = "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2:26379/2?master_name=renders"
    broker = broker_config(make_settings(celery_broker_url=url, task_visibility_timeout=30))
    assert broker.kind == "sentinel"
    assert broker.url == "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2:26379/2"
    assert broker.transport_options["master_name"] == "renders"
    assert broker.transport_options["visibility_timeout"] == 30
    assert "sentinel_kwargs" not in broker.transport_options
    assert broker.conf == {"worker_cancel_long_running_tasks_on_connection_loss": False}


def test_sentinel_master_name_and_password_from_settings(make_settings: Make):
    settings = make_settings(
        celery_broker_url="sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379",
        celery_broker_master_name="mymaster",
        celery_broker_sentinel_password="sentinel-secret",
    )
    broker = broker_config(settings)
    assert broker.transport_options["master_name"] == "mymaster"
    assert broker.transport_options["sentinel_kwargs"] == {"password": "sentinel-secret"}
    # kombu reads every sentinel of the list as a failover alternative.
    connection = Connection(broker.url, transport_options=broker.transport_options)
    assert connection.transport_cls == "sentinel"
    assert connection.alt == ["sentinel://10.0.0.1:26379", "sentinel://10.0.0.2:26379"]


def test_sentinel_without_a_master_name_is_refused_clearly(make_settings: Make):
    settings = make_settings(celery_broker_url="sentinel://:hunter2@10.0.0.1:26379")
    with pytest.raises(BrokerConfigError, match="CELERY_BROKER_MASTER_NAME") as caught:
        broker_config(settings)
    assert "hunter2" not in str(caught.value)


def test_a_redis_sentinel_redis_url_becomes_kombus_sentinel_broker(make_settings: Make):
    settings = make_settings(redis_url="redis+sentinel://:pw@h1:26379,h2:26380/renders/3")
    broker = broker_config(settings)
    assert broker.kind == "sentinel"
    assert broker.url == "sentinel://:pw@h1:26379/3;sentinel://:pw@h2:26380/3"
    assert broker.transport_options["master_name"] == "renders"


def test_a_redis_sentinel_redis_url_without_db_uses_db_0(make_settings: Make):
    broker = broker_config(make_settings(redis_url="redis+sentinel://h1:26379/renders"))
    assert broker.url == "sentinel://h1:26379/0"
    assert broker.transport_options["master_name"] == "renders"


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("redis+sentinel://:topsecret@h1:26379", "service"),
        ("redis+sentinel://:topsecret@h1:26379/renders/x", "db"),
    ],
)
def test_a_bad_redis_sentinel_url_is_refused_naming_the_part(
    make_settings: Make, url: str, part: str
):
    with pytest.raises(BrokerConfigError, match=part) as caught:
        broker_config(make_settings(redis_url=url))
    assert "topsecret" not in str(caught.value)


def test_a_redis_cluster_cannot_be_the_broker(make_settings: Make):
    with pytest.raises(BrokerConfigError, match="CELERY_BROKER_URL"):
        broker_config(make_settings(redis_url="redis+cluster://h1:7000,h2:7001"))
    with pytest.raises(BrokerConfigError, match="CELERY_BROKER_URL"):
        broker_config(make_settings(redis_url="redis://h1:7000", redis_mode="cluster"))
    # An explicit broker next to a cluster cache is fine.
    settings = make_settings(redis_url="redis+cluster://h1:7000", celery_broker_url="amqp://mq//")
    assert broker_config(settings).kind == "amqp"


def test_a_broker_url_without_a_scheme_is_refused_without_its_password(make_settings: Make):
    with pytest.raises(BrokerConfigError, match="no scheme") as caught:
        broker_config(make_settings(celery_broker_url="app:s3cret@mq.example:5672"))
    assert "s3cret" not in str(caught.value)


def test_the_translated_url_wins_over_celerys_own_reading_of_the_environment(
    make_settings: Make, monkeypatch: pytest.MonkeyPatch
):
    """Celery reads CELERY_BROKER_URL from the environment itself, raw; our processes have
    it set (it is our setting). Connections must use the translated URL."""
    raw = "sentinel://:pw@127.0.0.1:26379/0?master_name=renders"
    monkeypatch.setenv("CELERY_BROKER_URL", raw)
    app = create_celery(make_settings(celery_broker_url=raw))
    try:
        for connection in (app.connection_for_read(), app.connection_for_write()):
            with connection:
                assert connection.transport_cls == "sentinel"
                assert "master_name" not in connection.as_uri()
                options = connection.transport_options
                assert options is not None and options["master_name"] == "renders"
    finally:
        app.close()


def test_a_unix_socket_redis_url_becomes_kombus_socket_form(make_settings: Make):
    """REDIS_URL's `unix://` (redis-py) is `redis+socket://` to kombu, db as virtual_host
    (checked against a real redis-server on a socket when this was written)."""
    broker = broker_config(make_settings(redis_url="unix://:pw@/run/redis/redis.sock?db=3"))
    assert broker.kind == "redis"
    assert broker.url == "redis+socket://:pw@/run/redis/redis.sock?virtual_host=3"
    assert broker.transport_options["visibility_timeout"] == 3_600
    plain = broker_config(make_settings(redis_url="unix:///tmp/r.sock"))
    assert plain.url == "redis+socket:///tmp/r.sock"


def test_cluster_mode_without_any_redis_url_falls_back_to_the_database(make_settings: Make):
    settings = make_settings(redis_url="", redis_mode="cluster", database_url="sqlite:///x.db")
    assert broker_config(settings).kind == "sql"
