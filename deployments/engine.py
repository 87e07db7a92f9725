"""The Engine: one model replica running the continuous-batching scheduler.

A plain class (Ray Serve LLM's `LLMServer` habit): it can be built and driven without Serve, and
cluster/app.py wraps it with `serve.deployment(...)`. Its iterations (deployments/engine_core.py: the Scheduler's
plan, the ModelRunner's step) run in one background thread that owns the model; callers talk to it only through a queue, so the asyncio loop that
serves requests never blocks on a forward pass. `generate()` is an async generator of scheduler events; when
its consumer goes away (client cancelled, deadline passed) the request is cancelled and its row freed at the
next iteration.

Reliability (kept apart from the scheduling so the two evolve independently): every inbox operation and every
event sink is guarded, so one bad request fails alone; every request carries a deadline and a lease
(deployments/leases.py) checked once per loop, and an expired one is freed through `Scheduler.cancel` whatever
Serve delivered or dropped; `ready()` and `check_health()` are one rule, so Serve restarts a broken engine and a
recovered one serves again.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from deployments import observability as obs
from deployments.engine_core import EngineCore
from deployments.engine_metrics import EngineMetrics, MetricsSettings
from deployments.experts import LocalExperts, ShardedExperts, ShardsUnavailable, micro_batched
from deployments.leases import LeaseTable
from deployments.load_adaptive import AdaptiveSettings, LoadAdapter, annotate
from deployments.scheduler import (
    CanvasEvent,
    EngineRequest,
    ErrorEvent,
    Event,
    FinalEvent,
    QueueFull,
    RequestTooLarge,
    SchedulerLimits,
)
from deployments.shard_client import ActorShardClient, ServeShardClient, ShardRoute
from model import gemm
from model.structured.warmup import warm_up
from model.weights import load_model

log = logging.getLogger("blockserve.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (the published checkpoint's dtype; kernels accumulate in fp32), float32 on CPU
    (CPU bf16 GEMMs are slower than fp32 and the CPU path is the exactness reference)."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


@dataclass
class EngineSettings:
    model_path: str
    dtype: str = "auto"
    device: str = "cpu"
    gemm_kernels: str = "batch_invariant"  # model/gemm.py KINDS
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)
    torch_threads: int = 0  # 0: leave torch's default
    stats_window_s: float = 10.0
    execution_mode: str = "fused"  # "disaggregated": experts on ExpertShard deployments (`shards`)
    micro_batches: int = 2  # disaggregated: micro-batches of rows in flight per denoising step
    shards: list[ShardRoute] = field(default_factory=list)
    transport: str = "actor"  # "actor" | "serve" (deployments/shard_client.py)
    shard_timeout_s: float = 30.0  # one shard call, before it is retried on another replica
    shard_wait_s: float = 60.0  # how long a shard may have no live replica before requests fail UNAVAILABLE
    slo_tokens_per_second: float = 0.0  # per-request stream rate the autoscaler sizes for (0: no SLO)
    slo_time_to_first_canvas_s: float = 0.0  # the SLO's first-canvas term (0: none)
    load_adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)  # off by default
    max_request_s: float = 0.0  # deadline of a request that brings none; 0 = none
    # replay a steady batch's decoder forward as a CUDA graph (CUDA, fused mode only)
    cuda_graphs: bool = True
    # with cuda_graphs: the whole step as the graph (not yet validated on a GPU, so off by default)
    cuda_step_graphs: bool = False


def remote_experts(settings: EngineSettings, handles: list | None, num_layers: int) -> ShardedExperts:
    """The disaggregated MoE backend: one client per shard over the configured transport."""
    s = settings
    if s.transport == "serve":
        if not handles or len(handles) != len(s.shards):
            raise ValueError("the serve transport needs one DeploymentHandle per expert shard")
        clients = [ServeShardClient(h, s.shard_timeout_s, s.shard_wait_s) for h in handles]
    else:
        clients = [ActorShardClient(r, s.shard_timeout_s, s.shard_wait_s) for r in s.shards]
    return ShardedExperts([range(r.first, r.stop) for r in s.shards], clients, num_layers)


def _guarded(sink):
    """A sink that cannot raise into the scheduler thread: a broken caller fails alone (its events are lost)."""

    def guarded(event) -> None:
        try:
            sink(event)
        except Exception:
            log.exception("an event sink failed; dropping %s", type(event).__name__)

    return guarded


class Engine:
    def __init__(self, settings: EngineSettings, shards: list | None = None):
        """`shards`: the ExpertShard deployments' handles (disaggregated mode with the serve transport)."""
        dtype = resolve_dtype(settings.dtype, settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        # before the first product on the device: a step must not switch kernels half-way (model/gemm.py)
        gemm.configure(settings.device, settings.gemm_kernels)
        self.experts: ShardedExperts | LocalExperts
        if settings.execution_mode == "disaggregated":
            # attention, dense MLP and routers only: not one expert byte is read here
            self.model = load_model(
                settings.model_path, dtype=dtype, device=settings.device, experts=range(0)
            )
            self.experts = remote_experts(settings, shards, self.model.config.num_layers)
            self.model.moe_backend = self.experts
            micro_batched(self.model, settings.micro_batches)
        else:
            self.model = load_model(settings.model_path, dtype=dtype, device=settings.device)
            self.experts = LocalExperts(self.model)
            self.model.moe_backend = self.experts
        warm_up()  # structured output's compiled loops, so the first constrained request does not compile them
        # remote experts (disaggregated mode) cannot be captured
        graphs = settings.cuda_graphs and settings.execution_mode == "fused"
        self.core = EngineCore(
            self.model, settings.limits, cuda_graphs=graphs, step_graphs=settings.cuda_step_graphs
        )
        self.scheduler = self.core.scheduler  # the host bookkeeping: queues, rows, counters
        self._prometheus = obs.EnginePrometheus(settings.limits.kv_cache_bytes)
        self._shard_steps = obs.ShardSteps(getattr(self.experts, "shard_totals", None))  # traced steps only
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: str | None = None  # the last iteration's failure; cleared by the next good iteration
        self._leases = LeaseTable()
        self._sinks: dict[str, object] = {}  # request id -> its guarded sink, for expiry errors
        self.expired = 0
        self._window: deque[tuple[float, int, int]] = deque()  # (time, tokens delivered, rows) per iteration
        self._busy_s = 0.0  # seconds spent in iterations (the per-step time split of bench/disaggregated.py)
        self.metrics = EngineMetrics(
            MetricsSettings(
                window_s=settings.stats_window_s,
                slo_tokens_per_second=settings.slo_tokens_per_second,
                max_rows=settings.limits.max_rows,
                canvas_length=self.model.config.canvas_length,
            )
        )
        self.adapter = LoadAdapter(
            settings.load_adaptive,
            self.record_autoscaling_stats,
            settings.slo_time_to_first_canvas_s,
            time.monotonic,
        )
        self._thread = threading.Thread(target=self._run, name="blockserve-engine", daemon=True)
        self._thread.start()

    # -- the scheduler thread ----------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                op, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:  # one bad operation fails alone; the thread and every other request carry on
                self._apply(op, *args)
            except Exception:
                log.exception("engine inbox operation %r failed", op)
                if op == "submit":
                    _guarded(args[1])(ErrorEvent("the engine could not take this request", "INTERNAL"))

    def _apply(self, op: str, *args) -> None:
        if op == "submit":
            request, sink, timeout_s, lease_s = args
            sink = self._ending(request.request_id, _guarded(self.metrics.observe(request.request_id, sink)))
            try:
                self.scheduler.submit(request, sink)
            except QueueFull as e:
                sink(ErrorEvent(str(e), "RESOURCE_EXHAUSTED"))
                return
            except (RequestTooLarge, ValueError) as e:
                sink(ErrorEvent(str(e), "INVALID_ARGUMENT"))
                return
            self._leases.add(
                request.request_id, time.monotonic(), timeout_s or self.settings.max_request_s, lease_s
            )
            self._sinks[request.request_id] = sink
        elif op == "cancel":
            self._forget(args[0])
            self.scheduler.cancel(args[0])
            self.metrics.forget(args[0])
        elif op == "renew":
            self._leases.renew(args[0], time.monotonic())

    def _ending(self, request_id: str, sink):
        """The request's last event also drops its lease (sinks run on this thread)."""

        def sink_and_forget(event) -> None:
            sink(event)
            if isinstance(event, FinalEvent | ErrorEvent):
                self._forget(request_id)

        return sink_and_forget

    def _forget(self, request_id: str) -> None:
        self._leases.remove(request_id)
        self._sinks.pop(request_id, None)

    def _expire(self) -> None:
        """Free every request past its deadline or lease (the Router or its client is gone, or too slow)."""
        for rid, why in self._leases.expired(time.monotonic()):
            self.expired += 1
            self.scheduler.cancel(rid)
            self.metrics.forget(rid)
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink(ErrorEvent(f"request {rid} was stopped: {why}", "DEADLINE_EXCEEDED"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            self._expire()
            if not self.scheduler.has_work:
                s = self.scheduler
                self._prometheus.idle(len(s.waiting), len(s.active), s.reserved)
                self._prometheus.expert_load(lambda: self.experts.stats()["expert_load"])
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                before = self.scheduler.tokens_delivered
                self._shard_steps.before()
                stats = self.core.iterate()
                self._shard_steps.after(stats.seconds)
                self._record(self.scheduler.tokens_delivered - before, stats.rows)
                self._busy_s += stats.seconds
                self.metrics.on_iteration(stats.rows, stats.seconds, self.scheduler.tokens_delivered - before)
                self._error = None  # a good iteration after a failure: the engine has recovered
                s = self.scheduler
                self._prometheus.iteration(stats.rows, len(s.waiting), len(s.active), s.reserved)
                self._prometheus.expert_load(lambda: self.experts.stats()["expert_load"])
                self._prometheus.cuda_graphs(self.core.runner.graph_counts())
            except ShardsUnavailable as e:  # not the Engine's fault: fail what is in flight, keep serving
                log.error("expert shards unavailable: %s", e)
                self._fail_all(f"expert shards unavailable, retry: {e}", code="UNAVAILABLE")
            except Exception as e:  # a failed forward must not hang every client: fail them all loudly
                log.exception("engine iteration failed")
                self._error = f"engine iteration failed: {type(e).__name__}: {e}"
                self._fail_all(self._error)

    def _fail_all(self, message: str, code: str = "INTERNAL") -> None:
        try:
            self.core.fail_all(message, code=code)  # sinks are guarded, so every request hears of it
        except Exception:
            log.exception("failing the engine's requests failed")
        self._leases = LeaseTable()
        self._sinks.clear()

    def _record(self, tokens: int, rows: int) -> None:
        now = time.monotonic()
        self._window.append((now, tokens, rows))
        while self._window and self._window[0][0] < now - self.settings.stats_window_s:
            self._window.popleft()

    # -- the caller side ---------------------------------------------------------------------------------
    async def generate(
        self, request: EngineRequest, timeout_s: float | None = None, lease_s: float | None = None
    ) -> AsyncIterator[list[Event]]:
        """Events of one request, batched. `timeout_s`: its deadline from now (else `max_request_s`);
        `lease_s`: it is freed unless `renew` names it at least this often."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        adaptation = self.adapter.adapt(request)  # load-adaptive sampling (None when off or unpressed)
        span = obs.EngineTrace(
            request.request_id,
            request.params.max_denoising_steps,
            len(request.prompt_ids),
            self._shard_steps,
        )

        def sink(event: Event) -> None:
            span.stamp(isinstance(event, CanvasEvent))  # canvas end times, taken in the scheduler thread
            try:  # the caller's loop may be gone (replica shutting down): that must not reach the scheduler
                loop.call_soon_threadsafe(events.put_nowait, event)
            except Exception as e:
                log.warning("dropping an event for request %s: %s", request.request_id, e)

        self._inbox.put(("submit", request, sink, timeout_s, lease_s))
        self._wake.set()
        done = False
        seen: list[Event] = []
        try:
            while not done:
                # Everything already queued travels as one item: each streamed item costs ~1 ms of Ray Serve
                # overhead per hop, so a Router that falls behind catches up in one step (and the last canvas
                # always travels with the final event).
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                batch = [annotate(e, adaptation) for e in batch]
                done = any(isinstance(e, FinalEvent | ErrorEvent) for e in batch)
                if span.active:
                    seen.extend(batch)
                    if done:
                        span.end(*obs.engine_outcome(seen))
                yield batch
        finally:
            span.end(*obs.engine_outcome(seen))  # cancelled: what was done so far (no-op once ended)
            if not done:  # consumer left early: free the row
                self._inbox.put(("cancel", request.request_id))
                self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Free a request's row. The Router calls this explicitly when its client goes away: closing the
        streaming call alone does not always reach this generator's `finally` promptly."""
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def renew(self, request_ids: list[str]) -> None:
        """Extend the leases of these requests (the Router calls this while their clients are connected)."""
        self._inbox.put(("renew", list(request_ids)))
        self._wake.set()

    def problem(self) -> str | None:
        """Why this engine cannot serve, or None. The one rule behind `ready()` and `check_health()`."""
        if not self._thread.is_alive():
            return "the engine's scheduler thread is not running"
        return self._error

    def ready(self) -> bool:
        # the engine itself (problem) and, in disaggregated mode, a live replica for every expert shard; shards
        # that are down make the engine NOT_SERVING without Serve restarting it (check_health sees only problem)
        clients = getattr(self.experts, "clients", [])
        return self.problem() is None and all(c.ready() for c in clients)

    def check_health(self) -> None:
        """Ray Serve's replica health check: a broken engine is taken out of rotation and restarted."""
        problem = self.problem()
        if problem is not None:
            raise RuntimeError(problem)

    def stats(self) -> dict[str, float]:
        s = self.scheduler
        window = list(self._window)
        span = max(1e-6, window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
        tokens = sum(w[1] for w in window)
        return {
            "active_rows": float(len(s.active)),
            "queued_requests": float(len(s.waiting)),
            "forwards": float(s.forwards),
            "rows_per_forward": s.rows_forwarded / max(1, s.forwards),
            "max_rows_per_forward": float(s.max_rows_seen),
            "tokens_delivered": float(s.tokens_delivered),
            "tokens_per_second": tokens / span if span else 0.0,
            "kv_reserved_bytes": float(s.reserved),
            "kv_budget_bytes": float(s.limits.kv_cache_bytes),
            "busy_s": self._busy_s,
            "leases": float(len(self._leases)),
            "expired_requests": float(self.expired),
        }

    def expert_stats(self) -> dict:
        """Tokens routed to each expert of each layer (`expert_load[layer][expert]`, padding tokens included);
        in disaggregated mode also the MoE time split (dispatch, expert compute, transfer, combine)."""
        return self.experts.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics hook (deployments/engine_metrics.py says what each is)."""
        s = self.scheduler
        return self.metrics.snapshot(active_rows=len(s.active), queued=len(s.waiting))

    def record_routing_stats(self) -> dict[str, float]:
        """The same readings through Serve's per-replica routing-stats hook, which `blockserve status` reads
        from every replica (a handle call would reach only one)."""
        return self.record_autoscaling_stats()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()
