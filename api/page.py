"""The status page at `/`: static HTML, JS and CSS from api/static/ (no build step,
nothing loaded from the internet). The page reads the API with the key the person
pastes (kept in sessionStorage, sent in the Authorization header): see README
"The status page"."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)

# Nothing on the page may come from elsewhere: the policy makes the browser enforce it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/")
async def status_page() -> Response:
    """The page itself; its script and style are under /static/."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


static = StaticFiles(directory=STATIC_DIR)
