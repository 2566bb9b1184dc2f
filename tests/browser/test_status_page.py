"""The status page in a real browser: Playwright for Python driving Debian's chromium.

The API and a Celery worker run as processes against a PRIVATE redis-server (killed in
the middle of a job: never the shared one), PostgreSQL, and RabbitMQ as the broker (so
killing Redis leaves the task queue alone). The page is driven as a person would: paste
the key, submit a job, watch the bar, look up a job that belongs to someone else.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import jobs
from shared.apikeys import create_api_key
from shared.runtime import Runtime
from shared.settings import REPO_ROOT, Settings
from tests import procs
from tests.conftest import require

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"


@pytest.fixture
def browser() -> Iterator[object]:
    require("chromium", Path(CHROMIUM).exists())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def start_redis(log_dir: Path) -> tuple[procs.ServiceProcess, str]:
    binary = procs.redis_server_binary()
    require("redis-server", binary is not None)
    assert binary is not None
    port = procs.free_port()
    data = log_dir / f"redis-{port}"
    data.mkdir()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data)]  # fmt: skip
    proc = procs.ServiceProcess(f"redis :{port}", args, os.environ, data / "redis.log").start()
    proc.wait_for_log(r"Ready to accept connections", timeout=10)
    return proc, f"redis://127.0.0.1:{port}/0"


def percent(page: object, job_id: int) -> float:
    text = page.locator(f'tr[data-job="{job_id}"] .percent').inner_text()  # type: ignore[attr-defined]
    return float(text.split()[0]) if text else 0.0


def test_submit_watch_survive_redis_loss_and_not_found(
    browser, pg_url: str, amqp_url: str, tmp_path: Path
) -> None:
    redis_proc, redis_url = start_redis(tmp_path)
    queue = f"browser-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        _env_file=None,
        database_url=pg_url,
        redis_url=redis_url,
        celery_broker_url=amqp_url,
        celery_queue=queue,
        scene_seconds=0.5,
        stats_snapshot_seconds=1,
        events_fallback_poll_seconds=0.5,
        breaker_reset_seconds=0.5,
        poll_interval_seconds=1,
        db_pool_size=2,
        db_max_overflow=2,
    )
    env = procs.settings_env(settings)
    runtime = Runtime.start(settings)
    try:
        with runtime.sessions() as session:
            key = create_api_key("page@example.com", session=session)
            foreign = jobs.create_job(
                session=session, client_id="someone-else@example.com", prompt="x", scenes_total=1
            )
    finally:
        runtime.close()
    try:
        with (
            procs.api_server(env, tmp_path) as api,
            procs.celery_worker(env, tmp_path, queue=queue),
            procs.celery_beat(env, tmp_path),
        ):
            page = browser.new_page()
            page.goto(api.base_url + "/")
            page.fill("#key", key)
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("#app:not([hidden])")
            assert page.evaluate("sessionStorage.getItem('renderwatch.key')") == key
            assert key not in page.url

            page.fill("#prompt", "a lighthouse at dusk")
            page.fill("#scenes", "14")
            page.click("#submit-form button[type=submit]")
            row = page.locator("#jobs tbody tr").first
            row.wait_for()
            job_id = int(row.get_attribute("data-job"))
            page.wait_for_selector(f'tr[data-job="{job_id}"] td.updates[data-mode="live"]')
            procs.wait_until(
                lambda: percent(page, job_id) >= 20, timeout=60, what="the bar to move"
            )

            # Redis dies in the middle of the job: the page must keep moving.
            redis_proc.stop()
            at_loss = percent(page, job_id)
            procs.wait_until(
                lambda: percent(page, job_id) > at_loss + 10,
                timeout=60,
                what="the bar to move on while Redis is down",
            )
            page.wait_for_selector(
                f'tr[data-job="{job_id}"] td.status:text("succeeded")', timeout=90_000
            )
            assert percent(page, job_id) == 100
            assert (
                page.locator(f'tr[data-job="{job_id}"] .fill').evaluate("el => el.style.width")
                == "100%"
            )

            # The stream itself fails (a proxy that drops it): the page polls and says so.
            page.route("**/events", lambda route: route.abort())
            page.fill("#scenes", "4")
            page.click("#submit-form button[type=submit]")
            # (wait_for_function would need 'unsafe-eval', which the page's CSP refuses)
            procs.wait_until(
                lambda: page.locator("#jobs tbody tr").count() == 2, timeout=30, what="a row"
            )
            second = int(page.locator("#jobs tbody tr").first.get_attribute("data-job"))
            assert second != job_id
            polled = page.locator(f'tr[data-job="{second}"] td.updates[data-mode="polling"]')
            polled.wait_for()
            assert "polling every 1s" in polled.inner_text()  # the server's X-Poll-Interval
            assert "polling" in page.inner_text("#transport")
            page.wait_for_selector(
                f'tr[data-job="{second}"] td.status:text("succeeded")', timeout=60_000
            )
            page.unroute("**/events")

            # Someone else's job looks exactly like a missing one.
            page.fill("#lookup", str(foreign.job_id))
            page.click("#lookup-form button[type=submit]")
            page.wait_for_selector("#detail-missing:not([hidden])")
            assert page.inner_text("#detail-missing") == "not found"

            # The detail of our job: its stage timeline.
            page.fill("#lookup", str(job_id))
            page.click("#lookup-form button[type=submit]")
            page.wait_for_selector("#timeline li")
            stages = page.locator("#timeline li").all_inner_texts()
            assert [re.split(r"[ (]", s)[0] for s in stages][:3] == [
                "queued", "scripting", "storyboard",
            ]  # fmt: skip
            assert page.locator('#timeline li[data-state="done"]').count() == 7

            # Redis comes back on its port: caching resumes by itself, the page shows it.
            redis_proc.start()
            redis_proc.wait_for_log(r"Ready to accept connections", timeout=10)
            page.wait_for_selector('#redis-state[data-state="ok"]', timeout=60_000)
            procs.wait_until(
                lambda: "normally" in page.inner_text("#cache-message"),
                timeout=30,
                what="the cache panel to say caching works again",
            )
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("SAVE_SCREENSHOT"):
                shutil.copy(shot, SCREENSHOT)
    finally:
        redis_proc.stop()
