"""Load-adaptive sampling decisions (deployments/load_adaptive.py): off leaves requests untouched, pressure from
utilisation and first-canvas waits, per-class limits, never loosening past a limit, and readings cached."""

from __future__ import annotations

import pytest

from deployments.load_adaptive import (
    PLAIN,
    STRUCTURED,
    Adaptation,
    AdaptiveSettings,
    ClassLimits,
    LoadAdapter,
    adapted_values,
    annotate,
    as_float32,
    pressure,
    request_class,
)
from deployments.scheduler import EngineRequest, FinalEvent
from model.sampling.params import SamplingParams

LIMITS = {PLAIN: ClassLimits(max_entropy_bound=0.5, min_denoising_steps=16)}
ON = AdaptiveSettings(enabled=True, start_utilization=1.0, full_utilization=1.5, classes=LIMITS)


def request(constraints=None, **params) -> EngineRequest:
    base = dict(max_denoising_steps=48, entropy_bound=0.1)
    return EngineRequest("r", [1, 2], SamplingParams(**(base | params)), seed=7, constraints=constraints)


def readings(demand: float, capacity: float = 100.0, waiting: float = 0.0) -> dict[str, float]:
    return {"demanded_tps": demand, "capacity_tps": capacity, "ttfc_pending_s": waiting}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def adapter(settings=ON, reads=None, clock=None) -> LoadAdapter:
    return LoadAdapter(settings, reads or (lambda: readings(200.0)), 2.0, clock or Clock())


def test_off_by_default_leaves_the_request_object_untouched():
    req = request()
    before = req.params
    calls = []
    assert adapter(AdaptiveSettings(classes=LIMITS), reads=lambda: calls.append(1) or {}).adapt(req) is None
    assert req.params is before and calls == []  # not even a reading is taken


@pytest.mark.parametrize(
    ("reading", "expected"),
    [
        (readings(50.0), 0.0),  # half loaded
        (readings(100.0), 0.0),  # exactly at capacity: pressure starts above it
        (readings(125.0), 0.5),
        (readings(300.0), 1.0),  # clamped
        (readings(10.0, waiting=2.5), 0.5),  # light demand but the oldest waiter is 1.25x the TTFC SLO
        ({"demanded_tps": 500.0}, 0.0),  # no capacity learned yet: no basis for pressure
        ({}, 0.0),
    ],
)
def test_pressure_from_utilisation_and_first_canvas_wait(reading, expected):
    assert pressure(reading, ON, slo_ttfc_s=2.0) == pytest.approx(expected)


def test_values_move_toward_the_class_limits_with_pressure():
    assert adapted_values(0.1, 48, LIMITS[PLAIN], 0.0) == (0.1, 48)
    eb, steps = adapted_values(0.1, 48, LIMITS[PLAIN], 0.5)
    assert eb == pytest.approx(0.3) and steps == 32
    assert eb == as_float32(eb)  # what the wire carries: resent, it comes back bit-identical
    assert adapted_values(0.1, 48, LIMITS[PLAIN], 1.0) == (pytest.approx(0.5), 16)
    # a request already looser than the limits keeps its own values (never tightened, never past a limit)
    assert adapted_values(0.9, 8, LIMITS[PLAIN], 1.0) == (0.9, 8)


def test_a_pressed_engine_adapts_and_reports_what_it_applied():
    req = request()
    got = adapter().adapt(req)
    assert got == Adaptation(PLAIN, 1.0, pytest.approx(0.5), 16)
    assert req.params.entropy_bound == pytest.approx(0.5) and req.params.max_denoising_steps == 16
    assert req.params.max_new_tokens == SamplingParams().max_new_tokens  # nothing else changes
    assert req.seed == 7


def test_only_listed_classes_adapt():
    structured = request(constraints=[object()])
    assert request_class(structured) == STRUCTURED and request_class(request()) == PLAIN
    assert adapter().adapt(structured) is None
    both = AdaptiveSettings(enabled=True, classes=LIMITS | {STRUCTURED: ClassLimits(0.2, 40)})
    assert adapter(both).adapt(structured).max_denoising_steps == 40


def test_no_pressure_means_no_change():
    req = request()
    assert adapter(reads=lambda: readings(80.0)).adapt(req) is None
    assert req.params.max_denoising_steps == 48


def test_readings_are_cached_for_refresh_s():
    clock, calls = Clock(), []

    def reads():
        calls.append(clock.now)
        return readings(200.0 if len(calls) == 1 else 50.0)

    a = adapter(reads=reads, clock=clock)
    assert a.adapt(request()) is not None
    clock.now = 0.3
    assert a.adapt(request()) is not None and len(calls) == 1  # one reading for a burst of submissions
    clock.now = 0.6
    assert a.adapt(request()) is None and len(calls) == 2  # the load has passed


def test_the_final_event_carries_the_adaptation():
    final = FinalEvent("length", 2, 32, [16], 2.0, 0.1, 0.5, 0.0)
    applied = Adaptation(PLAIN, 1.0, 0.5, 16)
    assert annotate(final, applied).adaptation == applied
    untouched = FinalEvent("length", 2, 32, [16], 2.0, 0.1, 0.5, 0.0)
    assert not hasattr(annotate(untouched, None), "adaptation")


def test_the_openai_stats_carry_the_adaptation_only_when_applied():
    from deployments import openai_protocol as oa
    from protos.blockserve.v1 import blockserve_pb2 as pb

    plain = pb.GenerationStats(canvases=1)
    assert "load_adaptation" not in oa.stats(plain)
    adapted = pb.GenerationStats(
        canvases=1,
        load_adaptation=pb.LoadAdaptation(
            request_class=PLAIN, pressure=0.5, entropy_bound=0.25, max_denoising_steps=16
        ),
    )
    assert oa.stats(adapted)["load_adaptation"] == {
        "request_class": PLAIN,
        "pressure": 0.5,
        "entropy_bound": 0.25,
        "max_denoising_steps": 16,
    }
