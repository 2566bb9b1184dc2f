"""A small typed HTTP client for the renderwatch API (httpx), used by the CLI and the demo.

Errors::

    ClientError                 anything this client raises
    ├── ApiUnreachable          no answer (connection refused, timeout, ...)
    └── ApiError                an answer with an unexpected status (`status_code`, `detail`)
        ├── Unauthorized        401: missing, wrong or revoked key
        └── NotFound            404: no such job, or another client's

The API key travels only in the `Authorization` header; it never appears in an error
message or a `repr`. `transport=` is the seam for tests (`httpx.MockTransport`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from shared.schemas import JobView

DEFAULT_TIMEOUT = 10.0
# The stream sends a keep-alive comment every 15 s: silence for longer means it is dead.
STREAM_READ_TIMEOUT = 45.0
DB_QUERIES_METRIC = "renderwatch_db_queries_total"


class ClientError(Exception):
    """Base of every error this client raises."""


class ApiUnreachable(ClientError):
    """The API did not answer."""


class ApiError(ClientError):
    """The API answered with an unexpected status."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class Unauthorized(ApiError):
    """401: the key is missing, wrong or revoked."""


class NotFound(ApiError):
    """404: no such job, or not the caller's."""


class StreamBroken(ApiUnreachable):
    """The event stream stopped before the job ended (API restart, network)."""


@dataclass(frozen=True, slots=True)
class Submitted:
    """The answer to a job submission."""

    job_id: int
    status: str
    status_url: str


@dataclass(frozen=True, slots=True)
class Poll:
    """One status poll: `view` is None when the server answered 304 (unchanged)."""

    view: JobView | None
    etag: str | None
    # X-Poll-Interval: the pace the server asks of polling clients (None: not said).
    poll_interval: float | None = None

    @property
    def not_modified(self) -> bool:
        return self.view is None


class RenderwatchClient:
    """Talks to one API as one client (one key)."""

    def __init__(
        self,
        base_url: str,
        key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "renderwatch-cli"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __repr__(self) -> str:
        return f"RenderwatchClient({self.base_url!r})"

    def __enter__(self) -> RenderwatchClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def absolute(self, url: str) -> str:
        """`url` made absolute against the API's base URL (status URLs may be relative)."""
        return urljoin(self.base_url + "/", url)

    # -- endpoints ----------------------------------------------------------------------

    def submit(self, prompt: str, scenes_total: int) -> Submitted:
        """POST /api/v2/jobs."""
        response = self._request(
            "POST", "/api/v2/jobs", json={"prompt": prompt, "scenes_total": scenes_total}
        )
        self._expect(response, 200, 201, 202)
        body = _json_object(response)
        try:
            job_id = int(body["job_id"])
        except (KeyError, TypeError, ValueError):
            raise ApiError(response.status_code, "the answer has no job_id") from None
        status_url = str(
            body.get("status_url") or response.headers.get("location") or f"/api/v2/jobs/{job_id}"
        )
        return Submitted(
            job_id=job_id,
            status=str(body.get("status", "queued")),
            status_url=self.absolute(status_url),
        )

    def get_job(self, job_id: int, *, etag: str | None = None) -> Poll:
        """GET /api/v2/jobs/{id}, conditional on `etag` (a 304 gives `view=None`)."""
        headers = {"If-None-Match": etag} if etag else None
        response = self._request("GET", f"/api/v2/jobs/{job_id}", headers=headers)
        hint = poll_interval(response)
        if response.status_code == 304:
            return Poll(view=None, etag=response.headers.get("etag", etag), poll_interval=hint)
        self._expect(response, 200)
        return Poll(view=parse_job(response), etag=response.headers.get("etag"), poll_interval=hint)

    def list_jobs(self, *, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        """GET /api/v2/jobs: a page of the caller's jobs, newest first."""
        response = self._request("GET", "/api/v2/jobs", params={"limit": limit, "offset": offset})
        self._expect(response, 200)
        return _json_object(response)

    def cancel(self, job_id: int) -> dict[str, Any]:
        """POST /api/v2/jobs/{id}/cancel: the answer (`status`, `cancel_requested`)."""
        response = self._request("POST", f"/api/v2/jobs/{job_id}/cancel")
        self._expect(response, 200, 202)
        return _json_object(response)

    def events(self, job_id: int, *, last_event_id: int | None = None) -> Iterator[JobView]:
        """GET /api/v2/jobs/{id}/events: each new version of the job as it happens.

        Ends after the terminal state. Raises `NotFound` (404, before any event),
        `ApiError` for another refusal (e.g. 503 when the server has too many streams)
        and `StreamBroken` when the stream stops early (reconnect with the last version).
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=STREAM_READ_TIMEOUT)
        path = f"/api/v2/jobs/{job_id}/events"
        try:
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    self._expect(response, 200)
                finished = False
                for data in sse_data(response.iter_lines()):
                    view = _parse_view(data, response.status_code)
                    yield view
                    finished = view.finished
                if not finished:
                    raise StreamBroken("the event stream ended before the job did")
        except httpx.TransportError as exc:
            raise StreamBroken(
                f"the event stream from {self.base_url} broke ({type(exc).__name__})"
            ) from exc

    def cache_stats(self) -> dict[str, Any]:
        """GET /api/v2/cache/stats: the statistics object."""
        response = self._request("GET", "/api/v2/cache/stats")
        self._expect(response, 200)
        return _json_object(response)

    def metrics(self) -> str:
        """GET /metrics: Prometheus text."""
        response = self._request("GET", "/metrics", headers={"Accept": "text/plain"})
        self._expect(response, 200)
        return response.text

    def ready(self) -> bool:
        """True when GET /readyz answers 200 (False when it answers otherwise or not at all)."""
        try:
            return self._request("GET", "/readyz").status_code == 200
        except ApiUnreachable:
            return False

    # -- plumbing -----------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            # The message names the base URL (no key: it lives only in a header).
            raise ApiUnreachable(
                f"cannot reach the API at {self.base_url} ({type(exc).__name__})"
            ) from exc

    @staticmethod
    def _expect(response: httpx.Response, *statuses: int) -> None:
        if response.status_code in statuses:
            return
        detail = _detail(response)
        if response.status_code == 401:
            raise Unauthorized(401, detail or "the API key was refused")
        if response.status_code == 404:
            raise NotFound(404, detail or "not found")
        raise ApiError(response.status_code, detail or response.reason_phrase)


def parse_job(response: httpx.Response) -> JobView:
    """The job object of a response; keys this client does not know are ignored."""
    return _job_view(_json_object(response), response.status_code)


def _job_view(body: dict[str, Any], status_code: int) -> JobView:
    known = {k: v for k, v in body.items() if k in JobView.model_fields}
    try:
        return JobView.model_validate(known)
    except ValidationError as exc:
        raise ApiError(status_code, f"malformed job object: {exc.errors()[0]['msg']}") from None


def _parse_view(data: str, status_code: int) -> JobView:
    try:
        body = json.loads(data)
    except ValueError:
        raise ApiError(status_code, "an event is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(status_code, "an event is not a JSON object")
    return _job_view(body, status_code)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The `data` of each event of a text/event-stream (comments, ids, retry skipped:
    the job object carries its version)."""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def poll_interval(response: httpx.Response) -> float | None:
    """The response's X-Poll-Interval in seconds, if it carries a sane one."""
    try:
        value = float(response.headers.get("x-poll-interval", ""))
    except ValueError:
        return None
    return value if 0 < value <= 3_600 else None


def metric_total(text: str, name: str = DB_QUERIES_METRIC) -> float | None:
    """Sum of every sample of `name` (all label sets) in Prometheus text; None if absent.

    Parsed by `prometheus_client.parser`, so label values holding `}` or `"` (a route
    template such as `/api/v2/jobs/{job_id}`) are read as Prometheus means them.
    """
    total: float | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    total = sample.value if total is None else total + sample.value
    except ValueError as exc:
        raise ClientError(f"/metrics is not Prometheus text: {exc}") from None
    return total


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise ApiError(response.status_code, "the answer is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(response.status_code, "the answer is not a JSON object")
    return body


def _detail(response: httpx.Response) -> str:
    """A short human reason from an error body (FastAPI's `detail`), if any."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail[:200]
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return f"{where}: {first.get('msg', 'invalid')}"[:200]
    return ""


__all__ = [
    "DB_QUERIES_METRIC",
    "ApiError",
    "ApiUnreachable",
    "ClientError",
    "NotFound",
    "Poll",
    "RenderwatchClient",
    "StreamBroken",
    "Submitted",
    "Unauthorized",
    "metric_total",
    "parse_job",
    "poll_interval",
    "sse_data",
]
