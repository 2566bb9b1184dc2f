"""renderwatch's HTTP API (FastAPI): `create_app()` builds it, `python -m api` serves it."""

from __future__ import annotations

from api.app import create_app

__all__ = ["create_app"]
