"""Rolling-window Engine metrics for autoscaling to a tokens-per-second SLO.

What users of a diffusion LM feel is how fast each stream goes and how long the first canvas takes, not how
many requests are queued. One `EngineMetrics` per Engine is fed from the scheduler thread (one call per
iteration, one per streamed event) and read by Ray Serve's replica through `Engine.record_autoscaling_stats`
(cluster/autoscaling.py turns the readings of every replica into a replica count). Over the last `window_s`:

- delivered tokens/s: committed tokens handed to clients;
- demanded tokens/s: rows in flight plus queued requests, times the SLO's per-request rate;
- per-request stream rate, p50 and p10: one sample per committed canvas after a request's first,
  `canvas_length` over the time since its previous canvas. Whole canvases count, because a request that stops
  early still waited for a whole canvas. The first canvas is the other SLO term:
- time to first canvas (queueing, prefill and the first canvas), p50 and p90, plus the age of the oldest
  request still waiting for its first canvas (a queue that never drains produces no finished samples);
- row occupancy (time-weighted mean of rows / max_rows), steps per canvas, seconds per step;
- capacity: the tokens/s one replica sustains while every row keeps the SLO rate, from a fit of step time
  against rows, `t(R) = a + b R`, over the iterations of a longer window (`capacity_window_s`: a 10 s window
  holds only a few canvases per row), for canvases at that window's p90 of steps per canvas: sized for the
  slow canvases, not the mean one (TokenScale-style capacity learned online).

Thread safety: writers run on the scheduler thread, the reader on the replica's event loop; one lock.
Percentiles are nearest-rank over at most a window of samples (cheap at Ray's ~10 readings per push).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from deployments.scheduler import CanvasEvent, ErrorEvent, Event, FinalEvent

Sink = Callable[[Event], None]


@dataclass
class MetricsSettings:
    window_s: float = 10.0
    capacity_window_s: float = 60.0
    slo_tokens_per_second: float = 0.0  # 0: no SLO configured (demand and capacity are not reported)
    max_rows: int = 64
    canvas_length: int = 256


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def step_time_fit(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares `t(R) = a + b R` over (rows, seconds) samples, with a, b >= 0.

    With a single distinct row count the split between a and b is unknown; assume no batching gain (a = 0,
    time proportional to rows), which can only under-estimate capacity above the rows seen."""
    n = len(samples)
    mean_r = sum(r for r, _ in samples) / n
    mean_t = sum(t for _, t in samples) / n
    var = sum((r - mean_r) ** 2 for r, _ in samples)
    if var < 1e-9:
        return 0.0, mean_t / max(mean_r, 1.0)
    b = sum((r - mean_r) * (t - mean_t) for r, t in samples) / var
    b = max(b, 0.0)
    a = max(mean_t - b * mean_r, 0.0)
    if a == 0.0 and b == 0.0:
        b = mean_t / max(mean_r, 1.0)
    return a, b


def capacity_tokens_per_second(
    a: float, b: float, tokens_per_row_step: float, slo: float, max_rows: int
) -> float:
    """Tokens/s one replica delivers with as many rows as keep each row at `slo` tokens/s.

    Per-row rate at R rows is `tokens_per_row_step / t(R)`; the most rows meeting the SLO is
    R* = (tokens_per_row_step / slo - a) / b. With no measured cost per row (b = 0: the step time is flat in
    rows), every row count meets the SLO if the fixed cost a does, none if it does not. At least one row: one
    replica always serves one stream, and a second replica cannot make a single stream faster."""
    budget = tokens_per_row_step / slo  # seconds per step that keep a row at the SLO
    if b <= 0:
        rows = float(max_rows) if a <= budget else 0.0
    else:
        rows = (budget - a) / b
    return slo * min(float(max_rows), max(1.0, rows))


class EngineMetrics:
    def __init__(self, settings: MetricsSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._iterations: deque[tuple[float, int, float, int]] = deque()  # (end time, rows, seconds, tokens)
        self._stream: deque[tuple[float, float]] = deque()  # (time, tokens/s of one canvas interval)
        self._ttfc: deque[tuple[float, float]] = deque()  # (time, seconds to first canvas)
        self._steps: deque[tuple[float, int]] = deque()  # (time, steps of a committed canvas)
        self._last_event: dict[str, float] = {}  # request id -> submission or last canvas time
        self._waiting_first: dict[str, float] = {}  # request id -> submission time, until its first canvas

    # -- writers (scheduler thread) ----------------------------------------------------------------------
    def observe(self, request_id: str, sink: Sink) -> Sink:
        """Register a submitted request; returns a sink that records its events and forwards them."""
        now = self.clock()
        with self._lock:
            self._last_event[request_id] = now
            self._waiting_first[request_id] = now

        def observed(event: Event) -> None:
            self._on_event(request_id, event)
            sink(event)

        return observed

    def _on_event(self, request_id: str, event: Event) -> None:
        if not isinstance(event, CanvasEvent | FinalEvent | ErrorEvent):
            return
        now = self.clock()
        with self._lock:
            if isinstance(event, CanvasEvent):
                self._steps.append((now, event.steps))
                first = self._waiting_first.pop(request_id, None)
                if first is not None:
                    self._ttfc.append((now, now - first))
                else:
                    last = self._last_event.get(request_id, now)
                    self._stream.append((now, self.settings.canvas_length / max(now - last, 1e-6)))
                self._last_event[request_id] = now
            else:
                self._forget_locked(request_id)

    def forget(self, request_id: str) -> None:
        """A cancelled request leaves without a final event: stop counting its wait."""
        with self._lock:
            self._forget_locked(request_id)

    def _forget_locked(self, request_id: str) -> None:
        self._last_event.pop(request_id, None)
        self._waiting_first.pop(request_id, None)

    def on_iteration(self, rows: int, seconds: float, tokens: int) -> None:
        with self._lock:
            self._iterations.append((self.clock(), rows, seconds, tokens))

    # -- reader ------------------------------------------------------------------------------------------
    def _trim(self, now: float) -> None:
        s = self.settings
        for window, span in (
            (self._iterations, max(s.window_s, s.capacity_window_s)),
            (self._steps, max(s.window_s, s.capacity_window_s)),
            (self._stream, s.window_s),
            (self._ttfc, s.window_s),
        ):
            while window and window[0][0] < now - span:
                window.popleft()

    def snapshot(self, active_rows: int, queued: int) -> dict[str, float]:
        """The autoscaling readings now; a key is left out when its window holds no sample (an average of
        'no data' with real data would mislead the policy)."""
        s = self.settings
        now = self.clock()
        with self._lock:
            self._trim(now)
            long_iterations = list(self._iterations)
            iterations = [it for it in long_iterations if it[0] >= now - s.window_s]
            stream = [v for _, v in self._stream]
            ttfc = [v for _, v in self._ttfc]
            long_steps = [v for _, v in self._steps]
            steps = [v for t, v in self._steps if t >= now - s.window_s]
            oldest_wait = min(self._waiting_first.values(), default=now)
        demand_rows = float(active_rows + queued)
        out = {
            "demand_rows": demand_rows,
            "delivered_tps": sum(it[3] for it in iterations) / s.window_s,
            "occupancy": sum(it[1] * it[2] for it in iterations) / (s.window_s * s.max_rows),
            "ttfc_pending_s": now - oldest_wait,
        }
        if s.slo_tokens_per_second > 0:
            out["slo_tps"] = s.slo_tokens_per_second
            out["demanded_tps"] = demand_rows * s.slo_tokens_per_second
        if stream:
            out["stream_tps_p50"] = percentile(stream, 50)
            out["stream_tps_p10"] = percentile(stream, 10)
        if ttfc:
            out["ttfc_p50_s"] = percentile(ttfc, 50)
            out["ttfc_p90_s"] = percentile(ttfc, 90)
        if steps:
            out["steps_per_canvas"] = sum(steps) / len(steps)
        out.update(self._capacity(long_iterations, long_steps))
        return out

    def _capacity(
        self, iterations: list[tuple[float, int, float, int]], steps: list[int]
    ) -> dict[str, float]:
        s = self.settings
        busy = [(it[1], it[2]) for it in iterations if it[1] > 0]
        if not busy:
            return {}
        out = {"step_s": sum(t for _, t in busy) / len(busy)}
        if s.slo_tokens_per_second > 0 and steps:
            # in the stream rate's units (whole canvases), for the slow canvases: p90 of steps per canvas
            per_row_step = s.canvas_length / percentile(steps, 90)
            a, b = step_time_fit(busy)
            out["capacity_tps"] = capacity_tokens_per_second(
                a, b, per_row_step, s.slo_tokens_per_second, s.max_rows
            )
        return out
