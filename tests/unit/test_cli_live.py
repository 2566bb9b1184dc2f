"""`renderwatch watch` on the event stream, its reconnects and fallbacks, and the job
commands (list, status, cancel, --json, --version), through `httpx.MockTransport`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from renderwatch import cli
from renderwatch.client import sse_data
from tests.unit.test_cli import ENV, KEY, job_body

RUNNING = dict(status="running", stage="rendering")


def sse(*bodies: dict[str, Any]) -> bytes:
    return b"".join(
        b": ping\r\n\r\nid: %d\r\ndata: %s\r\n\r\n" % (b["version"], json.dumps(b).encode())
        for b in bodies
    )


def versions(count: int, *, final: str = "succeeded") -> list[dict[str, Any]]:
    out = [job_body(version=1)]
    for v in range(2, count):
        out.append(job_body(version=v, scenes=1, pct=36.67, **RUNNING, progress_eta=True))
    done = "done" if final == "succeeded" else "rendering"
    out.append(job_body(version=count, status=final, stage=done, scenes=3, pct=100.0))
    for body in out:
        if body.pop("progress_eta", None):
            body["progress"]["eta_seconds"] = 12.0
    return out


class StreamApi:
    """Answers the stream with scripted chunks, one script per connection."""

    def __init__(self, scripts, *, polls=None, poll_headers=None):
        self.scripts = list(scripts)
        self.polls = list(polls or [])
        self.poll_headers = poll_headers or {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"detail": "missing or invalid API key"})
        path = request.url.path
        if path == "/api/v2/jobs/7/events":
            script = self.scripts.pop(0) if self.scripts else 503
            if isinstance(script, int):
                if script == -1:
                    raise httpx.ConnectError("refused", request=request)
                return httpx.Response(script, json={"detail": "no"}, headers={"Retry-After": "5"})
            return httpx.Response(
                200, content=script, headers={"content-type": "text/event-stream"}
            )
        if path == "/api/v2/jobs/7":
            body = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
            return httpx.Response(200, json=body, headers=self.poll_headers)
        if path == "/api/v2/jobs/7/cancel":
            return httpx.Response(
                202, json={"job_id": 7, "status": "running", "cancel_requested": True}
            )
        if path == "/api/v2/jobs/8/cancel":
            return httpx.Response(409, json={"detail": "job 8 is already succeeded"})
        if path == "/api/v2/jobs":
            return httpx.Response(
                200, json={"items": versions(3)[1:2], "limit": 20, "offset": 0, "next_offset": None}
            )
        return httpx.Response(404, json={"detail": "job not found"})


def run(argv, api, sleeps=None):
    transport = httpx.MockTransport(api)
    sleep = sleeps.append if sleeps is not None else (lambda _s: None)
    return cli.main(argv, environ=ENV, transport=transport, sleep=sleep)


def test_watch_follows_the_stream_and_shows_the_eta(capsys):
    api = StreamApi([sse(*versions(4))])
    assert run(["watch", "7"], api) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[1].endswith("ETA 12 s")
    assert lines[-1] == "job 7 succeeded: 3 scenes, 100%"
    assert [r.url.path for r in api.requests] == ["/api/v2/jobs/7/events"]  # no polling


def test_watch_reconnects_with_last_event_id_after_a_broken_stream(capsys):
    all_versions = versions(5)
    api = StreamApi([sse(*all_versions[:2]), -1, sse(*all_versions[2:])])
    sleeps: list[float] = []
    assert run(["watch", "7"], api, sleeps) == 0
    streams = [r for r in api.requests if r.url.path.endswith("/events")]
    assert "last-event-id" not in streams[0].headers
    assert streams[1].headers["last-event-id"] == "2"
    assert streams[2].headers["last-event-id"] == "2"
    assert sleeps == list(cli.RECONNECT_DELAYS[:2])  # backoff, growing
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6  # each version once


def test_watch_gives_up_after_the_reconnect_budget_with_a_transport_exit_code(capsys):
    api = StreamApi([sse(*versions(4)[:1])] + [-1] * 20)
    sleeps: list[float] = []
    assert run(["watch", "7"], api, sleeps) == cli.EXIT_TRANSPORT
    assert sleeps == list(cli.RECONNECT_DELAYS)
    assert "event stream" in capsys.readouterr().err


def test_a_refused_stream_falls_back_to_polling_at_the_servers_pace(capsys):
    polls = versions(3)
    api = StreamApi([503], polls=polls, poll_headers={"X-Poll-Interval": "3"})
    sleeps: list[float] = []
    assert run(["watch", "7", "--interval", "1"], api, sleeps) == 0
    assert sleeps and set(sleeps) == {3.0}
    assert capsys.readouterr().out.splitlines()[-1] == "job 7 succeeded: 3 scenes, 100%"


def test_a_failed_job_and_a_transport_error_exit_differently():
    failed = StreamApi([sse(*versions(3, final="failed"))])
    assert run(["watch", "7"], failed) == cli.EXIT_JOB_FAILED == 1

    def down(request):
        raise httpx.ConnectError("refused", request=request)

    assert run(["status", "7"], down) == cli.EXIT_TRANSPORT == 3
    assert len({cli.EXIT_JOB_FAILED, cli.EXIT_TRANSPORT, cli.EXIT_REFUSED, cli.EXIT_USAGE}) == 4


def test_watch_json_prints_one_job_object_per_line(capsys):
    assert run(["watch", "7", "--json"], StreamApi([sse(*versions(4))])) == 0
    lines = capsys.readouterr().out.splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["version"] for o in objects] == [1, 2, 3, 4]


def test_status_list_and_cancel(capsys):
    api = StreamApi([], polls=versions(3)[1:2])
    assert run(["status", "7"], api) == 0
    assert "ETA 12 s" in capsys.readouterr().out
    assert run(["status", "7", "--json"], api) == 0
    assert json.loads(capsys.readouterr().out)["job_id"] == 7
    assert run(["status", "99"], api) == cli.EXIT_REFUSED
    assert "job 99 not found" in capsys.readouterr().err
    assert run(["list"], api) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["JOB", "STATUS", "STAGE"] and table[1].startswith("7 ")
    assert run(["list", "--json"], api) == 0
    assert json.loads(capsys.readouterr().out)["items"][0]["job_id"] == 7
    assert run(["cancel", "7"], api) == 0
    assert "cancel requested" in capsys.readouterr().out
    assert run(["cancel", "8"], api) == cli.EXIT_REFUSED
    assert "already succeeded" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("renderwatch ")


def test_the_sse_parser_skips_comments_and_joins_data_lines():
    lines = iter([": ping", "", "id: 3", 'data: {"a":', "data: 1}", "", "retry: 5", ""])
    assert list(sse_data(lines)) == ['{"a":\n1}']
