"""Live progress on the stack of docker-compose.yml: the event stream of a job rendered by
the real worker, the page at `/`, and `renderwatch watch --json` as a user runs it."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import RunningStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SCENES = 6


def test_a_job_followed_over_sse_from_queued_to_succeeded(stack: RunningStack) -> None:
    key = stack.create_key("live-e2e@example.com")
    auth = {"Authorization": f"Bearer {key}"}
    with stack.http() as http:
        created = http.post(
            "/api/v2/jobs", json={"prompt": "a tram at night", "scenes_total": SCENES}, headers=auth
        )
        assert created.status_code == 202, created.text
        assert float(created.headers["x-poll-interval"]) > 0
        job_id = created.json()["job_id"]
        events = []
        with http.stream("GET", f"/api/v2/jobs/{job_id}/events", headers=auth) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            ident = None
            for line in response.iter_lines():
                if line.startswith("id: "):
                    ident = int(line[4:])
                elif line.startswith("data: "):
                    body = json.loads(line[6:])
                    assert body["version"] == ident
                    events.append(body)
        versions = [e["version"] for e in events]
        assert versions == sorted(set(versions)), versions
        assert events[-1]["status"] == "succeeded"
        scenes = [e["progress"]["scenes_completed"] for e in events]
        assert scenes == sorted(scenes)
        # Someone else's job: the poll's 404, before any stream.
        other = stack.create_key("someone-else-e2e@example.com")
        foreign = http.get(
            f"/api/v2/jobs/{job_id}/events", headers={"Authorization": f"Bearer {other}"}
        )
        assert foreign.status_code == 404

        page = http.get("/")
        assert page.status_code == 200 and "renderwatch" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert http.get("/static/app.js").status_code == 200

    watched = stack.cli("watch", "--api-url", stack.api_url, "--key", key, str(job_id), "--json")
    assert watched.returncode == 0, watched.stderr
    last = json.loads(watched.stdout.strip().splitlines()[-1])
    assert last["status"] == "succeeded" and last["job_id"] == job_id
    version = stack.cli("--version")
    assert re.match(r"renderwatch \d", version.stdout), version.stdout
