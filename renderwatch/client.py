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

from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from shared.schemas import JobView

DEFAULT_TIMEOUT = 10.0
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
        if response.status_code == 304:
            return Poll(view=None, etag=response.headers.get("etag", etag))
        self._expect(response, 200)
        return Poll(view=parse_job(response), etag=response.headers.get("etag"))

    def cancel(self, job_id: int) -> None:
        """POST /api/v2/jobs/{id}/cancel."""
        self._expect(self._request("POST", f"/api/v2/jobs/{job_id}/cancel"), 200, 202)

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
    body = _json_object(response)
    known = {k: v for k, v in body.items() if k in JobView.model_fields}
    try:
        return JobView.model_validate(known)
    except ValidationError as exc:
        raise ApiError(
            response.status_code, f"malformed job object: {exc.errors()[0]['msg']}"
        ) from None


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
    "Submitted",
    "Unauthorized",
    "metric_total",
    "parse_job",
]
