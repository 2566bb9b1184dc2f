"""Renderers for tests, loaded by worker processes through `RENDERER=tests.renderers:Name`.

`RecordingRenderer` appends one line per piece of work to the file named by the
environment variable `RW_TEST_RENDER_LOG`: "<pid> <job_id> scene <i>" or
"<pid> <job_id> stage <stage>", so a test can see what a worker process really did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.schemas import Stage
from shared.settings import Settings
from worker.renderer import RenderError, SimulatedRenderer

RENDER_LOG_ENV = "RW_TEST_RENDER_LOG"
FAIL_AT_SCENE = 2
FAILURE_MESSAGE = "scene 2 could not be rendered: the model is overloaded"
SECRET = "hunter2-do-not-leak"


class RecordingRenderer(SimulatedRenderer):
    """The simulated renderer, recording each completed piece of work to a file."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.scene_seconds)
        path = os.environ.get(RENDER_LOG_ENV)
        self.log = Path(path) if path else None

    def _record(self, line: str) -> None:
        if self.log is not None:
            # One short O_APPEND write per line: lines from several processes never interleave.
            with self.log.open("a") as out:
                out.write(f"{os.getpid()} {line}\n")

    def run_stage(self, job_id: int, stage: Stage) -> None:
        super().run_stage(job_id, stage)
        self._record(f"{job_id} stage {stage.value}")

    def render_scene(self, job_id: int, index: int, total: int) -> None:
        super().render_scene(job_id, index, total)
        self._record(f"{job_id} scene {index}")


class FailingRenderer(SimulatedRenderer):
    """Fails at scene 2 with a user-safe `RenderError`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.scene_seconds)

    def render_scene(self, job_id: int, index: int, total: int) -> None:
        if index == FAIL_AT_SCENE:
            raise RenderError(FAILURE_MESSAGE)
        super().render_scene(job_id, index, total)


class CrashingRenderer(SimulatedRenderer):
    """Fails at scene 2 with an unexpected exception whose message holds a secret."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.scene_seconds)

    def render_scene(self, job_id: int, index: int, total: int) -> None:
        if index == FAIL_AT_SCENE:
            raise ConnectionError(f"could not reach redis://render:{SECRET}@10.0.0.7:6379/0")
        super().render_scene(job_id, index, total)


@dataclass
class NotARenderer:
    """Lacks the Renderer methods: `load_renderer` must refuse it."""

    settings: Settings


def renderer_log(path: Path) -> list[tuple[int, int, str, str]]:
    """Parse a RecordingRenderer file into (pid, job_id, kind, what) tuples."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        pid, job_id, kind, what = line.split()
        entries.append((int(pid), int(job_id), kind, what))
    return entries
