"""RabbitMQ as the Celery broker, for real: what shared.queue asks of it actually holds.

Each test runs in a private vhost (tests/brokers.py), as a private user with a random
password, with real prefork workers; jobs in PostgreSQL, caching off (the broker is
what is under test). Checked on the server itself (`rabbitmqctl list_queues`):

- the task queue is a quorum queue with the delivery limit of the settings;
- publications are confirmed by the broker (publisher confirms);
- a countdown waits in RabbitMQ (Celery's native delayed delivery), not in a worker,
  and a retry's countdown comes back that way too;
- a render that kills its worker process every time is dropped after the delivery
  limit instead of killing workers forever (a poison message);
- a render cut off from RabbitMQ is stopped and resumed by its redelivered copy, not
  rendered twice;
- the broker password never shows in a worker's log.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared import jobs
from shared.queue import RENDER_VIDEO, create_celery
from shared.runtime import Runtime
from shared.schemas import JobView, Stage
from shared.settings import Settings
from tests import procs
from tests.brokers import list_queues, private_vhost, rabbitmqctl
from tests.renderers import RENDER_LOG_ENV, RecordingRenderer, renderer_log

pytestmark = [pytest.mark.postgres, pytest.mark.celery, pytest.mark.rabbitmq]

FINISH_TIMEOUT = 60.0
KILLER = "tests.integration.test_rabbitmq_broker:KillerRenderer"
RECORDING = "tests.renderers:RecordingRenderer"


class KillerRenderer(RecordingRenderer):
    """Kills its own worker process at the first stage: a poison message's render."""

    def run_stage(self, job_id: int, stage: Stage) -> None:
        if stage is Stage.SCRIPTING:
            os.kill(os.getpid(), signal.SIGKILL)
        super().run_stage(job_id, stage)


@dataclass
class Rabbit:
    url: str
    settings: Settings
    runtime: Runtime
    celery: Any
    tmp_path: Path

    @property
    def password(self) -> str:
        return self.url.split("@", 1)[0].rsplit(":", 1)[1]

    @property
    def render_log(self) -> Path:
        return self.tmp_path / "renders.log"

    def worker(self, *, concurrency: int = 1, **overrides: object) -> Any:
        env = procs.settings_env(self.settings, **overrides)
        env[RENDER_LOG_ENV] = str(self.render_log)
        return procs.celery_worker(
            env, self.tmp_path, queue=self.settings.celery_queue, concurrency=concurrency
        )

    def create_job(self, scenes: int = 3) -> int:
        with self.runtime.sessions() as session:
            return jobs.create_job(
                session=session, client_id="rabbit@test", prompt="a fox", scenes_total=scenes
            ).job_id

    def job(self, job_id: int) -> JobView:
        with self.runtime.sessions() as session:
            view = jobs.get_job(job_id, session=session)
        assert view is not None
        return view

    def wait_finished(self, job_id: int) -> JobView:
        view: JobView = procs.wait_until(
            lambda: (v := self.job(job_id)).finished and v,
            timeout=FINISH_TIMEOUT,
            what=f"job {job_id} to finish",
        )
        return view

    def queue(self, *columns: str) -> list[str]:
        return list_queues(self.url, *columns)[self.settings.celery_queue]


@contextmanager
def open_rabbit(
    amqp_url: str, make_settings: Callable[..., Settings], tmp_path: Path, **overrides: Any
) -> Iterator[Rabbit]:
    """Settings on a private vhost and user (caching off), the test's Runtime and app."""
    with private_vhost(amqp_url, private_user=True) as url:
        values: dict[str, Any] = {
            "redis_url": "",
            "celery_broker_url": url,
            "celery_queue": "renders",
            "celery_delivery_limit": 2,
            "scene_seconds": 0.05,
            "stats_snapshot_seconds": 1,
            "log_level": "INFO",
            **overrides,
        }
        settings = make_settings(**values)
        runtime = Runtime.start(settings)
        celery = create_celery(settings)
        try:
            yield Rabbit(url, settings, runtime, celery, tmp_path)
        finally:
            celery.close()
            runtime.close()


@pytest.fixture
def rabbit(
    amqp_url: str, pg_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Rabbit]:
    with open_rabbit(amqp_url, make_settings, tmp_path, database_url=pg_url) as opened:
        yield opened


@pytest.mark.timeout(120)
def test_a_render_is_published_with_confirms_into_a_quorum_queue(rabbit: Rabbit) -> None:
    job_id = rabbit.create_job()
    with rabbit.worker() as worker:
        kind, arguments = rabbit.queue("type", "arguments")
        with rabbit.celery.producer_or_acquire() as producer:
            rabbit.celery.send_task(RENDER_VIDEO, args=[job_id], producer=producer)
            # py-amqp switches a channel to confirm mode at its first publication and
            # then waits for the broker's ack of each one.
            confirmed = producer.channel._confirm_selected
        final = rabbit.wait_finished(job_id)
        env = procs.settings_env(rabbit.settings)
        with procs.celery_beat(env, rabbit.tmp_path) as beat:
            # Beat prints its broker at start, then sends through it.
            beat.wait_for_log(r"Sending due task", timeout=30)
            beat_log = beat.log()
        log = worker.log()
    assert kind == "quorum"
    assert '{"x-delivery-limit",2}' in arguments, arguments
    assert confirmed is True, "the publication was not confirmed by the broker"
    assert final.status == "succeeded"
    assert "Global QoS is disabled" in log, "quorum queues need per-consumer QoS"
    assert rabbit.password not in log and "amqp://" in log
    assert rabbit.password not in beat_log and "amqp://" in beat_log


def delayed(url: str) -> dict[str, int]:
    """Messages waiting in the delayed-delivery queues (the server's counts lag ~5 s)."""
    return {
        name: int(messages)
        for name, (messages,) in list_queues(url, "messages").items()
        if name.startswith("celery_delayed_") and int(messages)
    }


@pytest.mark.timeout(120)
def test_a_countdown_waits_in_rabbitmq_then_reaches_the_worker(rabbit: Rabbit) -> None:
    """Celery's native delayed delivery: the task sits in RabbitMQ's delay queues, and
    the worker receives it only when it is due (it does not hold it, blocking its slot)."""
    job_id = rabbit.create_job()
    countdown = 15
    received = r"\] received"
    with rabbit.worker() as worker:
        rabbit.celery.send_task(RENDER_VIDEO, args=[job_id], countdown=countdown)
        waiting = procs.wait_until(
            lambda: delayed(rabbit.url), timeout=countdown, what="the task in a delay queue"
        )
        early = re.findall(received, worker.log())
        final = rabbit.wait_finished(job_id)
        log = worker.log()
    assert sum(waiting.values()) == 1, waiting
    assert not early, "the worker received the task before it was due"
    assert final.status == "succeeded"
    assert len(re.findall(received, log)) == 1


@pytest.mark.timeout(120)
def test_a_retry_comes_back_through_rabbitmq(
    amqp_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A transient database error (here: a database without its tables) retries the task
    with a countdown under 2 s; on quorum queues that countdown goes through the delayed
    delivery, which refuses (and drops the task) below one whole second."""
    empty = f"sqlite:///{tmp_path / 'no-tables.db'}"
    with (
        open_rabbit(amqp_url, make_settings, tmp_path, database_url=empty) as rabbit,
        rabbit.worker() as worker,
    ):
        rabbit.celery.send_task(RENDER_VIDEO, args=[1])
        worker.wait_for_log(r"retry 2/\d+", timeout=FINISH_TIMEOUT)
        log = worker.log()
    assert "countdown must be a positive number" not in log
    assert "reject requeue=False" not in log


@pytest.mark.timeout(150)
def test_a_render_that_kills_its_worker_every_time_is_dropped_at_the_delivery_limit(
    rabbit: Rabbit,
) -> None:
    job_id = rabbit.create_job()
    limit = rabbit.settings.celery_delivery_limit
    with rabbit.worker(renderer=KILLER) as worker:
        rabbit.celery.send_task(RENDER_VIDEO, args=[job_id])
        received = r"\] received"
        procs.wait_until(
            lambda: len(re.findall(received, worker.log())) >= limit + 1,
            timeout=FINISH_TIMEOUT,
            what=f"{limit + 1} deliveries",
        )
        procs.wait_until(
            lambda: rabbit.queue("messages") == ["0"], timeout=30, what="the queue to empty"
        )
        time.sleep(3)  # a further delivery would show in the log by now
        deliveries = len(re.findall(received, worker.log()))
        lost = len(re.findall(r"WorkerLostError|Worker exited prematurely", worker.log()))
        alive = worker.alive()
    print(f"\nRABBITMQ poison message: limit={limit}, deliveries={deliveries}, lost={lost}")
    assert deliveries == limit + 1, "RabbitMQ should drop the message after the limit"
    assert lost >= limit + 1 and alive, "the main process survives and rejects each loss"
    assert not rabbit.job(job_id).finished, "no render ever got past its first stage"


@pytest.mark.timeout(150)
def test_a_render_cut_off_from_rabbitmq_is_resumed_once_not_run_twice(rabbit: Rabbit) -> None:
    """RabbitMQ closes the worker's connections mid-render (as on a network blip or a
    broker restart): the task goes back to the queue at once. The worker stops its
    running copy (it could not ack it anyway) and the redelivered one resumes the job,
    with a second process free to take it: no scene is rendered twice but the one in
    progress."""
    scenes = 10
    job_id = rabbit.create_job(scenes)
    with rabbit.worker(concurrency=2, renderer=RECORDING, scene_seconds=0.4) as worker:
        rabbit.celery.send_task(RENDER_VIDEO, args=[job_id])
        procs.wait_until(
            lambda: rabbit.job(job_id).progress.scenes_completed >= 3,
            timeout=FINISH_TIMEOUT,
            what="3 rendered scenes",
        )
        vhost = rabbit.url.rsplit("/", 1)[1]
        rabbitmqctl("close_all_connections", "-p", vhost, "test: connection cut")
        final = rabbit.wait_finished(job_id)
        time.sleep(2)  # a copy still running would render more scenes by now
        log = worker.log()
    rendered = [int(w) for _, j, kind, w in renderer_log(rabbit.render_log) if kind == "scene"]
    print(f"\nRABBITMQ connection cut: {len(rendered)} scene renders for {scenes} scenes")
    assert "Connection to broker lost" in log
    assert len(re.findall(r"\] received", log)) == 2, "the task should come back once"
    assert final.status == "succeeded"
    assert set(rendered) == set(range(1, scenes + 1))
    assert len(rendered) - scenes <= 1, f"scenes rendered twice: {sorted(rendered)}"
