"""Autoscaling Engines to a tokens-per-second SLO: pure policy functions over Ray Serve's `AutoscalingContext`.

Queue length and ongoing requests (Ray Serve's default `target_ongoing_requests`) say nothing about how fast each
stream goes, and a diffusion engine's cost is per denoising step and per row, with steps per canvas varying with
the prompt. So every Engine reports (deployments/engine_metrics.py, through `record_autoscaling_stats`) the
tokens/s its rows in flight and queued demand at the SLO rate, the tokens/s one replica sustains at the SLO
(learned online from its own step times), its per-request stream rate tail and its time to first canvas. Each
control-loop tick (TokenScale's idea: size to token demand over measured per-instance capacity):

  1. readings: only replicas whose metrics are fresh count; with none fresh the policy holds (never flaps on
     missing data), and it never scales *down* unless every running replica reported;
  2. demand: replicas = ceil(demanded tokens/s / (capacity x target_utilization)); a scale-up needs the
     utilisation of the current target above `upscale_utilization` (hysteresis band between the two). Demand
     is the larger of Serve's look-back mean and the newest reading: quick up, slow down;
  3. SLO guard: when the p10 stream rate or the time to first canvas misses the SLO while replicas hold at
     least `guard_min_rows` rows each, add one replica even if the averages look fine (and never scale down
     then). With fewer rows a replica is latency-bound, and another replica would not make a stream faster;
  4. delays: a change must be wanted continuously for `upscale_delay_s` / `downscale_delay_s`, except a
     scale-up when the look-back mean of demand, projected `predict_s` ahead along its growth, exceeds the
     target's capacity (`urgent`): the delay only filters blips (so do the mean and slope), and a new replica
     still needs its start-up time;
  5. bounds: Serve's capacity-adjusted min / max replicas.

The delays live here (Ray's own are set to 0 in the config this module renders) so that the whole decision is one
pure function, tested with fabricated contexts and replayed by bench/autoscale_sim.py.

`EnginePolicy` is the deployment-level policy (`serve.run` supports it); `ApplicationPolicy` also sizes
ExpertShards with the Engines (application-level policies run only when the app is deployed from a Serve config
document). Both are classes so Serve passes `policy_kwargs` to `__init__` once. This module imports only the
standard library: Serve pickles it by value into its controller.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

ENGINE = "Engine"
EXPERT_SHARD = (
    "ExpertShard"  # prefix: disaggregated mode deploys ExpertShard0, ExpertShard1, ... (one per range)
)
POLICY_STATE_KEY = "blockserve"  # our part of Serve's policy_state (Serve keeps its own keys beside it)
LOOK_BACK_S = 15.0  # Serve averages each reported metric over this window (> its 10 s metrics_interval_s)


@dataclass(frozen=True)
class PolicyParams:
    """`policy_kwargs` of the policies (JSON-serialisable). Operators set the SLO, bounds and delays in
    ClusterConfig; the tuning knobs keep these defaults."""

    slo_tokens_per_second: float
    slo_time_to_first_canvas_s: float
    upscale_delay_s: float
    downscale_delay_s: float
    target_utilization: float = 0.7  # size replicas so demand fills this share of capacity
    upscale_utilization: float = 0.9  # scale up only once demand passes this share of the current capacity
    stale_after_s: float = 30.0  # a replica's metrics older than this do not count (3 x Serve's 10 s push)
    guard_min_rows: float = 2.0  # SLO guard acts only when replicas hold at least this many rows each
    capacity_smoothing: float = (
        0.1  # weight of a new capacity reading (once per tick) in the learned capacity
    )
    predict_s: float = (
        20.0  # urgency looks this far ahead along the demand's growth (about a replica's start-up)
    )
    urgent_utilization: float = (
        1.0  # mean demand past this share of the target's capacity: scale up with no delay
    )
    expert_shards_per_engine: int = 0  # ApplicationPolicy: ExpertShard replicas per Engine (0: no shards)

    def errors(self) -> list[str]:
        out = []
        if self.slo_tokens_per_second <= 0:
            out.append("slo_tokens_per_second must be > 0")
        if not 0 < self.target_utilization <= self.upscale_utilization:
            out.append("need 0 < target_utilization <= upscale_utilization")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.stale_after_s) < 0:
            out.append("delays and stale_after_s must be >= 0")
        return out


@dataclass
class FleetView:
    """What the Engines report, summed or reduced over replicas with fresh metrics."""

    running: int
    fresh: int
    demand_tps: float = 0.0  # the larger of the look-back mean and the newest reading, summed
    demand_mean_tps: float = 0.0  # the look-back mean alone (a one-tick blip barely moves it)
    demand_growth_tps: float = (
        0.0  # tokens/s per second: the demand's slope over the look-back window, summed
    )
    demand_rows: float = 0.0
    delivered_tps: float = 0.0
    capacity_tps: float | None = None  # median of this tick's replica readings
    stream_p10_tps: float | None = None  # worst replica
    ttfc_tail_s: float | None = None  # worst replica: max(p90 of finished, oldest still waiting)
    missing: list[str] = field(default_factory=list)


@dataclass
class Decision:
    replicas: int  # what Serve should run now (after delays and bounds)
    wanted: int  # what the readings ask for (before delays)
    reason: str
    capacity_tps: float | None
    view: FleetView

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "view": asdict(self.view)}


def _latest(series) -> tuple[float | None, float | None]:
    """(timestamp, value) of the newest sample of a raw metric series (Serve's TimeStampedValue list)."""
    if not series:
        return None, None
    last = series[-1]
    value = getattr(last, "value", None)
    ok = isinstance(value, int | float) and math.isfinite(value)
    return getattr(last, "timestamp", None), (float(value) if ok else None)


def _slope(series) -> float:
    """Least-squares slope (per second) of a raw metric series; 0 with fewer than 3 samples."""
    points = [
        (s.timestamp, s.value) for s in series or () if isinstance(getattr(s, "value", None), int | float)
    ]
    if len(points) < 3:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var <= 0 else sum((t - mt) * (v - mv) for t, v in points) / var


def _reading(metrics: dict, name: str, rid) -> float | None:
    """One replica's aggregated reading, or None when absent or not a finite number (Serve gives None when a
    replica's samples are all older than its look-back window)."""
    value = metrics.get(name, {}).get(rid)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def fleet_view(ctx, params: PolicyParams) -> FleetView:
    """Reduce per-replica metrics of `ctx` (aggregated over Serve's look-back window) to fleet readings."""
    metrics = ctx.aggregated_metrics or {}
    raw = ctx.raw_metrics or {}
    now = ctx.current_time
    view = FleetView(running=ctx.current_num_replicas, fresh=0)
    capacities, tails, ttfcs = [], [], []
    for rid in ctx.running_replicas:
        demand = _reading(metrics, "demanded_tps", rid)
        stamp, latest = _latest(raw.get("demanded_tps", {}).get(rid))
        stale = stamp is not None and now is not None and now - stamp > params.stale_after_s
        if demand is None or stale:
            view.missing.append(str(rid))
            continue
        view.fresh += 1
        # the larger of the look-back mean and the newest reading: a burst is seen at once, a lull only once
        # it has lasted the look-back window
        view.demand_tps += max(demand, latest if latest is not None else demand)
        view.demand_mean_tps += demand
        view.demand_growth_tps += _slope(raw.get("demanded_tps", {}).get(rid))
        view.demand_rows += _reading(metrics, "demand_rows", rid) or 0.0
        view.delivered_tps += _reading(metrics, "delivered_tps", rid) or 0.0
        for name, out in (("capacity_tps", capacities), ("stream_tps_p10", tails)):
            value = _reading(metrics, name, rid)
            if value is not None:
                out.append(value)
        waits = [_reading(metrics, k, rid) for k in ("ttfc_p90_s", "ttfc_pending_s")]
        waits = [w for w in waits if w is not None]
        if waits:
            ttfcs.append(max(waits))
    if capacities:
        capacities.sort()
        view.capacity_tps = capacities[len(capacities) // 2]
    view.stream_p10_tps = min(tails) if tails else None
    view.ttfc_tail_s = max(ttfcs) if ttfcs else None
    return view


def _learned_capacity(view: FleetView, state: dict, params: PolicyParams) -> float | None:
    old = state.get("capacity_tps")
    if view.capacity_tps is None:
        return old
    if old is None:
        return view.capacity_tps
    w = params.capacity_smoothing
    return (1 - w) * old + w * view.capacity_tps


def slo_missed(view: FleetView, params: PolicyParams) -> str | None:
    """Why the tail misses the SLO (None when it does not)."""
    if view.stream_p10_tps is not None and view.stream_p10_tps < params.slo_tokens_per_second:
        return f"p10 stream rate {view.stream_p10_tps:.1f} < SLO {params.slo_tokens_per_second:g} tokens/s"
    if view.ttfc_tail_s is not None and view.ttfc_tail_s > params.slo_time_to_first_canvas_s:
        return f"time to first canvas {view.ttfc_tail_s:.2f}s > SLO {params.slo_time_to_first_canvas_s:g}s"
    return None


def wanted_replicas(
    view: FleetView, capacity: float | None, target: int, params: PolicyParams
) -> tuple[int, str]:
    """Replicas the readings ask for, before delays and bounds, and why."""
    if view.fresh == 0:
        return target, "hold: no fresh Engine metrics"
    want, reason = target, "hold: no capacity learned yet"
    if not capacity and view.demand_tps == 0:  # idle: no capacity is needed to know that
        capacity = math.inf
    if capacity:
        by_demand = max(1, math.ceil(view.demand_tps / (capacity * params.target_utilization)))
        utilization = view.demand_tps / (capacity * max(target, 1))
        if by_demand > target and utilization > params.upscale_utilization:
            want, reason = (
                by_demand,
                f"demand {view.demand_tps:.0f} tokens/s is {utilization:.0%} of capacity",
            )
        elif by_demand < target and view.missing:
            want, reason = target, f"hold: no fresh metrics from {len(view.missing)} replica(s)"
        elif by_demand < target:
            want, reason = by_demand, f"demand {view.demand_tps:.0f} tokens/s fits {by_demand} replica(s)"
        else:
            want, reason = target, f"hold: utilisation {utilization:.0%} inside the band"
    miss = slo_missed(view, params)
    loaded = view.demand_rows / max(view.fresh, 1) >= params.guard_min_rows
    if miss and loaded:
        starting = view.running < target  # a replica already on its way: let it land before adding more
        guard = target if starting else target + 1
        if guard >= want:
            want, reason = (
                guard,
                f"SLO guard: {miss}" + (" (waiting for starting replicas)" if starting else ""),
            )
    return want, reason


def urgent(view: FleetView, capacity: float | None, target: int, params: PolicyParams) -> str | None:
    """Why a scale-up cannot wait for its delay (None when it can): demand over Serve's look-back window, its
    mean projected `predict_s` ahead along its growth (queue growth: rows arrive faster than they finish), already
    exceeds what the target replicas sustain at the SLO. The delay is there to filter blips, which the window's
    mean and slope do too (one high reading barely moves either); past full capacity every second of delay adds
    queued requests that will miss their first canvas, and a new replica still needs its start-up time on top.
    """
    if not capacity or view.fresh == 0:
        return None
    ahead = view.demand_mean_tps + max(0.0, view.demand_growth_tps) * params.predict_s
    utilization = ahead / (capacity * max(target, 1))
    if utilization > params.urgent_utilization:
        return f"urgent: demand {params.predict_s:g}s ahead is {utilization:.0%} of capacity"
    return None


def apply_delays(
    want: int, target: int, state: dict, params: PolicyParams, now: float, at_once: bool = False
) -> int:
    """Change the target only after `want` has pointed the same way for the direction's delay.

    A scale-up goes to the latest `want` (at once when `at_once`: see `urgent`); a scale-down to the largest
    `want` seen while it waited, so one low reading at the end of the delay cannot take away replicas the rest
    of the delay needed."""
    if want == target:
        state.pop("pending", None)
        return target
    if at_once and want > target:
        state.pop("pending", None)
        return want
    direction = 1 if want > target else -1
    pending = state.get("pending")
    if not pending or pending["direction"] != direction:
        pending = state["pending"] = {"direction": direction, "since": now, "most": want}
    pending["most"] = max(pending["most"], want)
    delay = params.upscale_delay_s if direction > 0 else params.downscale_delay_s
    if now - pending["since"] >= delay:
        state.pop("pending", None)
        return want if direction > 0 else pending["most"]
    return target


def decide(ctx, params: PolicyParams, state: dict) -> Decision:
    """One control-loop tick for the Engine deployment; updates `state` (our part of policy_state) in place."""
    target = ctx.target_num_replicas
    view = fleet_view(ctx, params)
    capacity = _learned_capacity(view, state, params)
    if capacity is not None:
        state["capacity_tps"] = capacity
    want, reason = wanted_replicas(view, capacity, target, params)
    want = min(max(want, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
    now = ctx.current_time if ctx.current_time is not None else 0.0
    hurry = urgent(view, capacity, target, params) if want > target else None
    if hurry:
        reason = f"{reason}; {hurry}"
    replicas = apply_delays(want, target, state, params, now, at_once=hurry is not None)
    decision = Decision(replicas, want, reason, capacity, view)
    state["last_decision"] = decision.summary()
    return decision


class EnginePolicy:
    """Deployment-level policy: `policy.policy_function = "cluster.autoscaling:EnginePolicy"`."""

    def __init__(self, **policy_kwargs):
        self.params = PolicyParams(**policy_kwargs)
        errors = self.params.errors()
        if errors:
            raise ValueError("invalid autoscaling policy_kwargs: " + "; ".join(errors))

    def __call__(self, ctx) -> tuple[int, dict]:
        policy_state = dict(ctx.policy_state or {})
        ours = dict(policy_state.get(POLICY_STATE_KEY, {}))
        decision = decide(ctx, self.params, ours)
        policy_state[POLICY_STATE_KEY] = ours
        return decision.replicas, policy_state


class HoldPolicy:
    """Deployment-level policy of the ExpertShard deployments: keep the current target.

    Shards are sized only by `ApplicationPolicy` (it takes precedence over deployment-level policies when the app
    is deployed from a Serve config document). Without it (`serve.run`), a shard keeps its initial replicas instead
    of following Serve's default request-count policy, which knows nothing about the Engines."""

    def __init__(self, **policy_kwargs):
        pass

    def __call__(self, ctx) -> tuple[int, dict]:
        return ctx.target_num_replicas, dict(ctx.policy_state or {})


def _engine_kwargs(ctx) -> dict[str, Any]:
    """The Engine deployment's own `policy_kwargs` (its autoscaling_config, rendered by the app builder)."""
    policy = getattr(getattr(ctx, "config", None), "policy", None)
    return dict(getattr(policy, "policy_kwargs", None) or {})


class ApplicationPolicy:
    """Application-level policy: sizes Engines with `EnginePolicy`'s rule and every ExpertShard<i> deployment
    with them (`expert_shards_per_engine` replicas of each shard per Engine replica, in disaggregated mode).
    Deployments it does not know keep their replica count.

    Without `policy_kwargs` (what the Serve config document declares) it takes them from the Engine deployment's
    own autoscaling_config on the first tick, so the SLO, delays and shard ratio have one source: the
    ClusterConfig the app builder read (the document and the Helm chart then need no copy of them)."""

    def __init__(self, **policy_kwargs):
        self.engine = EnginePolicy(**policy_kwargs) if policy_kwargs else None

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        replicas, states = {}, {}
        engine_id = next((d for d, c in contexts.items() if c.deployment_name == ENGINE), None)
        if engine_id is None:
            return replicas, states
        if self.engine is None:
            self.engine = EnginePolicy(**_engine_kwargs(contexts[engine_id]))
        replicas[engine_id], states[engine_id] = self.engine(contexts[engine_id])
        per_engine = self.engine.params.expert_shards_per_engine
        engines = replicas[engine_id]
        for dep_id, ctx in contexts.items():
            if ctx.deployment_name.startswith(EXPERT_SHARD) and per_engine > 0:
                replicas[dep_id] = engines * per_engine
                state = dict(ctx.policy_state or {})
                state[POLICY_STATE_KEY] = {"engines": engines, "per_engine": per_engine}
                states[dep_id] = state
        return replicas, states


def policy_kwargs(autoscaling, slo) -> dict[str, Any]:
    """ClusterConfig's `engine.autoscaling` and `slo` sections -> `policy_kwargs` (duck-typed: this module
    imports nothing from the repo, see the module docstring)."""
    return {
        "slo_tokens_per_second": float(slo.tokens_per_second),
        "slo_time_to_first_canvas_s": float(slo.time_to_first_canvas_s),
        "upscale_delay_s": float(autoscaling.upscale_delay_s),
        "downscale_delay_s": float(autoscaling.downscale_delay_s),
    }


def engine_autoscaling_config(
    autoscaling, slo, metrics_interval_s: float | None = None, expert_shards_per_engine: int = 0
) -> dict[str, Any]:
    """The Engine deployment's `autoscaling_config` for `serve.deployment(...)` or a Serve config document.

    Serve's own delays are 0 because `EnginePolicy` applies `upscale_delay_s` / `downscale_delay_s` itself
    (Serve would otherwise add its delay after ours). `metrics_interval_s`: how often replicas push their
    readings (Serve's default, 10 s, when None)."""
    extra = {} if metrics_interval_s is None else {"metrics_interval_s": metrics_interval_s}
    return extra | {
        "min_replicas": autoscaling.min_replicas,
        "initial_replicas": autoscaling.min_replicas,
        "max_replicas": autoscaling.max_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": LOOK_BACK_S,
        "policy": {
            "policy_function": f"{__name__}:EnginePolicy",
            "policy_kwargs": policy_kwargs(autoscaling, slo)
            | ({"expert_shards_per_engine": expert_shards_per_engine} if expert_shards_per_engine else {}),
        },
    }


def shard_autoscaling_config(
    autoscaling, per_engine: int, metrics_interval_s: float | None = None
) -> dict[str, Any]:
    """An ExpertShard<i> deployment's `autoscaling_config` when the Engines autoscale: `per_engine` replicas per
    Engine replica within the Engines' bounds. Serve registers a deployment with an application-level policy
    only when it has an autoscaling_config (its bounds and delays are applied to what the policy returns)."""
    extra = {} if metrics_interval_s is None else {"metrics_interval_s": metrics_interval_s}
    return extra | {
        "min_replicas": autoscaling.min_replicas * per_engine,
        "initial_replicas": autoscaling.min_replicas * per_engine,
        "max_replicas": autoscaling.max_replicas * per_engine,
        "upscale_delay_s": 0.0,  # the shards follow the Engines' decision, already delayed by EnginePolicy
        "downscale_delay_s": 0.0,
        "look_back_period_s": LOOK_BACK_S,
        "policy": {"policy_function": f"{__name__}:HoldPolicy"},
    }


def application_autoscaling_policy() -> dict[str, Any]:
    """`applications[].autoscaling_policy` of a Serve config document (Ray 2.60: an AutoscalingPolicy, i.e.
    `policy_function` plus optional `policy_kwargs`). No kwargs: `ApplicationPolicy` reads them from the Engine's
    autoscaling_config, which the app builder renders from the ClusterConfig in the document's `args`."""
    return {"policy_function": f"{__name__}:ApplicationPolicy"}
