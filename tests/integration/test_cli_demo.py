"""The demo's Redis choice with a real, private redis-server (no stack is started)."""

from __future__ import annotations

import shutil

import pytest

from renderwatch import demo
from tests.conftest import require

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def redis_binary() -> str:
    binary = shutil.which("redis-server")
    require("redis-server binary", binary is not None)
    assert binary is not None
    return binary


def test_a_silent_redis_url_gets_a_private_redis_server_that_is_stopped(redis_binary, tmp_path):
    silent = f"redis://127.0.0.1:{demo.free_port()}/0"
    assert not demo.redis_answers(silent)
    choice = demo.choose_redis(silent, binary=redis_binary, workdir=tmp_path)
    try:
        assert choice.origin == "private"
        assert choice.url != silent and choice.process is not None
        assert demo.redis_answers(choice.url)
        process = choice.process
    finally:
        choice.stop()
    assert process.poll() is not None
    assert not demo.redis_answers(choice.url)


def test_a_redis_that_answers_is_used_as_is(redis_url, redis_binary, tmp_path):
    choice = demo.choose_redis(redis_url, binary=redis_binary, workdir=tmp_path)
    assert (choice.url, choice.origin, choice.process) == (redis_url, "configured", None)


def test_a_private_server_that_cannot_start_leaves_caching_off(tmp_path):
    choice = demo.choose_redis(
        f"redis://127.0.0.1:{demo.free_port()}/0", binary="/bin/false", workdir=tmp_path
    )
    assert (choice.url, choice.origin, choice.process) == ("", "none", None)
    assert "caching stays OFF" in choice.note
