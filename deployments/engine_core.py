"""One engine iteration: the Scheduler plans, the ModelRunner executes, the Scheduler applies the result.

`EngineCore` pairs the host bookkeeping (deployments/scheduler.py) with the device side
(deployments/model_runner.py) for one model. It is what the Engine's background thread drives, and what benches
and tests drive in-process (no Ray, no gRPC, no threads).
"""

from __future__ import annotations

import functools
import time

import torch

from deployments.model_runner import ModelRunner
from deployments.scheduler import EngineRequest, IterationStats, Scheduler, SchedulerLimits, Sink
from model.transformer import DiffusionGemma


class EngineCore:
    def __init__(
        self,
        model: DiffusionGemma,
        limits: SchedulerLimits,
        cuda_graphs: bool = True,
        step_graphs: bool = False,
    ):
        """`cuda_graphs`, `step_graphs`: see ModelRunner (only on CUDA; off for a model whose experts are remote)."""
        itemsize = torch.empty((), dtype=model.dtype).element_size()
        # admission reserves what the KV path really allocates per sequence: pool pages + attention workspace
        # (a row's attention workspace grows with the key groups it reads: its own context and its prompt pieces)
        reservation = functools.partial(model.kv_reservation_bytes, new_tokens=limits.prefill_chunk)
        self.scheduler = Scheduler(model.config, limits, kv_itemsize=itemsize, kv_reservation=reservation)
        if model.device.type == "cuda":
            # size the pool once for the whole budget, so it never reallocates (and never doubles) under load;
            # on CPU it grows on demand instead, so a small demo does not hold the whole budget
            model.kv_pool.reserve_for(limits.kv_cache_bytes, limits.max_rows)
        self.runner = ModelRunner(model, limits.max_rows, cuda_graphs, step_graphs)

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        self.scheduler.submit(request, sink)

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def iterate(self) -> IterationStats:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        result = self.runner.execute(plan)
        finished = self.scheduler.update(plan, result)
        seconds = time.perf_counter() - t0
        self.scheduler.record_iteration(plan, seconds)  # the same iteration time the stats report
        return IterationStats(len(plan.denoise), len(plan.encode), plan.encoded_tokens, finished, seconds)

    def fail_all(self, message: str, code: str = "INTERNAL") -> None:
        """Every request in flight hears of the failure; every cache and row is dropped."""
        try:
            self.scheduler.fail_all(message, code=code)
        finally:
            self.runner.reset()

    # counters and queues, read by stats, metrics and benches
    @property
    def active(self):
        return self.scheduler.active

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def reserved(self) -> int:
        return self.scheduler.reserved

    @property
    def forwards(self) -> int:
        return self.scheduler.forwards

    @property
    def rows_forwarded(self) -> int:
        return self.scheduler.rows_forwarded

    @property
    def tokens_delivered(self) -> int:
        return self.scheduler.tokens_delivered

    @property
    def max_rows_seen(self) -> int:
        return self.scheduler.max_rows_seen
