"""Engine robustness without Serve: guarded inbox and sinks, leases and deadlines, health that recovers."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.engine import Engine, EngineSettings
from deployments.leases import LeaseTable
from deployments.scheduler import EngineRequest, ErrorEvent, FinalEvent, SchedulerLimits
from model.sampling.params import SamplingParams
from tests.tiny import served_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = served_checkpoint(tmp_path_factory.mktemp("engine"))
    eng = Engine(EngineSettings(str(path), limits=SchedulerLimits(max_rows=4, max_queue=8)))
    yield eng
    eng.shutdown()


def req(rid: str, max_new: int = 8, steps: int = 2) -> EngineRequest:
    return EngineRequest(
        rid, [2, 5, 7], SamplingParams(max_new_tokens=max_new, max_denoising_steps=steps), seed=1
    )


async def collect(engine: Engine, request: EngineRequest, **kw) -> list:
    out = []
    async for batch in engine.generate(request, **kw):
        out.extend(batch)
    return out


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    # no row, no lease and nothing queued or left for the scheduler: the next iteration is the next test's
    while engine.stats()["active_rows"] or engine.stats()["leases"] or engine.scheduler.has_work:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)


def test_lease_table_expires_by_deadline_and_by_lapsed_lease():
    t = LeaseTable()
    t.add("a", now=0.0, timeout_s=10.0, lease_s=1.0)
    t.add("b", now=0.0, timeout_s=2.0, lease_s=None)
    t.add("c", now=0.0, timeout_s=None, lease_s=None)
    t.renew(["a"], now=0.9)
    assert t.expired(1.5) == []
    assert [r for r, _ in t.expired(2.0)] == ["a", "b"]  # a: not renewed since 0.9; b: deadline
    assert len(t) == 1 and "c" in t and t.expired(1e9) == []


def test_a_lapsed_lease_frees_the_row_and_tells_the_caller(engine):
    events = asyncio.run(collect(engine, req("lapse", max_new=10_000, steps=48), lease_s=0.3))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "DEADLINE_EXCEEDED"
    assert "lease lapsed" in events[-1].message
    wait_idle(engine)


def collect_renewing(engine, request, **kwargs) -> list:
    """Run `request` to its end while renewing its lease every 50 ms, as a connected Router does."""

    async def run():
        task = asyncio.create_task(collect(engine, request, **kwargs))
        while not task.done():
            engine.renew([request.request_id])
            await asyncio.sleep(0.05)
        return task.result()

    return asyncio.run(run())


def test_renewed_leases_keep_a_request_running_to_its_end(engine):
    events = collect_renewing(engine, req("renewed", max_new=48, steps=6), lease_s=0.2)
    assert isinstance(events[-1], FinalEvent)
    wait_idle(engine)


def test_the_deadline_frees_the_row_even_while_renewed(engine):
    events = collect_renewing(engine, req("late", max_new=10_000, steps=48), timeout_s=0.3)
    assert events[-1].code == "DEADLINE_EXCEEDED" and "deadline" in events[-1].message
    wait_idle(engine)


def test_a_failing_sink_and_a_bad_inbox_item_fail_alone(engine):
    def broken_sink(event):
        raise RuntimeError("a caller that went away badly")

    engine._inbox.put(("submit", req("broken"), broken_sink, None, None))
    engine._inbox.put(("no-such-op",))
    engine._inbox.put(("submit", None, broken_sink, None, None))  # not a request at all
    events = asyncio.run(collect(engine, req("fine")))
    assert isinstance(events[-1], FinalEvent)
    assert engine.ready()
    wait_idle(engine)


def test_a_failed_iteration_is_unhealthy_until_one_succeeds(engine, monkeypatch):
    wait_idle(engine)  # the one failing iteration must be this request's, not an earlier test's leftover
    real = engine.core.iterate
    calls = {"n": 0}

    def fail_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")
        return real()

    monkeypatch.setattr(engine.core, "iterate", fail_once)
    events = asyncio.run(collect(engine, req("first")))
    assert isinstance(events[-1], ErrorEvent) and "device fell over" in events[-1].message
    assert not engine.ready()
    with pytest.raises(RuntimeError, match="device fell over"):
        engine.check_health()  # Serve restarts a replica whose engine stays broken
    events = asyncio.run(collect(engine, req("second")))
    assert isinstance(events[-1], FinalEvent)
    assert engine.ready()
    engine.check_health()  # a recovered engine serves again
    wait_idle(engine)
