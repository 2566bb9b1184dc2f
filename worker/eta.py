"""The render's ETA: a time-weighted average of scene durations.

Model (the one indicatif uses for its progress bars, rather than tqdm's per-update
smoothing): each finished scene is a sample "seconds per scene" covering `dt` seconds
of wall time. The estimate is an exponentially weighted average of the samples in which
a sample's weight decays with the TIME since it was taken, not with the number of
updates: the old average keeps the share `0.5 ** (dt / HALF_LIFE_SECONDS)` when a sample
of duration `dt` arrives. So one unusually long or short scene moves the estimate in
proportion to the time it took, a burst of quick scenes cannot wipe out the history, and
the estimate follows a real change of pace within a couple of half-lives. The average
starts at zero and is de-biased by dividing by the total weight given to samples
(`1 - prod(share)`), so the first scene's duration is the first estimate rather than a
fraction of it.

ETA = estimate x scenes left. None until a scene has been timed. Sans-IO: the caller
passes the clock readings.
"""

from __future__ import annotations

from dataclasses import dataclass

HALF_LIFE_SECONDS = 15.0


@dataclass
class SceneEta:
    """Seconds per scene, weighted by time; `eta(left)` in seconds, or None."""

    half_life: float = HALF_LIFE_SECONDS
    _smoothed: float = 0.0
    _kept: float = 1.0  # product of the shares kept: 1 - _kept is the weight of the samples
    _last: float | None = None

    def begin(self, now: float) -> None:
        """The clock reading when the first timed scene begins (later calls: no-op)."""
        if self._last is None:
            self._last = now

    def scene_done(self, now: float, scenes: int = 1) -> None:
        """`scenes` more scenes finished at `now` (since the previous reading)."""
        if self._last is None:
            self._last = now
            return
        dt = max(now - self._last, 0.0)
        self._last = now
        if scenes <= 0:
            return
        sample = dt / scenes
        share = 0.5 ** (dt / self.half_life) if self.half_life > 0 else 0.0
        self._smoothed = self._smoothed * share + sample * (1.0 - share)
        self._kept *= share
        if dt == 0.0:
            # A zero-length sample carries no weight in this model; count it as a tiny
            # one so that an instant scene still yields an estimate.
            self._kept = min(self._kept, 1.0 - 1e-9)

    @property
    def seconds_per_scene(self) -> float | None:
        weight = 1.0 - self._kept
        if weight <= 0.0:
            return None
        return self._smoothed / weight

    def eta(self, scenes_left: int) -> float | None:
        per_scene = self.seconds_per_scene
        if per_scene is None:
            return None
        return round(per_scene * max(scenes_left, 0), 1)
