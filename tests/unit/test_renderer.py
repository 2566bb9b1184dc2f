"""The pluggable renderer: the simulated default and the `package.module:Class` loader."""

from __future__ import annotations

import pytest

from shared.schemas import Stage
from tests.renderers import FailingRenderer, RecordingRenderer
from worker.renderer import (
    RESULT_URL_TEMPLATE,
    STAGE_FRACTION,
    Renderer,
    RendererConfigError,
    SimulatedRenderer,
    load_renderer,
)


def test_the_simulated_renderer_takes_scene_seconds_per_scene_and_a_fraction_per_stage():
    slept: list[float] = []
    renderer = SimulatedRenderer(2.0, sleep=slept.append)

    renderer.render_scene(7, 1, 3)
    renderer.run_stage(7, Stage.ENCODING)

    assert slept == [2.0, 2.0 * STAGE_FRACTION]
    assert renderer.result_url(7) == RESULT_URL_TEMPLATE.format(job_id=7)
    assert renderer.result_url(7) != renderer.result_url(8)
    assert isinstance(renderer, Renderer)


def test_simulated_is_the_default_and_uses_scene_seconds(make_settings):
    renderer = load_renderer(make_settings(scene_seconds=0.5))

    assert type(renderer) is SimulatedRenderer
    assert renderer.scene_seconds == 0.5


@pytest.mark.parametrize(
    "spec", ["tests.renderers:RecordingRenderer", " tests.renderers:FailingRenderer "]
)
def test_a_named_class_is_imported_and_built_with_the_settings(make_settings, spec):
    settings = make_settings(renderer=spec, scene_seconds=0.25)

    renderer = load_renderer(settings)

    assert type(renderer) in (RecordingRenderer, FailingRenderer)
    assert type(renderer).__name__ == spec.strip().rsplit(":", 1)[1]
    assert isinstance(renderer, SimulatedRenderer) and renderer.scene_seconds == 0.25


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("blender", "must be 'simulated' or"),
        ("tests.renderers:", "must be 'simulated' or"),
        (":RecordingRenderer", "must be 'simulated' or"),
        ("tests.no_such_module_here:Renderer", "cannot import module"),
        ("tests.renderers:NoSuchClass", "'NoSuchClass' not found"),
        ("tests.renderers:SECRET", "is not a class or factory"),
        ("tests.renderers:NotARenderer", "lacks run_stage/render_scene/result_url"),
    ],
)
def test_a_bad_renderer_setting_is_a_clear_error(make_settings, spec, complaint):
    with pytest.raises(RendererConfigError, match=complaint):
        load_renderer(make_settings(renderer=spec))
