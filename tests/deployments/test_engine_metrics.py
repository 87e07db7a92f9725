"""EngineMetrics (deployments/engine_metrics.py) with a fake clock, and the Engine's `record_autoscaling_stats`
on the tiny model."""

from __future__ import annotations

import asyncio

import pytest

from deployments.engine import Engine, EngineSettings
from deployments.engine_metrics import (
    EngineMetrics,
    MetricsSettings,
    capacity_tokens_per_second,
    percentile,
    step_time_fit,
)
from deployments.scheduler import CanvasEvent, EngineRequest, ErrorEvent, FinalEvent, SchedulerLimits
from model.sampling.params import SamplingParams


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def final() -> FinalEvent:
    return FinalEvent("length", 1, 1, [1], 1.0, 0.0, 0.0, 0.0)


def metrics(**settings) -> tuple[EngineMetrics, Clock, list]:
    clock = Clock()
    base = dict(window_s=10.0, slo_tokens_per_second=20.0, max_rows=4, canvas_length=32)
    return EngineMetrics(MetricsSettings(**(base | settings)), clock=clock), clock, []


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 50) == 5.0 and percentile(values, 10) == 1.0 and percentile(values, 90) == 9.0
    assert percentile([3.0], 10) == 3.0


def test_stream_rate_and_time_to_first_canvas_per_request():
    m, clock, got = metrics()
    fast = m.observe("fast", got.append)
    slow = m.observe("slow", got.append)
    clock.now += 1.0
    fast(CanvasEvent(0, [1] * 32, steps=10))  # first canvas after 1 s: a time-to-first-canvas sample only
    clock.now += 1.0
    fast(CanvasEvent(1, [1] * 32, steps=10))  # 32 positions in 1 s
    clock.now += 1.0
    fast(CanvasEvent(2, [1] * 5, steps=10, last=True))  # a trimmed canvas counts whole: 32 in 1 s
    fast(final())
    clock.now += 1.0
    slow(CanvasEvent(0, [1] * 32, steps=30))  # first canvas after 4 s
    clock.now += 4.0
    slow(CanvasEvent(1, [1] * 32, steps=30))  # 32 positions in 4 s: the tail
    snap = m.snapshot(active_rows=1, queued=0)
    assert snap["stream_tps_p50"] == 32.0 and snap["stream_tps_p10"] == 8.0
    assert snap["ttfc_p50_s"] == 1.0 and snap["ttfc_p90_s"] == 4.0
    assert snap["steps_per_canvas"] == 18.0
    assert len(got) == 6  # every event still reaches the caller's sink


def test_demand_and_the_oldest_request_waiting_for_its_first_canvas():
    m, clock, got = metrics()
    m.observe("a", got.append)
    clock.now += 3.0
    b = m.observe("b", got.append)
    clock.now += 2.0
    snap = m.snapshot(active_rows=1, queued=1)
    assert snap["demand_rows"] == 2 and snap["demanded_tps"] == 40.0
    assert snap["ttfc_pending_s"] == 5.0  # "a" has waited 5 s
    m.forget("a")  # cancelled: no final event will come
    assert m.snapshot(1, 0)["ttfc_pending_s"] == 2.0
    b(ErrorEvent("boom"))
    assert m.snapshot(0, 0)["ttfc_pending_s"] == 0.0


def test_keys_without_samples_are_left_out_and_windows_expire():
    m, clock, got = metrics()
    snap = m.snapshot(0, 0)
    assert snap["delivered_tps"] == 0.0 and snap["occupancy"] == 0.0
    assert not {"stream_tps_p10", "ttfc_p90_s", "capacity_tps", "step_s"} & set(snap)
    sink = m.observe("r", got.append)
    for _ in range(10):
        clock.now += 0.1
        m.on_iteration(rows=2, seconds=0.1, tokens=0)
    sink(CanvasEvent(0, [1] * 32, steps=10))
    sink(CanvasEvent(1, [1] * 32, steps=10))
    m.on_iteration(rows=2, seconds=0.1, tokens=32)
    snap = m.snapshot(2, 0)
    assert snap["delivered_tps"] == pytest.approx(3.2) and snap["occupancy"] == pytest.approx(11 * 0.2 / 40)
    assert "capacity_tps" in snap and "stream_tps_p10" in snap
    clock.now += 11.0
    snap = m.snapshot(0, 0)
    assert "stream_tps_p10" not in snap and snap["delivered_tps"] == 0.0
    assert "capacity_tps" in snap  # learned over the longer capacity window
    clock.now += 50.0
    assert "capacity_tps" not in m.snapshot(0, 0)
    assert all(isinstance(v, float) for v in m.snapshot(0, 0).values())  # Serve refuses non-numbers


def test_step_time_fit_and_capacity():
    a, b = step_time_fit([(1, 0.03), (2, 0.04), (4, 0.06)])
    assert a == pytest.approx(0.02) and b == pytest.approx(0.01)
    # 32 positions per 16 steps = 2 per row-step; 20 tokens/s per row needs t(R) <= 0.1 s -> R = 8
    assert capacity_tokens_per_second(a, b, 2.0, 20.0, max_rows=64) == pytest.approx(160.0)
    assert capacity_tokens_per_second(a, b, 2.0, 20.0, max_rows=4) == 80.0  # bounded by the rows
    assert capacity_tokens_per_second(a, b, 2.0, 1000.0, max_rows=64) == 1000.0  # at least one row
    # no measured cost per row (noisy times falling with rows clip b to 0): every row meets the SLO if the
    # fixed cost does, else only the one-row floor (an SLO out of reach is not room for max_rows streams)
    a, b = step_time_fit([(1, 0.06), (2, 0.05), (4, 0.05)])
    assert b == 0.0 and a == pytest.approx(0.05 + 0.01 / 3)
    assert capacity_tokens_per_second(a, b, 2.0, 20.0, max_rows=64) == 64 * 20.0  # 0.05 s <= 0.1 s
    assert capacity_tokens_per_second(a, b, 2.0, 100.0, max_rows=64) == 100.0  # 0.05 s > 0.02 s
    # one row count only: time assumed proportional to rows (no batching gain claimed)
    assert step_time_fit([(4, 0.08), (4, 0.08)]) == (0.0, pytest.approx(0.02))


def test_engine_reports_autoscaling_stats_from_real_iterations():
    from cluster.env import DEFAULT_MODEL_PATH

    if not (DEFAULT_MODEL_PATH / "config.json").exists():
        pytest.skip("the default model is not built (make tiny-model)")
    settings = EngineSettings(
        str(DEFAULT_MODEL_PATH), limits=SchedulerLimits(max_rows=4), slo_tokens_per_second=10.0
    )
    engine = Engine(settings)
    try:
        params = SamplingParams(max_new_tokens=40, max_denoising_steps=4)

        async def one(i: int) -> list:
            request = EngineRequest(f"r{i}", [1, 2, 3], params, seed=i)
            return [e async for batch in engine.generate(request) for e in batch]

        async def both():
            return await asyncio.gather(one(0), one(1))

        results = asyncio.run(both())
        assert all(isinstance(r[-1], FinalEvent) for r in results)
        stats = engine.record_autoscaling_stats()
        assert stats["demand_rows"] == 0 and stats["delivered_tps"] > 0 and stats["ttfc_pending_s"] == 0
        assert stats["steps_per_canvas"] <= 4 and stats["stream_tps_p10"] > 0 and stats["capacity_tps"] >= 10
        assert engine.record_routing_stats().keys() == stats.keys()
    finally:
        engine.shutdown()
