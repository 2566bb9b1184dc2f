"""`python -m api`: serve the API with uvicorn (the command of docker-compose's api service)."""

from __future__ import annotations

import copy
import os
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from api.metrics import reset_multiprocess_dir
from shared.settings import get_settings


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging plus a root handler, so `api.*` and `shared.*` lines are printed too."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["named"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["named"] = {
        "formatter": "named",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["named"], "level": level}
    return config


def main() -> None:
    """Run uvicorn in factory mode: every worker process builds its own app after the fork
    (`create_served_app`: the app, with its heap settled once started)."""
    settings = get_settings()
    level = settings.log_level.upper()
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if multiproc_dir:
        # Before any worker starts: files of a previous run would be summed in.
        reset_multiprocess_dir(multiproc_dir)
    uvicorn.run(
        "api.app:create_served_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        access_log=False,
        # "auto" picks uvloop and httptools when they are installed, asyncio/h11 otherwise.
        loop="auto",
        http="auto",
        log_level=level.lower(),
        log_config=log_config(level),
    )


if __name__ == "__main__":
    main()
