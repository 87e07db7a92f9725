"""Spans, Prometheus metrics and the one-line request log of the Router and the Engine.

Plain helpers (no cluster/ imports): cluster/telemetry.py decides *whether* spans are exported (it installs
Ray Serve's tracing in every Ray process); this module decides *what* is recorded.

Tracing. Ray Serve opens a span per hop (`proxy_grpc_request` -> `replica_handle_request Router ...` ->
`route_to_replica Engine ...` -> `replica_handle_request Engine ...`) and carries the W3C context through
each handle call. Under them we add:

  Router.<rpc>                  the RPC as the Router saw it: request id, status code, tokens, canvases
    router.validate             validate and normalise the request (deployments/requests.py)
      router.tokenize           each tokenizer.encode call made while validating (the prompt, template text)
    router.detokenize           per committed canvas: tokens -> text, stop strings
    ... Engine hop (Serve's spans) ...
      engine.generate           submit -> final event inside the Engine
        engine.queue_wait       submitted -> admitted to a row
        engine.prefill          admitted -> first canvas starts denoising (prompt prefill, chunked)
        engine.canvas           one per canvas: steps, tokens, tokens per forward, early stop
          expert_shard          disaggregated mode: one per ExpertShard, the shard's calls during the canvas

Spans are made only when the request is sampled: every helper first checks the current span's
`is_recording()` and otherwise returns at once, so tracing off (or a request not sampled) costs a context
lookup per stage. Engine spans are built after the fact from timestamps taken in the scheduler thread, so the
scheduler itself does no tracing work.

ExpertShard calls. One call to a shard carries the tokens of every row of a batched step, for one layer, so a
span per call per request would multiply spans by rows x layers x steps. Instead, while at least one sampled
request is in the Engine (`ShardSteps`; none: a counter check per step), the Engine notes each step's work per
shard (calls, tokens sent, seconds computing: two reads of running totals). When a sampled request ends, each of
its canvases gets one `expert_shard` span per shard, from the first to the last step that overlaps the canvas,
carrying the totals of those steps; they are the batch's totals (the other rows' tokens too), which is what the
shard did while this canvas was denoised.

Metrics live in deployments/metrics.py; the names the Router and the Engine use are re-exported here, so
each imports one module.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from deployments.metrics import (  # noqa: F401  (re-exported: Router and Engine use one module)
    ENGINE_METRICS,
    METRICS,
    ROUTER_METRICS,
    EnginePrometheus,
    Outcome,
    make_metrics,
    outcome_of_exception,
    outcome_of_final,
    record_request,
)

TRACER_NAME = "blockserve"
# A proxy until Ray Serve installs its provider in this process, then the real tracer (OpenTelemetry's API).
_tracer = trace.get_tracer(TRACER_NAME)
request_log = logging.getLogger("blockserve.requests")

# -- the Router's view of one RPC ----------------------------------------------------------------------------


def configure_request_log() -> None:
    """Send request lines to stderr (under Ray: the replica's log file, and the driver's console when
    `log_to_driver`), as bare JSON. Ray leaves non-Serve loggers at Python's default WARNING level."""
    if not request_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
        request_log.setLevel(logging.INFO)
        request_log.propagate = False  # one copy, not a second through whatever the root logger does


@dataclass
class RequestLogSettings:
    enabled: bool = True  # one JSON line per finished request on the `blockserve.requests` logger
    include_prompt: bool = False  # prompts can hold personal data: off unless the operator asks


_current: contextvars.ContextVar[RouterRequest | None] = contextvars.ContextVar(
    "blockserve_router_request", default=None
)


class RouterRequest:
    """One RPC at the Router: its span (when sampled), metrics and log line at the end.

    Made current for the RPC's task (a context variable, not the OpenTelemetry context, which cannot be held
    across an async generator's yields), so helpers deep in the Router find it with `router_request()`."""

    def __init__(self, rpc: str, metrics: dict | None, log: RequestLogSettings, http_method: str = ""):
        """`rpc`: the gRPC method, or the HTTP route (then `http_method` is set: "POST")."""
        self.rpc, self.metrics, self.log = rpc, metrics, log
        self.started = time.perf_counter()
        self.request_id = ""
        self.prompt = ""
        self.outcome: Outcome | None = None
        self.http_status: int | None = None
        parent = trace.get_current_span()
        self.span: Span | None = None
        self.ctx = None
        if parent.is_recording():
            attributes = (
                {"http.request.method": http_method, "http.route": rpc}
                if http_method
                else {"rpc.method": rpc}
            )
            self.span = _tracer.start_span(f"Router.{rpc}", kind=SpanKind.INTERNAL, attributes=attributes)
            self.ctx = trace.set_span_in_context(self.span)
        _current.set(self)

    # -- spans -----------------------------------------------------------------------------------------
    def stage(self, name: str, **attributes) -> Any:
        """A child span around a synchronous block (never across a yield); a no-op when not sampled."""
        if self.span is None:
            return nullcontext()
        return _tracer.start_as_current_span(name, context=self.ctx, attributes=attributes)

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the RPC's span the current context around a synchronous call (e.g. a handle's `.remote()`,
        which hands the current context to the next deployment)."""
        if self.span is None:
            yield
            return
        token = otel_context.attach(self.ctx)
        try:
            yield
        finally:
            otel_context.detach(token)

    def identify(self, request_id: str, prompt: str = "") -> None:
        self.request_id = request_id
        self.prompt = prompt
        if self.span is not None:
            self.span.set_attribute("blockserve.request_id", request_id)

    # -- the end -----------------------------------------------------------------------------------------
    def finish(self, outcome: Outcome, http_status: int | None = None) -> None:
        """Record the RPC once (the first outcome wins: a failure after a final event changes nothing).
        `http_status`: the status an HTTP route answered (its span carries it beside the status code name)."""
        if self.outcome is not None:
            return
        self.outcome, self.http_status = outcome, http_status
        seconds = time.perf_counter() - self.started
        if self.metrics is not None:
            record_request(self.metrics, self.rpc, outcome, seconds)
        if self.span is not None:
            self._end_span(outcome)
        if self.log.enabled:
            request_log.info(self.log_line(outcome, seconds))
        if _current.get() is self:
            _current.set(None)

    def _end_span(self, o: Outcome) -> None:
        span = self.span
        span.set_attributes(
            {
                "rpc.grpc.status_code": o.code,
                "blockserve.finish_reason": o.finish_reason,
                "blockserve.prompt_tokens": o.prompt_tokens,
                "blockserve.completion_tokens": o.completion_tokens,
                "blockserve.canvases": len(o.steps_per_canvas),
                "blockserve.denoising_steps": sum(o.steps_per_canvas),
            }
        )
        if self.http_status is not None:
            span.set_attribute("http.response.status_code", self.http_status)
        if o.code == "OK":
            span.set_status(Status(StatusCode.OK))
        else:
            span.set_status(Status(StatusCode.ERROR, f"{o.code}: {o.message}"))
        span.end()

    def log_line(self, o: Outcome, seconds: float) -> str:
        line = {
            "event": "request_finished",
            "request_id": self.request_id,
            "rpc": self.rpc,
            "status": o.code,
            "finish_reason": o.finish_reason,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
            "canvases": len(o.steps_per_canvas),
            "steps": sum(o.steps_per_canvas),
            "seconds": round(seconds, 4),
        }
        if self.http_status is not None:
            line["http_status"] = self.http_status
        if o.code != "OK":
            line["error"] = o.message[:500]
        if self.span is not None:
            line["trace_id"] = format(self.span.get_span_context().trace_id, "032x")
        if self.log.include_prompt:
            line["prompt"] = self.prompt
        return json.dumps(line)


class _NoRequest:
    """What `router_request()` returns outside an RPC (unit tests calling Router helpers directly)."""

    span = None

    def stage(self, name: str, **attributes):
        return nullcontext()

    def current(self):
        return nullcontext()

    def identify(self, request_id: str, prompt: str = "") -> None:
        pass

    def finish(self, outcome: Outcome, http_status: int | None = None) -> None:
        pass


_NO_REQUEST = _NoRequest()


def router_request() -> RouterRequest | _NoRequest:
    return _current.get() or _NO_REQUEST


def untraced_context() -> contextvars.Context:
    """The current context without a trace or an RPC: for a background task started during a request (the
    Router's lease renewer), whose calls belong to no one request's trace and must not be recorded in it."""
    ctx = contextvars.copy_context()
    ctx.run(otel_context.attach, otel_context.Context())
    ctx.run(_current.set, None)
    return ctx


def span(name: str, **attributes) -> Any:
    """A child of the current span around a synchronous block, when the request is sampled (e.g. an Engine's
    call to an ExpertShard: `with obs.span("expert_shard.forward", **{"blockserve.shard": i}):`)."""
    if not trace.get_current_span().is_recording():
        return nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes)


def traced_encode(encode: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    """`encode` with a `router.tokenize` span per call while a sampled request validates."""

    def wrapper(text: str) -> list[int]:
        if not trace.get_current_span().is_recording():
            return encode(text)
        with _tracer.start_as_current_span("router.tokenize") as span:
            ids = encode(text)
            span.set_attributes({"blockserve.chars": len(text), "blockserve.tokens": len(ids)})
            return ids

    return wrapper


# -- the Engine's view of one request ------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardStep:
    """One Engine step's work on one ExpertShard (monotonic seconds)."""

    start: float
    end: float
    first: int  # the shard's experts [first, stop)
    stop: int
    calls: int
    tokens: int
    compute_s: float


class ShardSteps:
    """Per-step ExpertShard work, noted only while a sampled request is in the Engine.

    `before()` / `after()` run in the scheduler thread around each step; `begin()` / `done()` on the event loop
    as sampled requests come and go. `totals()` returns the disaggregated backend's running totals per shard
    (`ShardedExperts.shard_totals`); None (fused mode) makes every method a no-op."""

    KEEP = 8192  # steps remembered: a sampled request older than this many steps loses its earliest ones

    def __init__(self, totals: Callable[[], list[tuple]] | None):
        self.totals = totals
        self.traced = 0
        self.steps: deque[ShardStep] = deque(maxlen=self.KEEP)
        self._base: list[tuple] | None = None

    def begin(self) -> None:
        if self.totals is not None:
            self.traced += 1

    def done(self) -> None:
        if self.totals is not None:
            self.traced = max(0, self.traced - 1)
            if not self.traced:
                self.steps.clear()

    def before(self) -> None:
        self._base = self.totals() if self.traced else None

    def after(self, seconds: float) -> None:
        base, self._base = self._base, None
        if base is None:
            return
        now = time.monotonic()
        for (first, stop, calls, tokens, compute), old in zip(self.totals(), base, strict=True):
            if calls > old[2]:
                self.steps.append(
                    ShardStep(
                        now - seconds, now, first, stop, calls - old[2], tokens - old[3], compute - old[4]
                    )
                )

    def within(self, start: float, end: float) -> list[ShardStep]:
        """The steps that ran while [start, end] (a canvas's window, stamped inside steps) was open."""
        return [s for s in list(self.steps) if s.start < end and s.end > start]


_NO_SHARDS = ShardSteps(None)


class EngineTrace:
    """Spans of one request inside the Engine, built when it ends from times the scheduler thread stamped.

    `stamp(event)` runs in the scheduler thread (one `time.monotonic()` per canvas); `end(...)` runs on the
    Engine's event loop. Inactive (every method returns at once) unless the request is sampled."""

    def __init__(self, request_id: str, max_steps: int, prompt_tokens: int, shards: ShardSteps = _NO_SHARDS):
        parent = trace.get_current_span()
        self.active = parent.is_recording()
        if not self.active:
            return
        self.shards = shards
        shards.begin()
        self.request_id, self.max_steps = request_id, max_steps
        self.offset_ns = time.time_ns() - time.monotonic_ns()  # monotonic seconds -> epoch ns
        self.submitted = time.monotonic()  # the request goes to the scheduler right after
        self.span = _tracer.start_span(
            "engine.generate",
            attributes={"blockserve.request_id": request_id, "blockserve.prompt_tokens": prompt_tokens},
        )
        self.canvas_ends: list[float] = []

    def _ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self.offset_ns

    def stamp(self, canvas_event: bool) -> None:
        if self.active and canvas_event:
            self.canvas_ends.append(time.monotonic())

    def end(self, final=None, canvases=(), error=None) -> None:
        """`final`: the FinalEvent (or None); `canvases`: the CanvasEvents in order; `error`: (code, message)."""
        if not self.active:
            return
        self.active = False
        if final is not None:
            # from this side's own submit stamp (not "now - total time": the final event reaches this loop
            # later than it was made, which would shift the queue wait past the first canvas's start)
            first_start = getattr(canvases[0], "started_s", 0.0) if canvases else 0.0
            admitted = self.submitted + final.queue_time_s
            if first_start:
                admitted = min(admitted, first_start)
            self._child("engine.queue_wait", self.submitted, admitted)
            if first_start:
                self._child("engine.prefill", admitted, first_start)
            self.span.set_attributes(
                {
                    "blockserve.finish_reason": final.finish_reason,
                    "blockserve.completion_tokens": final.completion_tokens,
                    "blockserve.canvases": len(final.steps_per_canvas),
                    "blockserve.tokens_per_forward": final.tokens_per_forward,
                }
            )
        previous_end = None
        for ev, end in zip(canvases, self.canvas_ends, strict=False):
            start = getattr(ev, "started_s", 0.0) or previous_end or end
            tokens = len(ev.token_ids)
            canvas = self._child(
                "engine.canvas",
                start,
                end,
                {
                    "blockserve.canvas_index": ev.canvas_index,
                    "blockserve.steps": ev.steps,
                    "blockserve.tokens": tokens,
                    "blockserve.tokens_per_forward": tokens / max(1, ev.steps),
                    "blockserve.early_stop": ev.steps < self.max_steps,
                },
            )
            self._shard_spans(canvas, self.shards.within(start, end))
            previous_end = end
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{error[0]}: {error[1]}"))
            self.span.set_attribute("rpc.grpc.status_code", error[0])
        elif final is None:
            self.span.set_attribute("blockserve.cancelled", True)
        self.span.end()
        self.shards.done()  # after the canvases took their steps: the last sampled request clears them

    def _child(
        self, name: str, start: float, end: float, attributes: dict | None = None, parent: Span | None = None
    ) -> Span:
        ctx = trace.set_span_in_context(parent or self.span)
        span = _tracer.start_span(name, context=ctx, start_time=self._ns(start), attributes=attributes)
        span.end(end_time=self._ns(max(start, end)))
        return span

    def _shard_spans(self, canvas: Span, steps: list[ShardStep]) -> None:
        """One `expert_shard` span per shard under a canvas: the shard's work in the canvas's steps."""
        by_shard: dict[tuple[int, int], list[ShardStep]] = {}
        for step in steps:
            by_shard.setdefault((step.first, step.stop), []).append(step)
        for (first, stop), work in sorted(by_shard.items()):
            attributes = {
                "blockserve.experts": f"{first}-{stop - 1}",
                "blockserve.steps": len(work),
                "blockserve.shard_calls": sum(w.calls for w in work),
                "blockserve.batch_tokens": sum(w.tokens for w in work),
                "blockserve.compute_s": sum(w.compute_s for w in work),
            }
            start, end = min(w.start for w in work), max(w.end for w in work)
            self._child("expert_shard", start, end, attributes, parent=canvas)


def engine_outcome(events: list) -> tuple:
    """(final, canvases, error) for `EngineTrace.end` from the events a request has seen so far."""
    final = error = None
    canvases = []
    for ev in events:
        kind = type(ev).__name__
        if kind == "CanvasEvent":
            canvases.append(ev)
        elif kind == "FinalEvent":
            final = ev
        elif kind == "ErrorEvent":
            error = (ev.code, ev.message)
    return final, canvases, error
