"""The `renderwatch` CLI, its HTTP client and the demo's pure parts.

HTTP goes through `httpx.MockTransport` (the client's `transport=` seam); database
commands run against a migrated SQLite file. Nothing here starts a stack.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from renderwatch import cli, demo
from renderwatch.client import ApiUnreachable, ClientError, RenderwatchClient, metric_total
from renderwatch.demo import DemoConfig, DemoError, RedisChoice, RunResult, Tally

KEY = "rw_test-key-that-must-never-be-printed"
BASE = "http://api.test"
X = demo.TIMES  # the multiplication sign of the table
ENV = {cli.API_URL_ENV: BASE, cli.API_KEY_ENV: KEY}

STAGES = [
    ("queued", "queued", 0, 0.0),
    ("running", "scripting", 0, 5.0),
    ("running", "rendering", 1, 43.33),
    ("running", "rendering", 3, 90.0),
    ("succeeded", "done", 3, 100.0),
]


def job_body(job_id=7, version=1, status="queued", stage="queued", scenes=0, pct=0.0, **extra):
    body = {
        "job_id": job_id,
        "client_id": "alice@example.com",
        "status": status,
        "progress": {
            "current_stage": stage,
            "scenes_completed": scenes,
            "scenes_total": 3,
            "percent": pct,
        },
        "version": version,
        "error": None,
        "result_url": None,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:01Z",
    }
    body.update(extra)
    return body


class FakeApi:
    """A scripted API: each GET of the job advances one version; ETag / 304 like the real one."""

    def __init__(self, versions=None, *, polls_per_version=2):
        self.versions = versions or [
            job_body(version=i + 1, status=s, stage=g, scenes=n, pct=p)
            for i, (s, g, n, p) in enumerate(STAGES)
        ]
        self.polls_per_version = polls_per_version
        self.requests: list[httpx.Request] = []
        self.gets = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"detail": "invalid or missing API key"})
        path = request.url.path
        if request.method == "POST" and path == "/api/v2/jobs":
            return httpx.Response(
                202,
                json={"job_id": 7, "status": "queued", "status_url": "/api/v2/jobs/7"},
                headers={"Location": "/api/v2/jobs/7"},
            )
        if request.method == "GET" and path == "/api/v2/jobs/7":
            index = min(self.gets // self.polls_per_version, len(self.versions) - 1)
            self.gets += 1
            body = self.versions[index]
            etag = f'"{body["version"]}"'
            if request.headers.get("if-none-match") == etag:
                return httpx.Response(304, headers={"ETag": etag})
            return httpx.Response(200, json=body, headers={"ETag": etag})
        if request.method == "GET" and path.startswith("/api/v2/jobs/"):
            return httpx.Response(404, json={"detail": "job not found"})
        if request.method == "GET" and path == "/api/v2/cache/stats":
            return httpx.Response(200, json=STATS)
        return httpx.Response(404, json={"detail": "Not Found"})


STATS = {
    "cache_enabled": True,
    "statistics": {
        "hits": 1250,
        "misses": 150,
        "errors": 2,
        "invalidations": 45,
        "hit_rate": 89.29,
        "total_requests": 1400,
        "redis_enabled": True,
        "redis_available": True,
        "ttl_seconds": 30,
    },
    "message": "Cache is working normally",
}


def run(argv, api=None, env=ENV):
    transport = httpx.MockTransport(api or FakeApi())
    return cli.main(argv, environ=env, transport=transport, sleep=lambda _s: None)


# -- argument parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["migrate", "--help"],
        ["new-incarnation", "--help"],
        ["create-key", "--help"],
        ["revoke-key", "--help"],
        ["submit", "--help"],
        ["watch", "--help"],
        ["stats", "--help"],
        ["healthcheck", "--help"],
    ],
)
def test_help_exits_zero_and_describes_the_command(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: renderwatch")
    if argv[0] != "--help":
        assert argv[0] in out.splitlines()[0]


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = ("migrate", "new-incarnation", "create-key", "revoke-key", "submit", "watch")
    for name in (*commands, "stats", "up"):
        assert name in out
    assert "healthcheck" in out and "demo" in out


def test_demo_help_comes_from_the_demo_itself(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: renderwatch demo")
    assert "--no-flower" in out


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["create-key"], "CLIENT_ID"),
        (["submit", "--scenes", "3"], "--prompt"),
        (["submit", "--prompt", "x", "--scenes", "0"], "between 1 and"),
        (["submit", "--prompt", "x", "--scenes", "many"], "not an integer"),
        (["watch", "abc"], "not an integer"),
        (["watch", "0"], "positive"),
        (["watch", "7", "--interval", "-1"], "between 0 and 3600"),
    ],
)
def test_usage_errors_exit_2_on_stderr(argv, complaint, capsys):
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert complaint in captured.err


def test_missing_key_is_a_usage_error_that_says_how_to_get_one(capsys):
    api = FakeApi()
    assert run(["stats"], api, env={cli.API_URL_ENV: BASE}) == 2
    err = capsys.readouterr().err
    assert "RENDERWATCH_API_KEY" in err and "create-key" in err
    assert api.requests == []


def test_api_url_and_key_flags_win_over_the_environment(capsys):
    seen = []

    def handler(request):
        seen.append((str(request.url), request.headers.get("authorization")))
        return FakeApi()(request)

    env = {cli.API_URL_ENV: "http://elsewhere.test", cli.API_KEY_ENV: "rw_other"}
    assert run(["stats", "--api-url", BASE, "--key", KEY], handler, env=env) == 0
    assert seen == [(f"{BASE}/api/v2/cache/stats", f"Bearer {KEY}")]


def test_default_api_url_uses_api_port(monkeypatch, capsys):
    monkeypatch.setenv("API_PORT", "8123")
    seen = []

    def handler(request):
        seen.append(str(request.url))
        return FakeApi()(request)

    assert run(["stats"], handler, env={cli.API_KEY_ENV: KEY}) == 0
    assert seen == ["http://127.0.0.1:8123/api/v2/cache/stats"]


def test_a_non_http_api_url_is_refused(capsys):
    assert run(["stats", "--api-url", "ftp://x"]) == 2
    assert "http://" in capsys.readouterr().err


# -- submit / watch ------------------------------------------------------------------------


def test_submit_posts_the_job_and_prints_id_and_absolute_status_url(capsys):
    api = FakeApi()
    assert run(["submit", "--prompt", "a cat", "--scenes", "3"], api) == 0
    (request,) = api.requests
    assert request.method == "POST"
    assert json.loads(request.content) == {"prompt": "a cat", "scenes_total": 3}
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "Submitted job 7 (queued).",
        f"Status URL: {BASE}/api/v2/jobs/7",
    ]
    assert KEY not in out


def test_submit_reports_validation_errors_from_the_api(capsys):
    def handler(request):
        return httpx.Response(
            422,
            json={"detail": [{"loc": ["body", "scenes_total"], "msg": "too many"}]},
        )

    assert run(["submit", "--prompt", "x", "--scenes", "3"], handler) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "422" in err and "scenes_total: too many" in err


def test_watch_prints_plain_progress_lines_then_the_final_status(capsys):
    api = FakeApi()
    assert run(["watch", "7", "--interval", "0"], api) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "job 7: queued    stage=queued     scenes 0/3    0.0%",
        "job 7: running   stage=scripting  scenes 0/3    5.0%",
        "job 7: running   stage=rendering  scenes 1/3   43.3%",
        "job 7: running   stage=rendering  scenes 3/3   90.0%",
        "job 7: succeeded stage=done       scenes 3/3  100.0%",
        "job 7 succeeded: 3 scenes, 100%",
    ]


def test_watch_polls_with_if_none_match_and_prints_nothing_on_304(capsys):
    api = FakeApi(polls_per_version=3)
    assert run(["watch", "7", "--interval", "0"], api) == 0
    # (the first request asked for the stream, which this fake API does not have)
    assert api.requests[0].url.path == "/api/v2/jobs/7/events"
    gets = [r for r in api.requests[1:] if r.method == "GET"]
    assert "if-none-match" not in gets[0].headers
    assert gets[1].headers["if-none-match"] == '"1"'
    # One line per version, however many polls it took.
    assert len(capsys.readouterr().out.splitlines()) == len(STAGES) + 1
    assert len(gets) > len(STAGES)


def test_watch_sleeps_the_interval_between_polls(capsys):
    sleeps: list[float] = []
    transport = httpx.MockTransport(FakeApi(polls_per_version=1))
    code = cli.main(
        ["watch", "7", "--interval", "2.5"], environ=ENV, transport=transport, sleep=sleeps.append
    )
    assert code == 0
    assert sleeps == [2.5] * (len(STAGES) - 1)


@pytest.mark.parametrize(
    ("status", "extra", "final"),
    [
        (
            "failed",
            {"error": "renderer crashed"},
            "job 7 failed at rendering, 1/3 scenes: renderer crashed",
        ),
        ("cancelled", {}, "job 7 cancelled at rendering, 1/3 scenes"),
    ],
)
def test_watch_exits_1_when_the_job_did_not_succeed(status, extra, final, capsys):
    versions = [
        job_body(version=1),
        job_body(version=2, status=status, stage="rendering", scenes=1, pct=36.67, **extra),
    ]
    assert run(["watch", "7", "--interval", "0"], FakeApi(versions)) == 1
    assert capsys.readouterr().out.splitlines()[-1] == final


def test_watch_of_an_unknown_job_fails_clearly(capsys):
    assert run(["watch", "99", "--interval", "0"]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "job 99 not found" in err


def test_a_refused_key_fails_without_printing_it(capsys):
    env = {cli.API_URL_ENV: BASE, cli.API_KEY_ENV: "rw_wrong-key"}
    assert run(["watch", "7"], env=env) == cli.EXIT_REFUSED
    captured = capsys.readouterr()
    assert "refused the key" in captured.err
    assert "rw_wrong-key" not in captured.err + captured.out


def test_submit_with_watch_follows_the_new_job(capsys):
    assert run(["submit", "--prompt", "a cat", "--scenes", "3", "--watch", "--interval", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Submitted job 7 (queued)."
    assert lines[-1] == "job 7 succeeded: 3 scenes, 100%"


def test_an_unreachable_api_is_a_clear_failure(capsys):
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    assert run(["stats"], handler) == cli.EXIT_TRANSPORT
    err = capsys.readouterr().err
    assert f"cannot reach the API at {BASE}" in err
    assert KEY not in err


def test_a_job_object_with_extra_keys_is_still_understood():
    def handler(request):
        return httpx.Response(200, json=job_body(links={"self": "/x"}), headers={"ETag": '"1"'})

    with RenderwatchClient(BASE, KEY, transport=httpx.MockTransport(handler)) as client:
        poll = client.get_job(7)
    assert poll.view is not None and poll.view.job_id == 7 and poll.etag == '"1"'


def test_client_repr_and_errors_never_hold_the_key():
    def handler(request):
        raise httpx.ReadTimeout("slow", request=request)

    client = RenderwatchClient(BASE, KEY, transport=httpx.MockTransport(handler))
    with pytest.raises(ApiUnreachable) as info:
        client.get_job(1)
    assert KEY not in str(info.value) and KEY not in repr(client)


# -- stats ---------------------------------------------------------------------------------


def test_stats_prints_a_table_and_the_message(capsys):
    assert run(["stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "cache enabled       yes",
        "hits               1250",
        "misses              150",
        "errors                2",
        "invalidations        45",
        "hit rate         89.29%",
        "total requests     1400",
        "redis enabled       yes",
        "redis available     yes",
        "ttl seconds        30 s",
        "",
        "Cache is working normally",
    ]


def test_stats_json_prints_the_object_unchanged(capsys):
    assert run(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == STATS


def test_stats_table_tolerates_new_keys_and_missing_statistics():
    table = cli.stats_table({"cache_enabled": False, "statistics": {"new_counter": 3}})
    assert table.splitlines() == ["cache enabled  no", "new counter     3"]
    assert cli.stats_table({"cache_enabled": False}) == "cache enabled  no"


# -- database commands -------------------------------------------------------------------


@pytest.fixture
def db_env(monkeypatch, sqlite_url):
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    return sqlite_url


def lookup(url, key):
    from shared.apikeys import lookup_client
    from shared.db import build_engine, build_session_factory

    engine = build_engine(url)
    try:
        with build_session_factory(engine)() as session:
            return lookup_client(key, session=session)
    finally:
        engine.dispose()


def test_create_key_prints_the_key_last_and_it_authenticates(db_env, capsys):
    assert cli.main(["create-key", "alice@example.com"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[-1]
    assert key.startswith("rw_") and " " not in key
    assert len(lines) > 1 and all(key not in line for line in lines[:-1])
    assert lookup(db_env, key) == "alice@example.com"


def test_create_key_refuses_a_blank_client_id(db_env, capsys):
    assert cli.main(["create-key", "   "]) == 2
    assert "client_id" in capsys.readouterr().err


def test_create_key_on_an_unmigrated_database_says_to_migrate(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    assert cli.main(["create-key", "alice"]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "renderwatch migrate" in err and "api_keys" in err


def test_revoke_key_stops_it_and_never_echoes_it(db_env, capsys):
    assert cli.main(["create-key", "bob"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert cli.main(["revoke-key", key]) == 0
    captured = capsys.readouterr()
    assert "Revoked" in captured.out and key not in captured.out + captured.err
    assert lookup(db_env, key) is None
    assert cli.main(["revoke-key", key]) == cli.EXIT_REFUSED
    assert "no active key" in capsys.readouterr().err


def test_migrate_creates_the_schema_and_names_the_database(monkeypatch, tmp_path, capsys):
    path = tmp_path / "fresh" / "rw.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    assert cli.main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "newest schema" in out
    assert cli.main(["create-key", "carol"]) == 0


def test_new_incarnation_replaces_the_databases_incarnation(db_env, capsys):
    from shared.db import build_engine
    from shared.meta import database_incarnation

    engine = build_engine(db_env)
    try:
        before = database_incarnation(engine)
        assert cli.main(["new-incarnation"]) == 0
        after = database_incarnation(engine)
    finally:
        engine.dispose()
    out = capsys.readouterr().out
    assert after != before and after in out
    assert "Restart every api and worker process" in out


def test_new_incarnation_on_an_unmigrated_database_says_to_migrate(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    assert cli.main(["new-incarnation"]) == cli.EXIT_REFUSED
    assert "renderwatch migrate" in capsys.readouterr().err


def test_new_incarnation_failure_never_shows_the_password(monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://rw:s3cr3t-pw@127.0.0.1:1/nope")
    assert cli.main(["new-incarnation"]) == cli.EXIT_REFUSED
    captured = capsys.readouterr()
    assert "database error" in captured.err
    assert "s3cr3t-pw" not in captured.out + captured.err


def test_migrate_failure_never_shows_the_password(monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://rw:s3cr3t-pw@127.0.0.1:1/nope")
    assert cli.main(["migrate"]) == cli.EXIT_REFUSED
    captured = capsys.readouterr()
    assert "migration failed" in captured.err
    assert "s3cr3t-pw" not in captured.out + captured.err
    assert "rw:***@127.0.0.1:1" in captured.out


# -- the client's metrics parsing ----------------------------------------------------------


def test_metric_total_sums_every_label_set_and_ignores_lookalikes():
    text = "\n".join(
        [
            "# HELP renderwatch_db_queries_total SQL statements",
            "# TYPE renderwatch_db_queries_total counter",
            "renderwatch_db_queries_total 12.0",
            'renderwatch_db_queries_total{pid="2"} 3.0',
            "renderwatch_db_queries_created 1.7e9",
            "renderwatch_db_queries_total_other 99",
        ]
    )
    assert metric_total(text) == 15.0
    assert metric_total("renderwatch_http_requests_total 4") is None


# -- the demo's pure parts -----------------------------------------------------------------


def test_format_table_side_by_side_with_ratios():
    off = RunResult(
        False, requests=246, db_queries=492, cache_hits=0, cache_misses=240, avg_ms=8.44
    )
    on = RunResult(True, requests=250, db_queries=12, cache_hits=238, cache_misses=6, avg_ms=2.1)
    assert demo.format_table(off, on).splitlines() == [
        "                     cache off   cache on",
        "Total requests            246        250",
        f"Database queries          492         12   (41.0{X} fewer)",
        "Cache hits                  0        238   (hit rate 97.5%)",
        f"Avg response time      8.4 ms     2.1 ms   (4.0{X} faster)",
    ]


def test_format_table_without_a_cache_run_or_a_query_counter():
    off = RunResult(False, requests=10, db_queries=None, cache_hits=0, cache_misses=10, avg_ms=3.0)
    lines = demo.format_table(off, None).splitlines()
    assert lines[2] == "Database queries          n/a        n/a"
    assert lines[3] == "Cache hits                  0        n/a"
    assert lines[4] == "Avg response time      3.0 ms        n/a"


def test_format_table_when_the_cache_run_needed_no_query():
    off = RunResult(False, requests=5, db_queries=9, cache_hits=0, cache_misses=5, avg_ms=1.0)
    on = RunResult(True, requests=5, db_queries=0, cache_hits=5, cache_misses=0, avg_ms=2.0)
    lines = demo.format_table(off, on).splitlines()
    assert lines[2].endswith("(none with the cache)")
    assert lines[4].endswith(f"(2.0{X} slower)")


def test_poll_interval_gives_about_forty_polls_per_job_life():
    config = DemoConfig(jobs=6, scene_seconds=0.3, polls_per_job=40)
    mean_scenes = sum(config.scenes(i) for i in range(6)) / 6
    life = 0.3 * (mean_scenes + demo.NON_SCENE_STAGES_IN_SCENES)
    assert 38 <= life / config.poll_interval <= 42
    assert config.compression == pytest.approx(demo.SIMULATED_POLL_SECONDS / config.poll_interval)


def _no_start(binary, workdir):
    raise AssertionError("must not start a redis-server")


def test_choose_redis_uses_a_configured_redis_that_answers(tmp_path):
    choice = demo.choose_redis(
        "redis://:pw@127.0.0.1:6379/0",
        binary="/usr/bin/redis-server",
        workdir=tmp_path,
        answers=lambda url: True,
        start=_no_start,
    )
    assert (choice.url, choice.origin, choice.process) == (
        "redis://:pw@127.0.0.1:6379/0",
        "configured",
        None,
    )
    assert "pw" not in choice.note


def test_choose_redis_starts_a_private_server_when_the_url_does_not_answer(tmp_path):
    started = []
    proc = subprocess.Popen(["sleep", "30"])

    class Server:  # what localproc.RedisServer offers the demo
        url = "redis://127.0.0.1:40001/0"
        process = proc

        def stop(self):
            proc.kill()
            proc.wait()

    def start(binary, workdir):
        started.append((binary, workdir))
        return Server()

    try:
        choice = demo.choose_redis(
            "redis://127.0.0.1:1/0",
            binary="/opt/redis-server",
            workdir=tmp_path,
            answers=lambda url: False,
            start=start,
        )
        assert started == [("/opt/redis-server", tmp_path)]
        assert (choice.url, choice.origin, choice.process) == (
            "redis://127.0.0.1:40001/0",
            "private",
            proc,
        )
        assert "private redis-server" in choice.note and "nothing answers" in choice.note
        choice.stop()
        assert proc.poll() is not None
        choice.stop()  # idempotent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_choose_redis_without_binary_runs_with_caching_off(tmp_path):
    choice = demo.choose_redis(
        "redis://127.0.0.1:1/0", binary=None, workdir=tmp_path, answers=lambda url: False
    )
    assert (choice.url, choice.origin) == ("", "none")
    assert "caching stays OFF" in choice.note


def test_choose_redis_when_the_private_server_fails_runs_with_caching_off(tmp_path):
    def start(binary, workdir):
        raise DemoError("did not answer")

    choice = demo.choose_redis(
        "", binary="/opt/redis-server", workdir=tmp_path, answers=lambda url: False, start=start
    )
    assert choice.url == "" and "did not answer" in choice.note
    assert "REDIS_URL is empty" in choice.note


def test_redis_choice_stop_without_a_process_is_a_no_op():
    RedisChoice(url="redis://x", origin="configured", note="").stop()


def test_redis_answers_is_false_for_nothing_and_for_garbage():
    assert demo.redis_answers("") is False
    assert demo.redis_answers("not a url") is False
    assert demo.redis_answers(f"redis://127.0.0.1:{demo.free_port()}/0", timeout=0.2) is False


def test_poll_until_done_counts_each_request_and_reports_the_outcome():
    api = FakeApi(polls_per_version=2)
    client = RenderwatchClient(BASE, KEY, transport=httpx.MockTransport(api))
    tally, outcomes = Tally(), []
    demo.poll_until_done(
        client,
        7,
        interval=0,
        tally=tally,
        stop=threading.Event(),
        finished=lambda job_id, outcome: outcomes.append((job_id, outcome)),
    )
    assert outcomes == [(7, "succeeded")]
    assert tally.requests == api.gets == 2 * (len(STAGES) - 1) + 1
    assert tally.errors == 0 and tally.avg_ms >= 0


def test_poll_until_done_gives_up_on_a_job_that_keeps_failing():
    client = RenderwatchClient(BASE, KEY, transport=httpx.MockTransport(FakeApi()))
    tally, outcomes = Tally(), []
    demo.poll_until_done(
        client,
        99,
        interval=0,
        tally=tally,
        stop=threading.Event(),
        finished=lambda job_id, outcome: outcomes.append(outcome),
    )
    assert outcomes == ["abandoned after repeated errors"]
    assert tally.errors == demo.PER_JOB_ERROR_LIMIT
    assert "job 99" in tally.first_error


def test_poll_until_done_stops_when_asked():
    stop = threading.Event()
    stop.set()
    tally = Tally()
    client = RenderwatchClient(BASE, KEY, transport=httpx.MockTransport(FakeApi()))
    demo.poll_until_done(client, 7, interval=0, tally=tally, stop=stop, finished=lambda *a: None)
    assert tally.requests == 0


def test_demo_rejects_nonsense_options(capsys):
    assert demo.main(["--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_stack_env_isolates_the_run_and_keeps_the_broker(make_settings, tmp_path: Path):
    settings = make_settings(redis_url="redis://127.0.0.1:6379/0")
    d = demo.Demo(DemoConfig(), settings, out=lambda line: None)
    d.redis = RedisChoice(url="redis://127.0.0.1:7777/0", origin="private", note="")
    on = d._stack_env("cache-on", "sqlite:///on.db", True, 9001, 9002)
    off = d._stack_env("cache-off", "sqlite:///off.db", False, 9003, 9004)
    assert on["REDIS_URL"] == "redis://127.0.0.1:7777/0" and off["REDIS_URL"] == ""
    assert on["CELERY_BROKER_URL"] == off["CELERY_BROKER_URL"] == "redis://127.0.0.1:7777/0"
    assert on["CACHE_NAMESPACE"].startswith(d.run_id) and on["CELERY_QUEUE"] != off["CELERY_QUEUE"]
    assert (on["API_PORT"], on["FLOWER_PORT"], on["API_WORKERS"]) == ("9001", "9002", "1")


def test_an_explicit_broker_url_is_kept_for_both_runs(make_settings):
    settings = make_settings(celery_broker_url="amqp://guest:guest@127.0.0.1:5672//")
    d = demo.Demo(DemoConfig(), settings, out=lambda line: None)
    d.redis = RedisChoice(url="redis://127.0.0.1:7777/0", origin="private", note="")
    assert d._stack_env("cache-off", "sqlite:///x", False, 1, 2)["CELERY_BROKER_URL"] == (
        "amqp://guest:guest@127.0.0.1:5672//"
    )


def test_metric_total_reads_label_values_holding_braces_and_quotes():
    text = "\n".join(
        [
            "# TYPE renderwatch_http_requests_total counter",
            'renderwatch_http_requests_total{method="GET",route="/api/v2/jobs/{job_id}",'
            'status="200"} 7.0',
            'renderwatch_http_requests_total{method="GET",route="/a\\\\b\\"}",status="404"} 2.0',
            'renderwatch_http_requests_total{method="POST",route="/api/v2/jobs",status="202"} 1.0',
        ]
    )
    assert metric_total(text, "renderwatch_http_requests_total") == 10.0


def test_metric_total_refuses_text_that_is_not_prometheus():
    with pytest.raises(ClientError, match="not Prometheus text"):
        metric_total('renderwatch_db_queries_total{route="unterminated} 1')
