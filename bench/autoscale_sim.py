"""Autoscaling simulation: the SLO policy (cluster/autoscaling.py) vs Ray Serve's default request-based policy.

    .venv/bin/python bench/autoscale_sim.py [--duration-s 1800] [--traces steady,diurnal,burst,long-prompt]
        [--step-a A --step-b B] [--slo TPS] [--ttfc-slo S] [--max-replicas 8] [--target-ongoing 2]
        [--startup-s 30] [--png bench/autoscale_sim.png] [--seeds 2]

Deterministic (seeded traces, fixed time step): with the same step times the same command prints the same
table. Figures are means over --seeds traces of each kind (one seed's Poisson noise moves attainment by several
points); the plot shows the first seed.

Engine model. One replica denoises its rows together: a step over R rows takes t(R) = a + b R seconds, measured
here by timing the real Scheduler on the default tiny model at 1, 2, 4 and 8 rows (or given with --step-a /
--step-b). A request needs `canvases` canvases of `steps` denoising steps each (10-48, by prompt: what
DiffusionGemma's early stop gives); a long prompt first costs its prefill time on its own row. A replica holds at
most `max_rows` rows and queues the rest; new requests go to the replica with the fewest rows + queued. A new
replica serves after --startup-s (model load); a replica scaled down takes no new work and leaves when drained.
Replica-hours count starting and draining replicas.

Policies, with the same bounds (1..--max-replicas) and the same delays (upscale 15 s, downscale 120 s):
  slo      cluster.autoscaling.EnginePolicy on fabricated AutoscalingContexts fed by the real EngineMetrics
           class (deployments/engine_metrics.py) running on the simulation clock, averaged over the same
           look-back window Serve uses;
  default  Ray Serve's `replica_queue_length_autoscaling_policy` (ongoing requests / --target-ongoing).
Each runs with and without load-adaptive sampling: the Engine's own decision (deployments/load_adaptive.py
`LoadAdapter`) on the replica's latest readings at each request's submission, with the `plain` class limited to
--adaptive-steps denoising steps per canvas (the entropy-bound knob is not modelled: steps only). `degraded`
counts the requests it shortened.

Traces (arrival rates set from the calibrated capacity so demand spans ~1-5 replicas):
  steady       Poisson arrivals at a constant rate;
  diurnal      the rate follows a sine between 0.2x and 1.8x over the run;
  burst        a steady base with a 4x burst for a tenth of the run;
  long-prompt  steady, with 30% of requests carrying a long prompt (prefill of several seconds).

Columns: SLO att = share of requests whose time to first canvas and mean stream rate (whole canvases over
arrival-to-last-canvas) both meet the SLO; p10 rate = 10th percentile of per-request stream rate; replica-h =
replica-hours; mean/max rep = replicas over time; degraded = requests shortened by load-adaptive sampling.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.autoscaling import LOOK_BACK_S, EnginePolicy, apply_delays  # noqa: E402
from deployments.engine_metrics import EngineMetrics, MetricsSettings  # noqa: E402
from deployments.load_adaptive import PLAIN, AdaptiveSettings, ClassLimits, adapted_values, pressure  # noqa: E402
from deployments.scheduler import CanvasEvent, FinalEvent  # noqa: E402

DT = 1.0  # simulation step, seconds: metrics recorded and the policy run once per step
P90_STEPS = (
    44.0  # p90 of the uniform 10-48 steps per canvas: what capacity is sized for (as in EngineMetrics)
)
CANVAS = 32  # canvas length of the calibrated tiny model
UP_DELAY, DOWN_DELAY = 15.0, 120.0


@dataclass
class Request:
    rid: str
    arrival: float
    canvases: int
    steps: int  # denoising steps per canvas
    prefill_s: float = 0.0
    done_canvases: int = 0
    step_in_canvas: float = 0.0
    canvas_steps: int = 0  # steps of the canvas in progress (adaptive sampling may shorten it)
    first_canvas: float | None = None
    finished: float | None = None
    sink: object = None


@dataclass
class Replica:
    name: str
    ready_at: float
    metrics: EngineMetrics
    rows: list[Request] = field(default_factory=list)
    queue: list[Request] = field(default_factory=list)
    draining: bool = False
    history: list[tuple[float, dict]] = field(default_factory=list)

    @property
    def load(self) -> int:
        return len(self.rows) + len(self.queue)


@dataclass
class Setup:
    a: float
    b: float
    slo: float
    ttfc_slo: float
    max_rows: int
    max_replicas: int
    startup_s: float
    target_ongoing: float
    adaptive_steps: int
    duration_s: float


# -- traces --------------------------------------------------------------------------------------------------
def trace(name: str, rate: float, duration: float, seed: int) -> list[Request]:
    rng = random.Random(f"{name}-{seed}")
    out, t = [], 0.0
    peak = rate * 4
    while t < duration:
        t += rng.expovariate(peak)  # thinning: draw at the peak rate, keep with probability rate(t) / peak
        if rng.random() * peak > _rate(name, rate, t, duration):
            continue
        long = name == "long-prompt" and rng.random() < 0.3
        out.append(
            Request(
                rid=f"q{len(out)}",
                arrival=t,
                canvases=rng.choice((1, 2, 4, 8)),
                steps=rng.randint(10, 48),
                prefill_s=rng.uniform(2.0, 6.0) if long else 0.0,
            )
        )
    return [r for r in out if r.arrival < duration]


def _rate(name: str, rate: float, t: float, duration: float) -> float:
    if name == "diurnal":
        return rate * (1 + 0.8 * math.sin(2 * math.pi * t / duration))
    if name == "burst":
        return rate * (4.0 if 0.4 * duration <= t < 0.5 * duration else 1.0)
    return rate


# -- the engine model ----------------------------------------------------------------------------------------
def capacity_rows(setup: Setup, steps: float) -> float:
    """Rows one replica keeps at the SLO rate, for canvases of `steps` steps (same rule as EngineMetrics)."""
    return max(1.0, min(setup.max_rows, (CANVAS / steps / setup.slo - setup.a) / setup.b))


def advance(rep: Replica, now: float, setup: Setup) -> None:
    while rep.queue and len(rep.rows) < setup.max_rows:
        rep.rows.append(rep.queue.pop(0))
    if not rep.rows:
        return
    R = len(rep.rows)
    step_s = setup.a + setup.b * R
    steps = DT / step_s
    tokens = 0
    for req in list(rep.rows):
        budget = steps
        if req.prefill_s > 0:  # the prompt is prefilled first (its own row; simplification)
            used = min(req.prefill_s, DT)
            req.prefill_s -= used
            budget = steps * (1 - used / DT)
        while budget > 0 and req.finished is None:
            if req.canvas_steps == 0:
                req.canvas_steps = req.steps
            take = min(budget, req.canvas_steps - req.step_in_canvas)
            req.step_in_canvas += take
            budget -= take
            if req.step_in_canvas >= req.canvas_steps - 1e-9:
                at = now + DT * (1 - budget / steps)
                _commit(rep, req, at)
                tokens += CANVAS
    rep.metrics.on_iteration(R, step_s, tokens)


def _commit(rep: Replica, req: Request, at: float) -> None:
    req.done_canvases += 1
    rep.metrics.clock.now = at
    last = req.done_canvases == req.canvases
    req.sink(CanvasEvent(req.done_canvases - 1, [0] * CANVAS, req.canvas_steps, last=last))
    req.step_in_canvas, req.canvas_steps = 0.0, 0
    if req.first_canvas is None:
        req.first_canvas = at
    if req.done_canvases == req.canvases:
        req.finished = at
        req.sink(FinalEvent("length", 1, CANVAS * req.canvases, [req.steps], 1.0, 0.0, 0.0, 0.0))
        rep.rows.remove(req)


# -- the control loop ----------------------------------------------------------------------------------------
class SimClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Context:
    """The fields of Serve's AutoscalingContext the policies read."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class Sample:
    def __init__(self, timestamp: float, value: float):
        self.timestamp, self.value = timestamp, value


def context(reps: list[Replica], target: int, now: float, setup: Setup, state: dict) -> Context:
    running = [r for r in reps if r.ready_at <= now and not r.draining]
    aggregated: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for rep in running:
        window = [(t, snap) for t, snap in rep.history if t > now - LOOK_BACK_S]
        names = {k for _, snap in window for k in snap}
        for name in names:
            series = [Sample(t, snap[name]) for t, snap in window if name in snap]
            aggregated.setdefault(name, {})[rep.name] = sum(x.value for x in series) / len(series)
            raw.setdefault(name, {})[rep.name] = series
    ongoing = sum(r.load for r in running)
    return Context(
        deployment_name="Engine",
        current_num_replicas=len(running),
        target_num_replicas=target,
        running_replicas=[r.name for r in running],
        aggregated_metrics=aggregated,
        raw_metrics=raw,
        total_num_requests=float(ongoing),
        total_queued_requests=0.0,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=setup.max_replicas,
        policy_state=state,
        current_time=now,
        config=DefaultConfig(setup.target_ongoing),
    )


class DefaultConfig:
    """What `replica_queue_length_autoscaling_policy` reads from Serve's AutoscalingConfig."""

    def __init__(self, target_ongoing: float):
        self.target_ongoing = target_ongoing

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing


def default_policy(setup: Setup):
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    from cluster.autoscaling import PolicyParams

    delays = PolicyParams(setup.slo, setup.ttfc_slo, UP_DELAY, DOWN_DELAY)

    def policy(ctx) -> tuple[int, dict]:
        desired, _ = replica_queue_length_autoscaling_policy(ctx)
        want = min(max(math.ceil(desired), 1), setup.max_replicas)
        state = dict(ctx.policy_state)
        return apply_delays(want, ctx.target_num_replicas, state, delays, ctx.current_time), state

    return policy


def simulate(name: str, policy_name: str, adaptive: bool, requests: list[Request], setup: Setup) -> dict:
    clock = SimClock()
    counters = {"degraded": 0}
    msettings = MetricsSettings(
        window_s=10.0, slo_tokens_per_second=setup.slo, max_rows=setup.max_rows, canvas_length=CANVAS
    )
    if policy_name == "slo":
        policy = EnginePolicy(
            slo_tokens_per_second=setup.slo,
            slo_time_to_first_canvas_s=setup.ttfc_slo,
            upscale_delay_s=UP_DELAY,
            downscale_delay_s=DOWN_DELAY,
        )
    else:
        policy = default_policy(setup)
    reps = [Replica("e0", 0.0, EngineMetrics(msettings, clock))]
    target, state, serial = 1, {}, 1
    pending = [_fresh(r) for r in requests]
    timeline, replica_s, now, i = [], 0.0, 0.0, 0
    while now < setup.duration_s or any(r.load for r in reps):
        clock.now = now
        live = [r for r in reps if r.ready_at <= now and not r.draining]
        while i < len(pending) and pending[i].arrival <= now:
            req = pending[i]
            rep = min(live, key=lambda r: r.load)
            if adaptive:
                counters["degraded"] += _adapt(req, rep, setup)
            req.sink = rep.metrics.observe(req.rid, lambda e: None)
            rep.queue.append(req)
            i += 1
        for rep in [r for r in reps if r.ready_at <= now]:
            advance(rep, now, setup)
        now += DT
        clock.now = now
        for rep in reps:
            if rep.ready_at <= now:
                rep.history.append((now, rep.metrics.snapshot(len(rep.rows), len(rep.queue))))
                rep.history = [h for h in rep.history if h[0] > now - LOOK_BACK_S]
        target, state = policy(context(reps, target, now, setup, state))
        serial = _resize(reps, target, now, setup, msettings, clock, serial)
        reps = [r for r in reps if not (r.draining and r.load == 0)]
        replica_s += len(reps) * DT
        timeline.append((now, len(reps)))
    return _summary(name, policy_name, adaptive, pending, timeline, replica_s, setup, counters)


def _adapt(req: Request, rep: Replica, setup: Setup) -> bool:
    """The Engine's load-adaptive decision at submission (deployments/load_adaptive.py) on the replica's latest
    readings; True when it shortened the request."""
    settings = AdaptiveSettings(enabled=True, classes={PLAIN: ClassLimits(1.0, setup.adaptive_steps)})
    readings = rep.history[-1][1] if rep.history else {}
    level = pressure(readings, settings, setup.ttfc_slo)
    _, steps = adapted_values(0.1, req.steps, settings.classes[PLAIN], level)
    shortened, req.steps = steps < req.steps, steps
    return shortened


def _fresh(r: Request) -> Request:
    return Request(r.rid, r.arrival, r.canvases, r.steps, r.prefill_s)


def _resize(reps, target, now, setup, msettings, clock, serial) -> int:
    serving = [r for r in reps if not r.draining]
    for _ in range(target - len(serving)):
        reps.append(Replica(f"e{serial}", now + setup.startup_s, EngineMetrics(msettings, clock)))
        serial += 1
    for rep in sorted(serving, key=lambda r: (r.ready_at <= now, -r.load))[: max(0, len(serving) - target)]:
        rep.draining = True  # starting replicas go first, then the least loaded; queued work stays to drain
    return serial


def _summary(name, policy_name, adaptive, reqs, timeline, replica_s, setup, counters) -> dict:
    rates, met = [], 0
    for r in reqs:
        rate = None  # stream rate after the first canvas (a one-canvas request has only its first canvas)
        if r.canvases > 1:
            rate = CANVAS * (r.canvases - 1) / max(r.finished - r.first_canvas, 1e-9)
            rates.append(rate)
        met += (rate is None or rate >= setup.slo) and r.first_canvas - r.arrival <= setup.ttfc_slo
    rates.sort()
    counts = [n for _, n in timeline]
    return {
        "trace": name,
        "policy": policy_name + (" +adaptive" if adaptive else ""),
        "requests": len(reqs),
        "slo_attainment": met / max(len(reqs), 1),
        "p10_rate": rates[len(rates) // 10] if rates else 0.0,
        "replica_hours": replica_s / 3600,
        "mean_replicas": sum(counts) / len(counts),
        "max_replicas": max(counts),
        "degraded": counters["degraded"],
        "timeline": timeline,
    }


# -- calibration, output -------------------------------------------------------------------------------------
def calibrate(rows_list=(1, 2, 4, 8), steps: int = 6) -> tuple[float, float]:
    """Time the real Scheduler's iterations on the default tiny model; least-squares t(R) = a + b R."""
    import torch

    from cluster.env import DEFAULT_MODEL_PATH
    from deployments.engine_core import EngineCore
    from deployments.engine_metrics import step_time_fit
    from deployments.scheduler import EngineRequest, SchedulerLimits
    from model.sampling.params import SamplingParams
    from model.weights import load_model

    torch.set_num_threads(1)
    model = load_model(str(DEFAULT_MODEL_PATH))
    samples = []
    for rows in rows_list:
        sched = EngineCore(model, SchedulerLimits(max_rows=rows))
        params = SamplingParams(max_new_tokens=CANVAS, max_denoising_steps=48, confidence_threshold=1e-9)
        for k in range(rows):
            sched.submit(EngineRequest(f"c{rows}-{k}", [1, 2, 3, 4], params, seed=k), lambda e: None)
        sched.iterate()  # prefill and first step
        for _ in range(steps):
            samples.append((rows, sched.iterate().seconds))
    return step_time_fit(samples)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"] for r in results}, key=[r["trace"] for r in results].index)
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 2.6 * len(traces)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], traces, strict=True):
        for r in (r for r in results if r["trace"] == name):
            t = [p[0] / 60 for p in r["timeline"]]
            ax.plot(t, [p[1] for p in r["timeline"]], label=f"{r['policy']} ({r['slo_attainment']:.0%} SLO)")
        ax.set_title(name)
        ax.set_ylabel("replicas")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=1200.0)
    p.add_argument("--traces", default="steady,diurnal,burst,long-prompt")
    p.add_argument("--step-a", type=float, help="step time intercept, s (default: measured)")
    p.add_argument("--step-b", type=float, help="step time per row, s (default: measured)")
    p.add_argument("--slo", type=float, help="stream-rate SLO, tokens/s (default: half the 1-row rate)")
    p.add_argument(
        "--ttfc-slo", type=float, help="time-to-first-canvas SLO, s (default: 2 canvases at the SLO)"
    )
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--max-replicas", type=int, default=8)
    p.add_argument("--target-ongoing", type=float, default=2.0, help="Ray's default target_ongoing_requests")
    p.add_argument("--adaptive-steps", type=int, default=16, help="step limit of adaptive sampling")
    p.add_argument("--startup-s", type=float, default=30.0)
    p.add_argument("--load", type=float, default=3.0, help="mean demand, in replicas' capacity at the SLO")
    p.add_argument("--seeds", type=int, default=2, help="traces of each kind (seeds 0..N-1), averaged")
    p.add_argument("--png", default=str(ROOT / "bench" / "autoscale_sim.png"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.step_a is None or args.step_b is None:
        a, b = calibrate()
        source = "measured on the default tiny model (Scheduler, 1 torch thread, this machine)"
    else:
        a, b, source = args.step_a, args.step_b, "given"
    # the SLO is half the rate a lone row gets on the slow (p90) canvases; the first canvas may take two
    # canvases' time at that rate (queueing and prefill included)
    slo = args.slo or 0.5 * CANVAS / P90_STEPS / (a + b)
    ttfc_slo = args.ttfc_slo or 2 * CANVAS / slo
    setup = Setup(
        a,
        b,
        slo,
        ttfc_slo,
        args.max_rows,
        args.max_replicas,
        args.startup_s,
        args.target_ongoing,
        args.adaptive_steps,
        args.duration_s,
    )
    rows = capacity_rows(setup, P90_STEPS)
    mean_canvases = 3.75
    rate = args.load * rows / (mean_canvases * CANVAS / slo)  # Little's law at the SLO rate
    print(f"step time t(R) = {a * 1e3:.2f} ms + {b * 1e3:.2f} ms x R ({source})")
    print(
        f"SLO {slo:.1f} tokens/s per stream, first canvas <= {ttfc_slo:.1f} s; one replica keeps "
        f"{rows:.1f} rows at the SLO; base arrival rate {rate:.2f} requests/s; {args.duration_s:g} s per trace"
    )
    results = []
    for name in args.traces.split(","):
        for policy_name in ("slo", "default"):
            for adaptive in (False, True):
                runs = [
                    simulate(name, policy_name, adaptive, trace(name, rate, args.duration_s, seed), setup)
                    for seed in range(args.seeds)
                ]
                results.append(_mean(runs))
    print(f"means over {args.seeds} seeds")
    _table(results)
    plot(results, Path(args.png))
    print(f"plot: {args.png}; {time.perf_counter() - t0:.1f} s")
    return 0


def _mean(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("requests", "slo_attainment", "p10_rate", "replica_hours", "mean_replicas", "degraded"):
        out[key] = sum(r[key] for r in runs) / len(runs)
    out["max_replicas"] = max(r["max_replicas"] for r in runs)
    return out


def _table(results: list[dict]) -> None:
    head = f"{'trace':12} {'policy':18} {'reqs':>5} {'SLO att':>8} {'p10 rate':>9} {'replica-h':>10} "
    print(head + f"{'mean rep':>9} {'max rep':>8} {'degraded':>9} {'vs default':>22}")
    base = {
        (r["trace"], r["policy"].replace("slo", "default")): r for r in results if "default" in r["policy"]
    }
    for r in results:
        ref = base[(r["trace"], r["policy"].replace("slo", "default"))]
        ratio = (
            f"att {r['slo_attainment'] - ref['slo_attainment']:+.0%}, cost x{r['replica_hours'] / ref['replica_hours']:.2f}"
            if r is not ref
            else ""
        )
        print(
            f"{r['trace']:12} {r['policy']:18} {r['requests']:5.0f} {r['slo_attainment']:8.1%} {r['p10_rate']:9.1f} "
            f"{r['replica_hours']:10.3f} {r['mean_replicas']:9.2f} {r['max_replicas']:8d} {r['degraded']:9.0f} {ratio:>22}"
        )


if __name__ == "__main__":
    sys.exit(main())
