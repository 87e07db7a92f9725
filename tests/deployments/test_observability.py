"""deployments/observability.py with the real OpenTelemetry SDK (in-memory exporter) and recording fakes of
Ray's metric objects: which spans a request makes, their parents and times, metrics, the request log line."""

from __future__ import annotations

import json
import logging
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from deployments import observability as obs
from deployments.scheduler import CanvasEvent, ErrorEvent, FinalEvent


@pytest.fixture(scope="module")
def provider() -> TracerProvider:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    return trace.get_tracer_provider()


@pytest.fixture
def spans(provider):
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()  # later tests' spans no longer reach this exporter


class Recorder:
    """Stands in for one ray.serve.metrics object: keeps (method, value, tags)."""

    def __init__(self, *_, **__):
        self.calls = []

    def inc(self, value=1.0, tags=None):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))


def fake_metrics(specs):
    return {s.name.removeprefix("blockserve_"): Recorder() for s in specs}


def values(recorder, method="observe"):
    return [v for m, v, _ in recorder.calls if m == method]


def finished(spans_exporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in spans_exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


OUTCOME = obs.Outcome(
    finish_reason="length",
    prompt_tokens=5,
    completion_tokens=40,
    steps_per_canvas=(12, 7, 30),
    time_to_first_canvas_s=0.25,
    tokens_per_second=80.0,
    tokens_per_forward=40 / 49,
)


def test_router_request_spans_nest_under_the_current_span(provider, spans):
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("replica_handle_request Router") as parent:
        rr = obs.RouterRequest("Generate", None, obs.RequestLogSettings(enabled=False))
        assert obs.router_request() is rr
        rr.identify("client-1")
        with rr.stage("router.validate"):
            obs.traced_encode(lambda text: [1, 2, 3])("abc")
        with rr.current():
            inner = trace.get_current_span()
        with rr.stage("router.detokenize", **{"blockserve.canvas_index": 0}):
            pass
        rr.finish(OUTCOME)
        rr.finish(obs.Outcome(code="INTERNAL"))  # only the first outcome counts
    got = finished(spans)
    router = got["Router.Generate"][0]
    assert inner.get_span_context().span_id == router.context.span_id  # what a handle call would carry on
    assert router.parent.span_id == parent.get_span_context().span_id
    assert got["router.validate"][0].parent.span_id == router.context.span_id
    assert got["router.tokenize"][0].parent.span_id == got["router.validate"][0].context.span_id
    assert got["router.tokenize"][0].attributes["blockserve.tokens"] == 3
    assert got["router.detokenize"][0].attributes["blockserve.canvas_index"] == 0
    assert router.attributes["blockserve.request_id"] == "client-1"
    assert router.attributes["rpc.grpc.status_code"] == "OK"
    assert (
        router.attributes["blockserve.canvases"] == 3
        and router.attributes["blockserve.denoising_steps"] == 49
    )
    assert router.status.status_code == StatusCode.OK
    assert obs.router_request() is not rr  # finished: helpers outside the RPC see no request


def test_failed_request_span_is_an_error_with_its_code(provider, spans):
    with provider.get_tracer("test").start_as_current_span("parent"):
        rr = obs.RouterRequest("GenerateStream", None, obs.RequestLogSettings(enabled=False))
        rr.finish(obs.Outcome(code="INVALID_ARGUMENT", message="sampling.t_min must be > 0"))
    span = finished(spans)["Router.GenerateStream"][0]
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "INVALID_ARGUMENT: sampling.t_min must be > 0"
    assert span.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"


def test_nothing_is_traced_without_a_sampled_parent(spans):
    rr = obs.RouterRequest("Generate", None, obs.RequestLogSettings(enabled=False))
    with rr.stage("router.validate"):
        obs.traced_encode(lambda text: [1])("a")
    rr.finish(OUTCOME)
    engine = obs.EngineTrace("r", 48, 3)
    engine.stamp(True)
    engine.end(None, [], None)
    assert rr.span is None and not engine.active
    assert spans.get_finished_spans() == ()


def test_metrics_of_an_answered_and_a_failed_request():
    m = fake_metrics(obs.ROUTER_METRICS)
    obs.record_request(m, "Generate", OUTCOME, 1.5)
    obs.record_request(m, "Generate", obs.Outcome(code="RESOURCE_EXHAUSTED"), 0.01)
    assert [(v, t) for _, v, t in m["requests"].calls] == [
        (1.0, {"rpc": "Generate", "code": "OK"}),
        (1.0, {"rpc": "Generate", "code": "RESOURCE_EXHAUSTED"}),
    ]
    assert values(m["generation_tokens"], "inc") == [40] and values(m["prompt_tokens"], "inc") == [5]
    assert values(m["canvases"], "inc") == [3]
    assert values(m["steps_per_canvas"]) == [12, 7, 30]  # one observation per canvas
    assert values(m["request_latency_seconds"]) == [1.5]  # the failure is counted, not timed
    assert values(m["time_to_first_canvas_seconds"]) == [0.25]
    assert values(m["request_tokens_per_second"]) == [80.0]
    assert values(m["tokens_per_forward"]) == [pytest.approx(40 / 49)]


def test_engine_metrics_per_iteration():
    e = obs.EnginePrometheus(1 << 30, factory=fake_metrics)
    e.iteration(rows=0, queued=3, active=2, kv_used=100)  # prefill only: no decoder forward
    e.iteration(rows=5, queued=1, active=5, kv_used=300)
    assert values(e.m["rows_per_forward"]) == [5] and len(e.m["forwards"].calls) == 1
    assert values(e.m["queue_depth"], "set") == [0, 3, 1]  # zero at start, so the series exists
    assert values(e.m["kv_cache_used_bytes"], "set") == [0, 100, 300]
    assert values(e.m["kv_cache_budget_bytes"], "set") == [1 << 30] * 3
    e.idle(queued=0, active=0, kv_used=0)  # just set: not again yet
    e.last_set -= e.REFRESH_S
    e.idle(queued=0, active=0, kv_used=0)  # idle for a while: gauges set again so Ray keeps the series
    assert values(e.m["queue_depth"], "set") == [0, 3, 1, 0]


def test_engine_metrics_count_cuda_graph_captures_and_replays_from_running_totals():
    e = obs.EnginePrometheus(1, factory=fake_metrics)
    e.cuda_graphs({})  # CPU: no graphs, nothing recorded
    e.cuda_graphs({"decoder": (1, 0)})
    e.cuda_graphs({"decoder": (1, 4)})
    e.cuda_graphs({"decoder": (1, 4)})  # nothing new
    e.cuda_graphs({"decoder": (2, 9), "step": (1, 3)})
    assert values(e.m["cuda_graph_captures"], "inc") == [1, 1, 1]
    assert values(e.m["cuda_graph_replays"], "inc") == [4, 5, 3]
    tags = [t for _, _, t in e.m["cuda_graph_replays"].calls]
    assert tags == [{"kind": "decoder"}, {"kind": "decoder"}, {"kind": "step"}]


def test_engine_trace_builds_queue_prefill_and_canvas_spans(provider, spans):
    with provider.get_tracer("test").start_as_current_span("replica_handle_request Engine") as parent:
        engine = obs.EngineTrace("req-1", 48, 5)
    t0 = time.monotonic()
    canvases = [
        CanvasEvent(0, list(range(16)), 12, False, t0 + 0.02),
        CanvasEvent(1, [1, 2], 48, True, t0 + 0.05),
    ]
    engine.canvas_ends = [t0 + 0.04, t0 + 0.09]  # as `stamp` would have taken them
    time.sleep(0.1)
    final = FinalEvent("length", 5, 18, [12, 48], 18 / 60, 0.09, time.monotonic() - t0, 0.01)
    engine.end(final, canvases, None)
    engine.end(final, canvases, None)  # a second end (the generator's finally) changes nothing
    got = finished(spans)
    root = got["engine.generate"][0]
    assert root.parent.span_id == parent.get_span_context().span_id
    assert root.attributes["blockserve.request_id"] == "req-1"
    queue, prefill = got["engine.queue_wait"][0], got["engine.prefill"][0]
    c0, c1 = sorted(got["engine.canvas"], key=lambda s: s.attributes["blockserve.canvas_index"])
    for span in (queue, prefill, c0, c1):
        assert span.parent.span_id == root.context.span_id
    assert queue.end_time == prefill.start_time and prefill.end_time == c0.start_time
    assert (c0.end_time - c0.start_time) == pytest.approx(20e6, abs=1e3)
    assert c0.end_time <= c1.start_time
    assert c0.attributes["blockserve.early_stop"] and not c1.attributes["blockserve.early_stop"]
    assert (
        c0.attributes["blockserve.tokens_per_forward"] == 16 / 12 and c1.attributes["blockserve.steps"] == 48
    )


def test_engine_trace_of_a_failed_request(provider, spans):
    with provider.get_tracer("test").start_as_current_span("parent"):
        engine = obs.EngineTrace("req-2", 48, 5)
    engine.end(*obs.engine_outcome([ErrorEvent("the engine queue is full", "RESOURCE_EXHAUSTED")]))
    root = finished(spans)["engine.generate"][0]
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["rpc.grpc.status_code"] == "RESOURCE_EXHAUSTED"


def test_request_log_line_has_no_prompt_unless_asked(caplog):
    caplog.set_level(logging.INFO, logger="blockserve.requests")
    quiet = obs.RouterRequest("Generate", None, obs.RequestLogSettings())
    quiet.identify("id-1", "my secret prompt")
    quiet.finish(OUTCOME)
    loud = obs.RouterRequest("Generate", None, obs.RequestLogSettings(include_prompt=True))
    loud.identify("id-2", "my secret prompt")
    loud.finish(obs.Outcome(code="INVALID_ARGUMENT", message="bad"))
    first, second = (json.loads(r.getMessage()) for r in caplog.records)
    assert first["request_id"] == "id-1" and first["status"] == "OK"
    assert (first["completion_tokens"], first["canvases"], first["steps"]) == (40, 3, 49)
    assert (
        first["seconds"] >= 0 and "prompt" not in first and "my secret" not in caplog.records[0].getMessage()
    )
    assert second["prompt"] == "my secret prompt" and second["error"] == "bad"


def test_outcome_of_exceptions():
    import asyncio

    assert obs.outcome_of_exception(asyncio.CancelledError()).code == "CANCELLED"
    assert obs.outcome_of_exception(GeneratorExit()).code == "CANCELLED"
    assert obs.outcome_of_exception(KeyError("x")).code == "INTERNAL"


def test_tokens_per_expert_are_added_as_deltas_of_the_backends_totals():
    e = obs.EnginePrometheus(1, factory=fake_metrics)
    load = [[3, 0, 5], [1, 2, 0]]  # [layer][expert] running totals
    e.expert_load(lambda: load)
    load = [[4, 0, 5], [1, 2, 7]]
    e.expert_load(lambda: load)  # within EXPERT_EVERY_S: not read
    e.experts_read -= e.EXPERT_EVERY_S
    e.expert_load(lambda: load)
    calls = [(v, t["expert"]) for _, v, t in e.m["expert_tokens"].calls]
    assert calls == [(4, "0"), (2, "1"), (5, "2"), (1, "0"), (7, "2")]


def test_generic_span_only_under_a_sampled_parent(provider, spans):
    with obs.span("expert_shard.forward"):
        pass
    with provider.get_tracer("test").start_as_current_span("engine") as parent:
        with obs.span("expert_shard.forward", **{"blockserve.shard": 1}):
            pass
    (shard,) = spans.get_finished_spans()[:1]
    assert shard.name == "expert_shard.forward" and shard.parent.span_id == parent.get_span_context().span_id
    assert len([s for s in spans.get_finished_spans() if s.name == "expert_shard.forward"]) == 1


class Shards:
    """Running per-shard totals as `ShardedExperts.shard_totals` returns them; `work()` is one step's calls."""

    def __init__(self):
        self.totals = [[0, 2, 0, 0, 0.0], [2, 8, 0, 0, 0.0]]  # first, stop, calls, tokens, compute_s
        self.reads = 0

    def read(self):
        self.reads += 1
        return [tuple(t) for t in self.totals]

    def work(self, shard, calls, tokens):
        t = self.totals[shard]
        t[2], t[3], t[4] = t[2] + calls, t[3] + tokens, t[4] + 0.001 * calls


def _step(steps: obs.ShardSteps, shards: Shards, work, seconds=0.01):
    steps.before()
    t0 = time.monotonic()
    for args in work:
        shards.work(*args)
    while time.monotonic() - t0 < seconds:
        pass
    steps.after(time.monotonic() - t0)


def test_expert_shard_spans_per_canvas_from_traced_steps_only(provider, spans):
    shards = Shards()
    steps = obs.ShardSteps(shards.read)
    _step(steps, shards, [(0, 4, 40)])  # no sampled request in the Engine: nothing read, nothing kept
    assert shards.reads == 0 and not steps.steps
    with provider.get_tracer("test").start_as_current_span("replica_handle_request Engine"):
        engine = obs.EngineTrace("req-3", 48, 5, steps)
    t0 = time.monotonic()
    _step(steps, shards, [(0, 4, 40), (1, 4, 12)])  # canvas 0: both shards
    _step(steps, shards, [(1, 4, 9)])
    t1 = time.monotonic()
    _step(steps, shards, [(0, 4, 7)])  # canvas 1: shard 0 only
    t2 = time.monotonic()
    engine.canvas_ends = [t1, t2]
    canvases = [CanvasEvent(0, [1] * 8, 2, False, t0), CanvasEvent(1, [1] * 8, 1, True, t1)]
    final = FinalEvent("length", 5, 16, [2, 1], 16 / 3, 0.0, time.monotonic() - t0 + 0.001, 0.0)
    engine.end(final, canvases, None)
    got = finished(spans)
    by_canvas = {c.attributes["blockserve.canvas_index"]: c for c in got["engine.canvas"]}
    work = {}
    for s in got["expert_shard"]:
        canvas = next(i for i, c in by_canvas.items() if c.context.span_id == s.parent.span_id)
        a = s.attributes
        work[(canvas, a["blockserve.experts"])] = (a["blockserve.steps"], a["blockserve.shard_calls"])
        assert a["blockserve.batch_tokens"] > 0
    assert work == {(0, "0-1"): (1, 4), (0, "2-7"): (2, 8), (1, "0-1"): (1, 4)}
    assert not steps.traced and not steps.steps  # the last sampled request left: nothing kept


def test_untraced_context_drops_the_trace_and_the_rpc(provider):
    import asyncio

    async def main():
        with provider.get_tracer("test").start_as_current_span("rpc"):
            rr = obs.RouterRequest("Generate", None, obs.RequestLogSettings(enabled=False))
            seen = {}

            async def background():
                seen["recording"] = trace.get_current_span().is_recording()
                seen["rpc"] = obs.router_request()

            await asyncio.get_running_loop().create_task(background(), context=obs.untraced_context())
            assert trace.get_current_span().is_recording() and obs.router_request() is rr  # caller unchanged
            rr.finish(obs.Outcome())
        return seen

    seen = asyncio.run(main())
    assert seen == {"recording": False, "rpc": obs.router_request()}
