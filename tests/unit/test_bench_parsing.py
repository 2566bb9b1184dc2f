"""The bench's load tools: wrk's JSON (from its Lua `done()` hook) and h11 parsing."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import httpload, wrk


def test_parse_wrk_json_counts_every_kind_of_error() -> None:
    figures = {"requests": 5000, "duration_us": 2_000_000, "p50_us": 850.5, "p99_us": 4200.0}
    errors = {"connect": 1, "read": 2, "write": 3, "status": 4, "timeout": 5}
    text = json.dumps({**figures, **errors})
    result = wrk.parse_wrk_json(text)
    assert result.rps == 2500.0
    assert result.p50_ms == pytest.approx(0.8505)
    assert result.p99_ms == pytest.approx(4.2)
    assert (result.requests, result.errors, result.tool) == (5000, 15, "wrk")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str | None] = []

    def do_GET(self) -> None:
        _Handler.seen.append(self.headers.get("X-Probe"))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/not-modified":
            self.send_response(304)
            self.send_header("ETag", '"7"')
            self.end_headers()
            return
        ok = self.path in ("/ok", "/close")
        body = b"ok" if ok else b"no"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("path", "failing"), [("/ok", False), ("/missing", True)])
def test_wrk_reports_through_its_done_hook(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, failing: bool
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("SKIPPED LOUDLY: wrk is not installed (apt-get install wrk)")
    monkeypatch.delenv("BENCH_LOAD_GENERATOR", raising=False)
    _Handler.seen.clear()
    result = wrk.run_wrk(
        server + path,
        headers={"X-Probe": 'quoted "value" \\ here'},
        duration=1,
        connections=2,
        threads=1,
        workdir=tmp_path,
        name="probe",
    )
    assert result.tool == "wrk" and result.requests > 0
    assert result.rps > 0 and 0 < result.p50_ms <= result.p99_ms
    assert set(_Handler.seen) == {'quoted "value" \\ here'}
    assert (result.errors >= result.requests) if failing else result.errors == 0
    assert json.loads((tmp_path / "probe.wrk.json").read_text())["requests"] == result.requests


def test_httpload_reads_answers_with_h11_and_keeps_the_connection_alive(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")

    async def scenario() -> list[tuple[int, dict[str, str], bytes, bool]]:
        conn = httpload.Connection(host, int(port))
        answers = []
        try:
            for path in ("/ok", "/chunked", "/not-modified", "/missing", "/close", "/ok"):
                request = httpload.build_request(path, {"X-Probe": "p"})
                status, headers, body = await conn.request(request)
                answers.append((status, headers, body, conn.writer is not None))
        finally:
            conn.close()
        return answers

    answers = asyncio.run(scenario())
    assert [(a[0], a[2]) for a in answers] == [
        (200, b"ok"),
        (200, b"hello chunked world"),
        (304, b""),
        (404, b"no"),
        (200, b"ok"),
        (200, b"ok"),
    ]
    assert answers[2][1]["etag"] == '"7"'
    # Kept alive after each answer except the one that said `Connection: close`.
    assert [a[3] for a in answers] == [True, True, True, True, False, True]


def test_httpload_turns_a_malformed_answer_into_an_http_error() -> None:
    async def scenario() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1024)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conn = httpload.Connection("127.0.0.1", port)
        try:
            with pytest.raises(httpload.HttpError):
                await conn.request(httpload.build_request("/", {}))
        finally:
            conn.close()
            srv.close()
            await srv.wait_closed()

    asyncio.run(scenario())
