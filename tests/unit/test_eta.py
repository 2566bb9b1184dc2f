"""The worker's ETA model (`worker.eta.SceneEta`): time-weighted, de-biased, never jumpy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.eta import SceneEta


def timed(durations: list[float], half_life: float = 15.0) -> SceneEta:
    eta = SceneEta(half_life=half_life)
    now = 100.0
    eta.begin(now)
    for duration in durations:
        now += duration
        eta.scene_done(now)
    return eta


def test_none_until_a_scene_is_done():
    eta = SceneEta()
    assert eta.eta(5) is None
    eta.begin(0.0)
    assert eta.eta(5) is None


def test_the_first_scene_is_the_first_estimate():
    assert timed([4.0]).eta(3) == pytest.approx(12.0)


def test_steady_scenes_give_their_duration():
    assert timed([2.0] * 10).seconds_per_scene == pytest.approx(2.0)


def test_one_slow_scene_weighs_by_its_time_not_as_the_newest_update():
    # Ten 1 s scenes, then one 10 s scene. Per-update smoothing with factor 0.3 (tqdm's
    # default) would say 0.7*1 + 0.3*10 = 3.7 s; a plain latest-sample estimate says 10.
    per_scene = timed([1.0] * 10 + [10.0]).seconds_per_scene
    assert per_scene is not None
    assert 1.0 < per_scene < 10.0
    # A quick scene after it does not throw the slow one away.
    after = timed([1.0] * 10 + [10.0, 0.5]).seconds_per_scene
    assert after is not None and after > 2.0


def test_a_lasting_change_of_pace_is_followed():
    per_scene = timed([1.0] * 5 + [5.0] * 20).seconds_per_scene
    assert per_scene == pytest.approx(5.0, rel=0.05)


@given(st.lists(st.floats(min_value=0.0, max_value=120.0), min_size=1, max_size=40))
def test_the_estimate_stays_within_the_samples(durations):
    per_scene = timed(durations).seconds_per_scene
    assert per_scene is not None
    assert min(durations) - 1e-6 <= per_scene <= max(durations) + 1e-6
