"""Load-adaptive sampling: under SLO pressure, trade a little quality for speed until the autoscaler catches up.

A new Engine replica takes tens of seconds to land (scale-up delay, actor start, weight load). Meanwhile the
replicas already running are over capacity and every stream slows. A diffusion LM has two knobs that buy speed
per request (DiLaServe's idea): a larger `entropy_bound` commits more tokens per denoising step, and a lower
`max_denoising_steps` caps the steps per canvas. This module decides, per request at submission, how far to
turn them; the Engine (deployments/engine.py) applies the decision to the request's SamplingParams and reports
it in the final stats, so a client can resend with the reported values and the same seed to reproduce.

Request class: what the request asks for, read at the Engine with no extra plumbing:
  - `structured`: constrained generation (JSON schema, regex, templates, forced tool calls), where fewer steps
    risk malformed or lower-quality structure;
  - `plain`: everything else (free text, chat).
Only classes the operator lists are ever adapted, each within its own limits (`max_entropy_bound`,
`min_denoising_steps`); a request's own stricter values are never loosened past those limits, and a request
already looser than the limit is left alone.

Pressure, from the replica's own autoscaling readings (deployments/engine_metrics.py): utilisation (demanded
over sustainable tokens/s), and how far the oldest request waiting for its first canvas is past the time-to-
first-canvas SLO. 0 below `start_utilization`, 1 at `full_utilization`, linear between; the knobs move by the
same fraction of their allowed range. Readings are cached for `refresh_s` so a burst of submissions costs one
snapshot. Off (`enabled: false`, the default): requests pass untouched, so tokens are exactly as without it.

Pure: no Ray, no torch; the clock and the readings are passed in.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

PLAIN = "plain"
STRUCTURED = "structured"
REQUEST_CLASSES = (PLAIN, STRUCTURED)


@dataclass(frozen=True)
class ClassLimits:
    """How far requests of one class may be adapted at full pressure."""

    max_entropy_bound: float
    min_denoising_steps: int


@dataclass(frozen=True)
class AdaptiveSettings:
    enabled: bool = False
    start_utilization: float = 1.0  # pressure starts when demand reaches this share of capacity
    full_utilization: float = 1.5  # ... and is full here
    classes: dict[str, ClassLimits] = field(default_factory=dict)
    refresh_s: float = 0.5  # readings are re-read at most this often


@dataclass(frozen=True)
class Adaptation:
    """What was applied to one request (reported in its final stats)."""

    request_class: str
    pressure: float  # 0..1
    entropy_bound: float  # the value the request ran with
    max_denoising_steps: int


def request_class(request) -> str:
    """`structured` when the request's canvases are constrained, else `plain` (see the module docstring)."""
    return STRUCTURED if getattr(request, "constraints", None) else PLAIN


def pressure(readings: dict[str, float], settings: AdaptiveSettings, slo_ttfc_s: float) -> float:
    """0..1 from one replica's readings; 0 when they say nothing (no SLO configured, no capacity learned)."""
    demand, capacity = readings.get("demanded_tps"), readings.get("capacity_tps")
    levels = []
    if demand is not None and capacity and capacity > 0:
        levels.append(demand / capacity)
    waiting = readings.get("ttfc_pending_s")
    if waiting is not None and slo_ttfc_s > 0:
        # a queue whose oldest request has waited k x the SLO counts like utilisation k
        levels.append(waiting / slo_ttfc_s)
    level = max(levels, default=0.0)
    span = settings.full_utilization - settings.start_utilization
    if not math.isfinite(level) or level <= settings.start_utilization:
        return 0.0
    return 1.0 if span <= 0 else min(1.0, (level - settings.start_utilization) / span)


def as_float32(x: float) -> float:
    """`x` rounded to the nearest float32: the wire carries sampling values as float32, so an adapted value that
    is already one comes back bit-identical when a client resends it (the seed reproduces the tokens)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def adapted_values(
    entropy_bound: float, max_steps: int, limits: ClassLimits, level: float
) -> tuple[float, int]:
    """The request's (entropy_bound, max_denoising_steps) at pressure `level`: each moves toward its limit by
    `level` of the way, never past it, never back from the request's own looser value."""
    if level <= 0:
        return entropy_bound, max_steps
    eb = entropy_bound
    if limits.max_entropy_bound > entropy_bound:
        eb = as_float32(entropy_bound + level * (limits.max_entropy_bound - entropy_bound))
    steps = max_steps
    if limits.min_denoising_steps < max_steps:
        steps = max(
            limits.min_denoising_steps,
            math.ceil(max_steps - level * (max_steps - limits.min_denoising_steps)),
        )
    return eb, steps


class LoadAdapter:
    """Per-Engine decision at submission. `readings()`: the replica's autoscaling readings (called at most once
    per `refresh_s`); `clock()`: seconds."""

    def __init__(
        self,
        settings: AdaptiveSettings,
        readings: Callable[[], dict[str, float]],
        slo_ttfc_s: float,
        clock: Callable[[], float],
    ):
        self.settings, self._readings, self._slo_ttfc_s, self._clock = settings, readings, slo_ttfc_s, clock
        self._level, self._at = 0.0, -math.inf

    def level(self) -> float:
        now = self._clock()
        if now - self._at >= self.settings.refresh_s:
            self._level, self._at = pressure(self._readings(), self.settings, self._slo_ttfc_s), now
        return self._level

    def adapt(self, request) -> Adaptation | None:
        """Adapt `request.params` in place (a new SamplingParams) and say what was applied; None when off, the
        class is not listed, there is no pressure, or nothing would change."""
        if not self.settings.enabled:
            return None
        cls = request_class(request)
        limits = self.settings.classes.get(cls)
        if limits is None:
            return None
        level = self.level()
        if level <= 0:
            return None
        p = request.params
        eb, steps = adapted_values(p.entropy_bound, p.max_denoising_steps, limits, level)
        if eb == p.entropy_bound and steps == p.max_denoising_steps:
            return None
        request.params = dataclasses.replace(p, entropy_bound=eb, max_denoising_steps=steps)
        return Adaptation(cls, level, eb, steps)


def annotate(event, adaptation: Adaptation | None):
    """The final event carries the request's adaptation to the Router (an attribute: the scheduler's events know
    nothing of it). Other events pass through."""
    if adaptation is not None and hasattr(event, "finish_reason"):
        event.adaptation = adaptation
    return event
