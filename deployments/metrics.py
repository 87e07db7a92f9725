"""Prometheus metrics of the Router and the Engine (`blockserve_*`, through `ray.serve.metrics`).

Ray exports them on its metrics port with a `ray_` prefix (counters also get `_total`); Serve adds the
`deployment`, `replica` and `application` tags. The Router records per-request metrics when an RPC ends
(`record_request`, from an `Outcome`), the Engine its per-iteration ones (`EnginePrometheus`, from the scheduler
thread). `METRICS` lists every metric, for the dashboard and its test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Bucket edges (all > 0: Ray rejects 0). Seconds for latencies; counts for steps and rows.
LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300]
TOKENS_PER_SECOND_BUCKETS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
STEPS_BUCKETS = [1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128]
TOKENS_PER_FORWARD_BUCKETS = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256]
ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as registered; Prometheus shows `ray_<name>` (+ `_total` / `_bucket` / `_sum` / `_count`)
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


ROUTER_METRICS = (
    MetricSpec(
        "blockserve_requests", "counter", "Finished RPCs by method and gRPC status code", ("rpc", "code")
    ),
    MetricSpec("blockserve_prompt_tokens", "counter", "Prompt tokens of finished requests", ("rpc",)),
    MetricSpec("blockserve_generation_tokens", "counter", "Completion tokens delivered", ("rpc",)),
    MetricSpec("blockserve_canvases", "counter", "Canvases committed for finished requests", ("rpc",)),
    # Exact totals beside the histograms: Ray 2.60 exports a histogram's `_sum` from bucket midpoints, so
    # means are taken from these counters (steps per canvas = steps / canvases, tokens per step = tokens / steps).
    MetricSpec("blockserve_denoising_steps", "counter", "Denoising steps of finished requests", ("rpc",)),
    MetricSpec(
        "blockserve_time_to_first_canvas_seconds",
        "histogram",
        "Submit to first committed canvas, inside the Engine (Final.stats.time_to_first_canvas_s)",
        ("rpc",),
        tuple(LATENCY_BUCKETS_S),
    ),
    MetricSpec(
        "blockserve_request_latency_seconds",
        "histogram",
        "End-to-end latency at the Router: RPC start to final event",
        ("rpc",),
        tuple(LATENCY_BUCKETS_S),
    ),
    MetricSpec(
        "blockserve_request_tokens_per_second",
        "histogram",
        "Per-request stream rate (Final.stats.tokens_per_second)",
        ("rpc",),
        tuple(TOKENS_PER_SECOND_BUCKETS),
    ),
    MetricSpec(
        "blockserve_steps_per_canvas",
        "histogram",
        "Denoising steps each canvas took (one observation per canvas)",
        ("rpc",),
        tuple(STEPS_BUCKETS),
    ),
    MetricSpec(
        "blockserve_tokens_per_forward",
        "histogram",
        "Per-request completion tokens per denoising step (Final.stats.tokens_per_forward)",
        ("rpc",),
        tuple(TOKENS_PER_FORWARD_BUCKETS),
    ),
)
ENGINE_METRICS = (
    MetricSpec(
        "blockserve_rows_per_forward",
        "histogram",
        "Canvases denoised together in one batched decoder forward",
        (),
        tuple(ROWS_BUCKETS),
    ),
    MetricSpec("blockserve_forwards", "counter", "Batched decoder forwards run"),
    MetricSpec(
        "blockserve_rows_forwarded", "counter", "Rows over all forwards (mean rows per forward = / forwards)"
    ),
    MetricSpec("blockserve_queue_depth", "gauge", "Requests waiting for a row"),
    MetricSpec("blockserve_active_rows", "gauge", "Requests holding a row (prefilling or denoising)"),
    MetricSpec("blockserve_kv_cache_used_bytes", "gauge", "KV-cache bytes reserved by admitted requests"),
    MetricSpec("blockserve_kv_cache_budget_bytes", "gauge", "KV-cache budget of the Engine"),
    MetricSpec(
        "blockserve_expert_tokens",
        "counter",
        "Tokens routed to each expert, all layers (fused and disaggregated modes)",
        ("expert",),
    ),
    MetricSpec(
        "blockserve_cuda_graph_replays",
        "counter",
        "Denoising steps whose decoder forward (kind=decoder) or whole device work (kind=step) replayed a CUDA graph",
        ("kind",),
    ),
    MetricSpec(
        "blockserve_cuda_graph_captures",
        "counter",
        "CUDA graphs captured: batch compositions that held for a second step (kind=decoder or step)",
        ("kind",),
    ),
)
METRICS = ROUTER_METRICS + ENGINE_METRICS


def _make(spec: MetricSpec):
    from ray.serve import metrics  # imported late: unit tests of other classes need no Ray

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
    return metrics.Histogram(spec.name, spec.description, list(spec.buckets), tag_keys=spec.tags)


def make_metrics(specs: tuple[MetricSpec, ...]) -> dict[str, Any]:
    return {s.name.removeprefix("blockserve_"): _make(s) for s in specs}


class EnginePrometheus:
    """Per-iteration Engine metrics, recorded from the scheduler thread (Ray's recorders are thread-safe)."""

    # Ray 2.60 drops a gauge series that was not set again within two export intervals, so an idle Engine
    # re-sets its gauges this often.
    REFRESH_S = 0.5
    EXPERT_EVERY_S = 1.0

    def __init__(self, kv_budget_bytes: int, factory: Callable = make_metrics):
        self.m = factory(ENGINE_METRICS)
        self.kv_budget_bytes = kv_budget_bytes
        self.last_set = 0.0
        self.experts_read = 0.0
        self.expert_totals: list[int] | None = None
        self.graph_totals: dict[str, tuple[int, int]] = {}
        self.state(0, 0, 0)  # the series exist (at zero) before the first request

    def state(self, queued: int, active: int, kv_used: int) -> None:
        self.m["queue_depth"].set(queued)
        self.m["active_rows"].set(active)
        self.m["kv_cache_used_bytes"].set(kv_used)
        self.m["kv_cache_budget_bytes"].set(self.kv_budget_bytes)
        self.last_set = time.monotonic()

    def idle(self, queued: int, active: int, kv_used: int) -> None:
        if time.monotonic() - self.last_set >= self.REFRESH_S:
            self.state(queued, active, kv_used)

    def expert_load(self, read: Callable[[], list[list[int]]]) -> None:
        """Add the tokens routed to each expert since the last call, at most every EXPERT_EVERY_S.

        `read()` returns the MoE backend's running totals `[layer][expert]`; reading and 128 counter updates
        per second cost far less than one update per expert per layer per step would."""
        now = time.monotonic()
        if now - self.experts_read < self.EXPERT_EVERY_S:
            return
        self.experts_read = now
        totals = [sum(column) for column in zip(*read(), strict=True)]
        counter = self.m["expert_tokens"]
        for expert, (new, old) in enumerate(
            zip(totals, self.expert_totals or [0] * len(totals), strict=True)
        ):
            if new > old:
                counter.inc(new - old, tags={"expert": str(expert)})
        self.expert_totals = totals

    def cuda_graphs(self, totals: dict[str, tuple[int, int]]) -> None:
        """Add the captures and replays since the last call; `totals`: kind -> (captures, replays) so far (the
        runner's running counts; empty off CUDA)."""
        for kind, (captures, replays) in totals.items():
            old_captures, old_replays = self.graph_totals.get(kind, (0, 0))
            if captures > old_captures:
                self.m["cuda_graph_captures"].inc(captures - old_captures, tags={"kind": kind})
            if replays > old_replays:
                self.m["cuda_graph_replays"].inc(replays - old_replays, tags={"kind": kind})
            self.graph_totals[kind] = (captures, replays)

    def iteration(self, rows: int, queued: int, active: int, kv_used: int) -> None:
        if rows:  # an iteration that only prefilled ran no decoder forward
            self.m["rows_per_forward"].observe(rows)
            self.m["forwards"].inc()
            self.m["rows_forwarded"].inc(rows)
        self.state(queued, active, kv_used)


@dataclass
class Outcome:
    """What a finished RPC reports (Final.usage / Final.stats, or the error)."""

    code: str = "OK"  # grpc.StatusCode name
    message: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps_per_canvas: tuple[int, ...] = ()
    time_to_first_canvas_s: float = 0.0
    tokens_per_second: float = 0.0
    tokens_per_forward: float = 0.0


def record_request(m: dict, rpc: str, o: Outcome, seconds: float) -> None:
    m["requests"].inc(tags={"rpc": rpc, "code": o.code})
    if o.code != "OK":  # latency and token histograms describe answered requests only
        return
    tags = {"rpc": rpc}
    m["prompt_tokens"].inc(o.prompt_tokens, tags=tags)
    if o.completion_tokens:
        m["generation_tokens"].inc(o.completion_tokens, tags=tags)
    if o.steps_per_canvas:
        m["canvases"].inc(len(o.steps_per_canvas), tags=tags)
        m["denoising_steps"].inc(sum(o.steps_per_canvas), tags=tags)
        m["time_to_first_canvas_seconds"].observe(o.time_to_first_canvas_s, tags=tags)
        m["tokens_per_forward"].observe(o.tokens_per_forward, tags=tags)
        m["request_tokens_per_second"].observe(o.tokens_per_second, tags=tags)
    for steps in o.steps_per_canvas:
        m["steps_per_canvas"].observe(steps, tags=tags)
    m["request_latency_seconds"].observe(seconds, tags=tags)


def outcome_of_final(final) -> Outcome:
    """An answered request's Outcome from its `pb.Final` (usage and stats exactly as the client got them)."""
    from protos.blockserve.v1 import blockserve_pb2 as pb

    s = final.stats
    return Outcome(
        finish_reason=pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower(),
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        steps_per_canvas=tuple(s.steps_per_canvas),
        time_to_first_canvas_s=s.time_to_first_canvas_s,
        tokens_per_second=s.tokens_per_second,
        tokens_per_forward=s.tokens_per_forward,
    )


def outcome_of_exception(e: BaseException) -> Outcome:
    """A request that ended by an exception other than a mapped failure: the client left, or a bug."""
    import asyncio

    if isinstance(e, GeneratorExit | asyncio.CancelledError):
        return Outcome(code="CANCELLED", message="the client went away before the answer was complete")
    return Outcome(code="INTERNAL", message=f"{type(e).__name__}: {e}")
