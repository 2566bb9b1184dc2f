"""The SSE stream of a real API process on real Redis and PostgreSQL, and `renderwatch
watch` following a real Celery worker's job across an API restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared import jobs
from shared.apikeys import create_api_key
from shared.runtime import Runtime
from shared.settings import Settings
from tests import procs

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(240)]


def settings_for(pg_url: str, redis_url: str, namespace: str, **extra: Any) -> Settings:
    return Settings(
        _env_file=None,
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        db_pool_size=2,
        db_max_overflow=2,
        **extra,
    )


class Reader(threading.Thread):
    """Reads one stream in the background; `versions` grows as events arrive."""

    def __init__(self, url: str, key: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.headers = url, key, headers or {}
        self.versions: list[int] = []
        self.status: int | None = None
        self.ended = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", **self.headers}
        try:
            with (
                httpx.Client(timeout=30, trust_env=False) as http,
                http.stream("GET", self.url, headers=headers) as response,
            ):
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.versions.append(json.loads(line[6:])["version"])
                    if self.stop.is_set():
                        return
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()


def subscribers(redis_url: str, channel: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.pubsub_numsub(channel)[0][1])
    finally:
        client.close()


def test_streams_on_real_redis_share_one_subscription_and_shutdown_does_not_hang(
    pg_url: str, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(pg_url, redis_url, namespace)
    runtime = Runtime.start(settings)
    try:
        with runtime.sessions() as session:
            key = create_api_key("live@example.com", session=session)
            view = jobs.create_job(
                session=session, client_id="live@example.com", prompt="p", scenes_total=3
            )
        runtime.cache.publish(view)
        channel = runtime.cache.keys.channel(view.job_id)
        api = procs.api_server(procs.settings_env(settings), tmp_path)
        with api as proc:
            url = f"{proc.base_url}/api/v2/jobs/{view.job_id}/events"
            readers = [Reader(url, key) for _ in range(3)]
            for reader in readers:
                reader.start()
            procs.wait_until(
                lambda: all(r.versions == [1] for r in readers), timeout=20, what="first events"
            )
            # Three streams, one process: Redis sees one subscriber on the channel.
            procs.wait_until(lambda: subscribers(redis_url, channel) == 1, timeout=10)
            for progress in (
                {"current_stage": "scripting"},
                {"current_stage": "rendering", "scenes_completed": 1},
                {"current_stage": "rendering", "scenes_completed": 2},
            ):
                assert runtime.cache.update_progress(view.job_id, progress)
            procs.wait_until(
                lambda: all(r.versions[-1:] == [4] for r in readers), timeout=20, what="v4"
            )
            for reader in readers:
                assert reader.versions == sorted(set(reader.versions)), reader.versions
            # Shutdown with streams open: the server ends them and exits promptly.
            started = time.monotonic()
            code = proc.stop(timeout=15)
            assert time.monotonic() - started < 12, "shutdown waited on open streams"
            # (uvicorn re-raises the SIGTERM it handled once it is done: -15 is a clean exit)
            assert code in (0, -15), proc.log()
            assert "ERROR" not in proc.log(), proc.log()
            assert all(r.ended.wait(5) for r in readers)
        assert subscribers(redis_url, channel) == 0
    finally:
        runtime.close()


@pytest.mark.celery
def test_watch_follows_a_real_job_across_an_api_restart(
    pg_url: str, redis_url: str, namespace: str, amqp_url: str, tmp_path: Path
) -> None:
    queue = f"live-{uuid.uuid4().hex[:8]}"
    settings = settings_for(
        pg_url,
        redis_url,
        namespace,
        celery_broker_url=amqp_url,
        celery_queue=queue,
        scene_seconds=0.4,
    )
    env = procs.settings_env(settings)
    runtime = Runtime.start(settings)
    try:
        with runtime.sessions() as session:
            key = create_api_key("watcher@example.com", session=session)
    finally:
        runtime.close()
    port = procs.free_port()
    base = f"http://127.0.0.1:{port}"
    with procs.celery_worker(env, tmp_path, queue=queue):
        api = procs.api_server(env, tmp_path, port=port)
        with api:
            submitted = httpx.post(
                f"{base}/api/v2/jobs",
                json={"prompt": "a kite", "scenes_total": 25},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            assert submitted.status_code == 202
            assert submitted.headers["x-poll-interval"]
            job_id = submitted.json()["job_id"]
            watch = subprocess.Popen(
                [sys.executable, "-m", "renderwatch.cli", "watch", str(job_id), "--json"],
                env={**os.environ, **env, "RENDERWATCH_API_URL": base,
                     "RENDERWATCH_API_KEY": key},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert watch.stdout is not None
            lines = [watch.stdout.readline(), watch.stdout.readline(), watch.stdout.readline()]
            assert all(lines), "watch printed nothing"
        # The API is down (stopped with the stream open) and comes back on its port.
        time.sleep(1.0)
        with procs.api_server(env, tmp_path, port=port):
            out, err = watch.communicate(timeout=120)
    assert watch.returncode == 0, err
    objects = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
    versions = [o["version"] for o in objects]
    assert versions == sorted(set(versions)), "a version came twice or went backwards"
    assert objects[-1]["status"] == "succeeded"
    rendered = [o["progress"]["eta_seconds"] for o in objects if o["progress"]["scenes_completed"]]
    assert any(eta is not None and eta > 0 for eta in rendered), "no ETA while rendering"


def test_a_stream_keeps_going_while_its_redis_is_paused_then_pushes_again(
    pg_url: str, tmp_path: Path
) -> None:
    import signal

    binary = procs.redis_server_binary()
    if binary is None:
        pytest.skip("SKIPPED LOUDLY: redis-server is not installed")
    port = procs.free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]  # fmt: skip
    redis_proc = procs.ServiceProcess("redis (paused later)", args, os.environ,
                                      tmp_path / "redis.log").start()  # fmt: skip
    try:
        redis_proc.wait_for_log(r"Ready to accept connections", timeout=10)
        redis_url = f"redis://127.0.0.1:{port}/0"
        settings = settings_for(
            pg_url, redis_url, "", events_fallback_poll_seconds=0.5, breaker_reset_seconds=0.5
        )
        runtime = Runtime.start(settings)
        try:
            with runtime.sessions() as session:
                key = create_api_key("paused@example.com", session=session)
                view = jobs.create_job(
                    session=session, client_id="paused@example.com", prompt="p", scenes_total=9
                )
            runtime.cache.publish(view)
            with procs.api_server(procs.settings_env(settings), tmp_path) as api:
                reader = Reader(f"{api.base_url}/api/v2/jobs/{view.job_id}/events", key)
                reader.start()
                procs.wait_until(lambda: reader.versions == [1], timeout=20, what="first event")
                assert runtime.cache.update_progress(view.job_id, {"current_stage": "scripting"})
                procs.wait_until(lambda: reader.versions[-1] == 2, timeout=10, what="push")
                os.kill(redis_proc.pid, signal.SIGSTOP)
                try:
                    # The write lands in the DB (its pre-warm and publish time out).
                    assert runtime.cache.update_progress(
                        view.job_id, {"current_stage": "storyboard"}
                    )
                    procs.wait_until(
                        lambda: reader.versions[-1] == 3, timeout=30, what="v3 while paused"
                    )
                finally:
                    os.kill(redis_proc.pid, signal.SIGCONT)
                for scene in range(1, 10):
                    runtime.cache.update_progress(
                        view.job_id, {"current_stage": "rendering", "scenes_completed": scene}
                    )
                    time.sleep(0.1)
                runtime.cache.update_progress(
                    view.job_id,
                    {"current_stage": "done", "status": "succeeded", "result_url": "https://r/1"},
                )
                assert reader.ended.wait(30), reader.versions
                assert reader.versions == sorted(set(reader.versions)), reader.versions
                assert reader.versions[-1] == 13
                assert "subscription connection is back" in api.log()
        finally:
            runtime.close()
    finally:
        redis_proc.stop()
