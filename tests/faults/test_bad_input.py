"""Scenario 10: every malformed request is a 4xx naming what is wrong, and writes nothing.

One real API process (`python -m api`) for the module, on the session's PostgreSQL
database and the real Redis under a private key namespace. Each case sends one bad
request (ids, query bounds, bodies, content types, oversized payloads, Authorization
header shapes, raw HTTP the client library would never send) and checks the status,
the message, and that no row was written. Then schemathesis fuzzes every operation
of the OpenAPI schema, valid and invalid inputs, with a valid key: no 5xx allowed.
"""

from __future__ import annotations

import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from sqlalchemy import Engine, func, select

from shared.apikeys import create_api_key
from shared.db import build_engine, build_session_factory
from shared.models import ApiKey, Job
from shared.settings import Settings
from tests import procs

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis]

MAX_BODY = 64 * 1024
INVALID_KEY = "missing or invalid API key"
FUZZ_EXAMPLES = 25


@dataclass
class Api:
    """The running API, a valid key and a way to count what the database holds."""

    base_url: str
    key: str
    client_id: str
    engine: Engine
    process: Any

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def rows(self) -> tuple[int, int, int]:
        """(jobs, api keys, jobs flagged for cancellation)."""
        with build_session_factory(self.engine)() as session:
            return (
                session.scalar(select(func.count()).select_from(Job)) or 0,
                session.scalar(select(func.count()).select_from(ApiKey)) or 0,
                session.scalar(select(func.count()).where(Job.cancel_requested)) or 0,
            )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10, trust_env=False)


@pytest.fixture(scope="module")
def api(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        _env_file=None,
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        # In the API process's memory: the fuzzer's valid jobs are enqueued nowhere real.
        celery_broker_url="memory://",
        log_level="INFO",
    )
    engine = build_engine(pg_url, pool_size=2)
    client_id = f"bad-input-{uuid.uuid4().hex[:8]}@example.com"
    with build_session_factory(engine)() as session:
        key = create_api_key(client_id, session=session)
    log_dir = tmp_path_factory.mktemp("bad-input")
    try:
        with procs.api_server(procs.settings_env(settings), log_dir) as proc:
            yield Api(proc.base_url, key, client_id, engine, proc)
    finally:
        engine.dispose()
        client = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()


@pytest.fixture
def job_id(api: Api) -> int:
    """An existing job of the caller, so that a bad request on it has something to spoil."""
    with api.http() as http:
        created = http.post(
            "/api/v2/jobs", json={"prompt": "a quiet lake", "scenes_total": 2}, headers=api.auth
        )
    assert created.status_code == 202, created.text
    job: int = created.json()["job_id"]
    return job


def field_errors(response: httpx.Response) -> list[tuple[str, ...]]:
    """The `loc` of every entry of a 422, as tuples of strings."""
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, response.text
    for entry in detail:
        assert entry["msg"], f"an error without a message: {entry}"
    return [tuple(str(part) for part in entry["loc"]) for entry in detail]


def unchanged(api: Api, send: Callable[[], httpx.Response]) -> httpx.Response:
    """Send one request; assert that it wrote nothing."""
    before = api.rows()
    response = send()
    assert api.rows() == before, f"a bad request wrote to the database: {response.text}"
    return response


# -- ids and query parameters ----------------------------------------------------------------

BAD_IDS = [
    "abc",
    "0",
    "-1",
    "1.5",
    "1e3",
    "0x10",
    "%20",
    "%D9%A1",  # an Arabic-Indic digit one: int() would take it, the API must not
    "9223372036854775808",  # one past the largest BIGINT
    "9" * 40,
    "null",
    "[1]",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raw_id", BAD_IDS)
@pytest.mark.parametrize(
    "method, template", [("GET", "/api/v2/jobs/{}"), ("POST", "/api/v2/jobs/{}/cancel")]
)
def test_malformed_job_ids_are_422_naming_the_id(api, raw_id, method, template):
    with api.http() as http:
        response = unchanged(
            api, lambda: http.request(method, template.format(raw_id), headers=api.auth)
        )
    assert response.status_code == 422, response.text
    assert field_errors(response) == [("path", "job_id")]


BAD_QUERIES = [
    ("/api/v2/jobs?limit=0", "limit"),
    ("/api/v2/jobs?limit=101", "limit"),
    ("/api/v2/jobs?limit=ten", "limit"),
    ("/api/v2/jobs?limit=", "limit"),
    ("/api/v2/jobs?limit=2.5", "limit"),
    ("/api/v2/jobs?offset=-1", "offset"),
    ("/api/v2/jobs?offset=100001", "offset"),
    ("/api/v2/jobs?offset=1e2", "offset"),
    ("/api/v2/cache/stats/history?limit=0", "limit"),
    ("/api/v2/cache/stats/history?limit=1001", "limit"),
    ("/api/v2/cache/stats/history?offset=-5", "offset"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path, name", BAD_QUERIES)
def test_out_of_range_or_malformed_query_parameters_are_422_naming_them(api, path, name):
    with api.http() as http:
        response = unchanged(api, lambda: http.get(path, headers=api.auth))
    assert response.status_code == 422, response.text
    assert field_errors(response) == [("query", name)]


# -- bodies ------------------------------------------------------------------------------------

VALID = b'{"prompt": "a red kite", "scenes_total": 3}'

BAD_BODIES: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("empty", b"", ("body",)),
    ("truncated", b'{"prompt": "a red kite", ', ("body",)),
    ("single quotes", b"{'prompt': 'x', 'scenes_total': 1}", ("body",)),
    ("trailing comma", b'{"prompt": "x", "scenes_total": 1,}', ("body",)),
    ("not utf-8", b'{"prompt": "\xff\xfe", "scenes_total": 1}', ("body",)),
    ("NaN", b'{"prompt": "x", "scenes_total": NaN}', ("body", "scenes_total")),
    ("deeply nested", b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", ("body",)),
    ("array", b"[]", ("body",)),
    ("string", b'"a red kite"', ("body",)),
    ("null", b"null", ("body",)),
    ("number", b"42", ("body",)),
    ("missing prompt", b'{"scenes_total": 3}', ("body", "prompt")),
    ("missing scenes_total", b'{"prompt": "x"}', ("body", "scenes_total")),
    ("empty prompt", b'{"prompt": "", "scenes_total": 3}', ("body", "prompt")),
    ("long prompt", b'{"prompt": "' + b"x" * 4_001 + b'", "scenes_total": 3}', ("body", "prompt")),
    ("prompt not a string", b'{"prompt": 123, "scenes_total": 3}', ("body", "prompt")),
    ("prompt null", b'{"prompt": null, "scenes_total": 3}', ("body", "prompt")),
    ("prompt list", b'{"prompt": ["a"], "scenes_total": 3}', ("body", "prompt")),
    ("prompt with NUL", b'{"prompt": "a\\u0000b", "scenes_total": 3}', ("body", "prompt")),
    ("zero scenes", b'{"prompt": "x", "scenes_total": 0}', ("body", "scenes_total")),
    ("negative scenes", b'{"prompt": "x", "scenes_total": -3}', ("body", "scenes_total")),
    ("too many scenes", b'{"prompt": "x", "scenes_total": 1001}', ("body", "scenes_total")),
    (
        "huge scenes",
        b'{"prompt": "x", "scenes_total": 1' + b"0" * 30 + b"}",
        ("body", "scenes_total"),
    ),
    ("scenes as string", b'{"prompt": "x", "scenes_total": "3"}', ("body", "scenes_total")),
    ("fractional scenes", b'{"prompt": "x", "scenes_total": 2.5}', ("body", "scenes_total")),
    ("float scenes", b'{"prompt": "x", "scenes_total": 3.0}', ("body", "scenes_total")),
    ("boolean scenes", b'{"prompt": "x", "scenes_total": true}', ("body", "scenes_total")),
    ("unknown key", b'{"prompt": "x", "scenes_total": 3, "priority": 1}', ("body", "priority")),
    (
        "client_id smuggled",
        b'{"prompt": "x", "scenes_total": 3, "client_id": "root"}',
        ("body", "client_id"),
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "content, location", [(c, loc) for _, c, loc in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES]
)
def test_invalid_bodies_are_422_naming_the_field_and_write_nothing(api, content, location):
    headers = {**api.auth, "Content-Type": "application/json"}
    with api.http() as http:
        response = unchanged(
            api, lambda: http.post("/api/v2/jobs", content=content, headers=headers)
        )
    assert response.status_code == 422, response.text
    assert location in field_errors(response)
    assert len(response.content) < 4_096, "a 422 must not echo the body back"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/json-patch+json",
        "application",
        "*/*",
    ],
)
def test_a_body_that_is_not_declared_json_is_415_naming_the_content_type(api, content_type):
    headers = {**api.auth} | ({"Content-Type": content_type} if content_type else {})
    with api.http() as http:
        response = unchanged(api, lambda: http.post("/api/v2/jobs", content=VALID, headers=headers))
    assert response.status_code == 415, response.text
    assert "Content-Type" in response.json()["detail"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversized_body_is_413_naming_the_limit(api, declared):
    big = b'{"prompt": "' + b"x" * MAX_BODY + b'", "scenes_total": 1}'
    headers = {**api.auth, "Content-Type": "application/json"}

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 8_192):
            yield big[start : start + 8_192]

    with api.http() as http:
        response = unchanged(
            api,
            lambda: http.post(
                "/api/v2/jobs", content=big if declared else chunks(), headers=headers
            ),
        )
    assert response.status_code == 413, response.text
    assert str(MAX_BODY) in response.json()["detail"]


# -- Authorization header shapes ----------------------------------------------------------------


def auth_shapes(key: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("missing", {}),
        ("scheme only", {"Authorization": "Bearer"}),
        ("no scheme", {"Authorization": key}),
        ("basic", {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}),
        ("other scheme", {"Authorization": f"Token {key}"}),
        ("two tokens", {"Authorization": f"Bearer {key} {key}"}),
        ("key with a suffix", {"Authorization": f"Bearer {key}x"}),
        ("key cut short", {"Authorization": f"Bearer {key[:-1]}"}),
        ("unknown key", {"Authorization": "Bearer rw_" + "A" * 43}),
        ("very long key", {"Authorization": "Bearer " + "k" * 60_000}),
        ("latin-1 bytes", {"Authorization": b"Bearer \xff\xfe\xfd"}),
        ("key in another header", {"X-Api-Key": key}),
        ("key in the query", {}),  # sent as ?api_key=... below
    ]


AUTH_SHAPES = [name for name, _ in auth_shapes("k")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", AUTH_SHAPES)
@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/api/v2/jobs/{job}", None),
        ("GET", "/api/v2/jobs", None),
        ("POST", "/api/v2/jobs", VALID),
        ("POST", "/api/v2/jobs/{job}/cancel", None),
        ("GET", "/api/v2/cache/stats", None),
    ],
)
def test_a_bad_authorization_header_is_401_and_writes_nothing(
    api, job_id, shape, method, path, body
):
    headers = dict(auth_shapes(api.key))[shape]
    params = {"api_key": api.key} if shape == "key in the query" else None
    if body is not None:
        headers = {**headers, "Content-Type": "application/json"}
    with api.http() as http:
        response = unchanged(
            api,
            lambda: http.request(
                method, path.format(job=job_id), headers=headers, params=params, content=body
            ),
        )
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": INVALID_KEY}
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.timeout(60)
def test_authentication_is_checked_before_the_body(api):
    with api.http() as http:
        response = unchanged(
            api,
            lambda: http.post(
                "/api/v2/jobs",
                content=b"{not json" + b"x" * (2 * MAX_BODY),
                headers={"Authorization": "Bearer nope", "Content-Type": "text/plain"},
            ),
        )
    # 413 is also acceptable: the size limit needs no key to refuse a body it never reads.
    assert response.status_code in (401, 413), response.text


# -- raw HTTP that a client library would never send ---------------------------------------------


def raw_request(base_url: str, data: bytes, *, half_close: bool = False) -> bytes:
    """Send bytes on a fresh connection; return what the server answered (maybe nothing)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65_536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def head(key: str, extra: str, body: bytes = b"") -> bytes:
    return (
        f"POST /api/v2/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


RAW_CASES: dict[str, Callable[[str], bytes]] = {
    "content-length not a number": lambda k: head(k, "Content-Length: abc\r\n", VALID),
    "negative content-length": lambda k: head(k, "Content-Length: -5\r\n", VALID),
    "content-length and chunked": lambda k: head(
        k, "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"
    ),
    "bad chunk size": lambda k: head(k, "Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
    "garbage request line": lambda k: b"HELLO WORLD\r\n\r\n",
    "header without a colon": lambda k: b"GET /api/v2/jobs HTTP/1.1\r\nHost api\r\n\r\n",
    "unknown HTTP version": lambda k: b"GET /api/v2/jobs HTTP/9.9\r\nHost: api\r\n\r\n",
    # h11 (httpx) refuses to send these; a hand-rolled client might.
    "Authorization with trailing space": lambda k: (
        b"GET /api/v2/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer \r\n"
        b"Connection: close\r\n\r\n"
    ),
    "Authorization with a tab": lambda k: (
        f"GET /api/v2/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer\t{k}x\r\n"
        "Connection: close\r\n\r\n".encode()
    ),
    "NUL in a header": lambda k: (
        b"GET /api/v2/jobs HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer a\x00b\r\n\r\n"
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(RAW_CASES))
def test_malformed_http_is_answered_400_by_the_server(api, case):
    before = api.rows()
    answer = raw_request(api.base_url, RAW_CASES[case](api.key))
    assert api.rows() == before
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), answer[:300]


@pytest.mark.timeout(60)
def test_a_body_cut_short_by_a_disconnect_is_no_server_error(api):
    """Content-Length promises 1000 bytes, 20 arrive, then the client hangs up."""
    before = api.rows()
    start = len(api.process.log())
    answer = raw_request(
        api.base_url, head(api.key, "Content-Length: 1000\r\n", VALID[:20]), half_close=True
    )
    procs.wait_until(
        lambda: 'route="/api/v2/jobs",status="400"' in metrics(api),
        timeout=10,
        what="the cut-short request to be counted",
    )
    assert api.rows() == before
    assert not answer or answer.startswith(b"HTTP/1.1 4"), answer[:300]
    assert "Traceback" not in api.process.log()[start:]


def metrics(api: Api) -> str:
    with api.http() as http:
        return http.get("/metrics").text


# -- fuzzing from the OpenAPI schema -----------------------------------------------------------


@pytest.mark.timeout(180)
def test_fuzzing_every_operation_from_the_openapi_schema_finds_no_server_error(
    api, job_id, record_figures
):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Err

    schema = schemathesis.openapi.from_url(f"{api.base_url}/openapi.json")
    statuses: Counter[int] = Counter()
    start = len(api.process.log())
    operations = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the API's own schema does not load: that is a failure too
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.filter_too_much,
                    HealthCheck.data_too_large,
                ],
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                # The event stream answers a found job with a body that lasts until the
                # job ends: take its status without reading the body.
                streaming = {"stream": True} if case.operation.path.endswith("/events") else {}
                response = case.call(headers=api.auth, timeout=10, **streaming)
                statuses[response.status_code] += 1
                if streaming and response.status_code == 200:
                    return
                case.validate_response(response, checks=[not_a_server_error])

            try:
                call()
            except Unsatisfiable:
                # No parameter, body or key to make invalid (e.g. /healthz): nothing to do.
                assert mode is GenerationMode.NEGATIVE

    log = api.process.log()[start:]
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    record_figures(
        scenario=10,
        fault="schemathesis fuzzing (positive and negative) of every operation",
        operations=operations,
        requests=sum(statuses.values()),
        statuses=dict(sorted(statuses.items())),
        server_errors=server_errors,
    )
    assert server_errors == 0
    assert sum(statuses.values()) >= operations * FUZZ_EXAMPLES
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(60)
def test_no_malformed_request_was_counted_or_logged_as_a_server_error(api, record_figures):
    """Last in the module: the metrics of every request sent above hold no 5xx."""
    text = metrics(api)
    counted = Counter[str]()
    for line in text.splitlines():
        if line.startswith("renderwatch_http_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counted[status[0] + "xx"] += int(float(line.rsplit(" ", 1)[1]))
    log = api.process.log()
    record_figures(
        scenario=10,
        fault="malformed requests of every kind (whole module)",
        requests=sum(counted.values()),
        by_class=dict(sorted(counted.items())),
        tracebacks_logged=log.count("Traceback"),
    )
    assert counted["5xx"] == 0, text
    assert counted["4xx"] > 300
    assert "Traceback" not in log
