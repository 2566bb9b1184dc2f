"""Pluggable renderers: what actually produces a video, behind a small Protocol.

`RENDERER=simulated` (the default) sleeps `SCENE_SECONDS` per scene. Any other value
names a class as `package.module:ClassName`; it is constructed with the settings.

A renderer reports a failure that users may read by raising `RenderError`: its message
becomes the job's `error`. Any other exception is treated as an internal failure and
only its type name reaches the job (its message may hold connection details).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from shared.schemas import Stage
from shared.settings import Settings

SIMULATED = "simulated"
# The non-scene stages are short next to rendering; a quarter of a scene each.
STAGE_FRACTION = 0.25
RESULT_URL_TEMPLATE = "https://videos.renderwatch.example/jobs/{job_id}.mp4"


class RenderError(Exception):
    """A render failure whose message is safe to show to the job's owner."""


class RendererConfigError(ValueError):
    """`RENDERER` names nothing usable."""


@runtime_checkable
class Renderer(Protocol):
    """Does the work of each step; progress reporting is the task's job, not the renderer's."""

    def run_stage(self, job_id: int, stage: Stage) -> None:
        """Do the work of a non-scene stage (scripting, storyboard, encoding, uploading)."""

    def render_scene(self, job_id: int, index: int, total: int) -> None:
        """Render scene `index` (1-based) of `total`."""

    def result_url(self, job_id: int) -> str:
        """Where the finished video can be fetched."""


class SimulatedRenderer:
    """A stand-in renderer that only takes time: `scene_seconds` per scene."""

    def __init__(
        self, scene_seconds: float, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.scene_seconds = scene_seconds
        self._sleep = sleep

    def run_stage(self, job_id: int, stage: Stage) -> None:
        """Take a fraction of a scene's time."""
        self._sleep(self.scene_seconds * STAGE_FRACTION)

    def render_scene(self, job_id: int, index: int, total: int) -> None:
        """Take one scene's time."""
        self._sleep(self.scene_seconds)

    def result_url(self, job_id: int) -> str:
        """A stable, job-specific URL."""
        return RESULT_URL_TEMPLATE.format(job_id=job_id)


def load_renderer(settings: Settings) -> Renderer:
    """The renderer `settings.renderer` names: "simulated" or "package.module:ClassName"."""
    spec = settings.renderer.strip()
    if spec == SIMULATED:
        return SimulatedRenderer(settings.scene_seconds)
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise RendererConfigError(
            f"RENDERER must be {SIMULATED!r} or 'package.module:ClassName', not {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RendererConfigError(
            f"RENDERER {spec!r}: cannot import module {module_name!r}"
        ) from exc
    factory: object = module
    for attr in attr_path.split("."):
        try:
            factory = getattr(factory, attr)
        except AttributeError:
            raise RendererConfigError(f"RENDERER {spec!r}: {attr!r} not found") from None
    if not callable(factory):
        raise RendererConfigError(f"RENDERER {spec!r} is not a class or factory")
    renderer = factory(settings)
    if not isinstance(renderer, Renderer):
        raise RendererConfigError(
            f"RENDERER {spec!r} built a {type(renderer).__name__}, which lacks "
            "run_stage/render_scene/result_url"
        )
    return renderer
