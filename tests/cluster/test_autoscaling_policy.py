"""The SLO autoscaling policies (cluster/autoscaling.py) on fabricated Ray Serve `AutoscalingContext`s (no Ray
cluster): scale up on demand, hold inside the band, scale down only after the delay, respect bounds, hold when
metrics are missing or stale, and the SLO guard on a bad tail with a fine mean."""

from __future__ import annotations

import pytest
from ray.serve._private.common import TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from cluster.autoscaling import (
    POLICY_STATE_KEY,
    ApplicationPolicy,
    EnginePolicy,
    application_autoscaling_policy,
    engine_autoscaling_config,
)
from cluster.config import ClusterConfig

SLO = 20.0
CAPACITY = 60.0  # tokens/s one replica sustains at the SLO: 3 rows at 20 tokens/s


def params(**overrides) -> dict:
    base = dict(
        slo_tokens_per_second=SLO, slo_time_to_first_canvas_s=2.0, upscale_delay_s=0.0, downscale_delay_s=0.0
    )
    return base | overrides


def reading(rows: float, **extra) -> dict[str, float]:
    """One healthy Engine's metrics with `rows` in flight (the SLO is met unless `extra` says otherwise)."""
    return {
        "demand_rows": rows,
        "demanded_tps": rows * SLO,
        "capacity_tps": CAPACITY,
        "stream_tps_p50": 30.0,
        "stream_tps_p10": 25.0,
        "ttfc_p90_s": 0.5,
        "ttfc_pending_s": 0.1,
    } | extra


def context(
    replicas: dict[str, dict[str, float] | None],
    *,
    target: int | None = None,
    now: float = 1000.0,
    age: float = 0.5,
    state: dict | None = None,
    bounds: tuple[int, int] = (1, 4),
) -> AutoscalingContext:
    """`replicas` maps a running replica id to its aggregated readings (None: it reported nothing)."""
    aggregated: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for rid, values in replicas.items():
        for name, value in (values or {}).items():
            aggregated.setdefault(name, {})[rid] = value
            raw.setdefault(name, {})[rid] = [TimeStampedValue(now - age, value)]
    n = len(replicas)
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="Engine",
        app_name="blockserve",
        current_num_replicas=n,
        target_num_replicas=n if target is None else target,
        running_replicas=list(replicas),
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=aggregated,
        raw_metrics=raw,
        capacity_adjusted_min_replicas=bounds[0],
        capacity_adjusted_max_replicas=bounds[1],
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=None,
    )


def run(policy, ctx) -> tuple[int, dict, str]:
    replicas, state = policy(ctx)
    return replicas, state, state[POLICY_STATE_KEY]["last_decision"]["reason"]


def test_scales_up_on_demand_to_demand_over_capacity():
    # 9 rows want 180 tokens/s; one replica sustains 60 at 70% target utilisation -> ceil(180 / 42) = 5 -> max 4
    policy = EnginePolicy(**params())
    replicas, _, reason = run(policy, context({"r1": reading(9)}, bounds=(1, 8)))
    assert replicas == 5 and "demand" in reason
    assert run(policy, context({"r1": reading(9)}, bounds=(1, 4)))[0] == 4


def test_holds_inside_the_band():
    # 2 replicas, 5 rows = 100 tokens/s: 83% of 120 is above the 70% target but under the 90% upscale mark
    policy = EnginePolicy(**params())
    replicas, _, reason = run(policy, context({"r1": reading(3), "r2": reading(2)}))
    assert replicas == 2 and "inside the band" in reason
    # a little more (6 rows = 100%) scales up
    assert run(policy, context({"r1": reading(3), "r2": reading(3)}))[0] == 3


def test_upscale_waits_for_its_delay():
    # 2.9 rows = 58 tokens/s: 97% of one replica, above the band but not past full capacity (not urgent)
    policy = EnginePolicy(**params(upscale_delay_s=10.0))
    state = {}
    for t, expected in ((0.0, 1), (5.0, 1), (10.0, 2)):
        replicas, state, _ = run(
            policy, context({"r1": reading(2.9)}, now=1000 + t, state=state, bounds=(1, 8))
        )
        assert replicas == expected, t


def test_demand_past_full_capacity_scales_up_without_the_delay_but_a_blip_waits():
    policy = EnginePolicy(**params(upscale_delay_s=10.0))
    # a sustained burst: the look-back mean itself is 300% of capacity -> 5 replicas at once
    replicas, _, reason = run(policy, context({"r1": reading(9)}, bounds=(1, 8)))
    assert replicas == 5 and "urgent" in reason
    # one high newest reading over a low mean (a blip): the same replicas are wanted, but only after the delay
    blip = context({"r1": reading(1)}, bounds=(1, 8))
    blip.raw_metrics["demanded_tps"]["r1"][-1] = TimeStampedValue(999.5, 9 * SLO)
    replicas, state, reason = run(EnginePolicy(**params(upscale_delay_s=10.0)), blip)
    assert (
        replicas == 1 and state[POLICY_STATE_KEY]["last_decision"]["wanted"] == 5 and "urgent" not in reason
    )


def test_scales_down_only_after_the_delay_and_a_blip_restarts_it():
    policy = EnginePolicy(**params(downscale_delay_s=60.0))
    idle = {f"r{i}": reading(0) for i in range(3)}
    busy = {f"r{i}": reading(2) for i in range(3)}  # 6 rows: needs all 3
    state = {}
    for t, fleet, expected in (
        (0, idle, 3),
        (30, idle, 3),
        (45, busy, 3),  # demand came back: the pending scale-down is forgotten
        (50, idle, 3),
        (100, idle, 3),  # 50 s since the scale-down was wanted again: not yet
        (110, idle, 1),
    ):
        replicas, state, _ = run(policy, context(fleet, now=1000 + t, state=state))
        assert replicas == expected, t


def test_respects_bounds():
    policy = EnginePolicy(**params())
    idle = {"r1": reading(0), "r2": reading(0), "r3": reading(0)}
    assert run(policy, context(idle, bounds=(2, 4)))[0] == 2
    flood = {"r1": reading(40), "r2": reading(40)}
    assert run(policy, context(flood, bounds=(1, 3)))[0] == 3


@pytest.mark.parametrize(
    "fleet, age",
    [
        ({"r1": None, "r2": None}, 0.5),  # no metrics at all (replicas just started)
        ({"r1": reading(0), "r2": reading(0)}, 120.0),  # every reading is stale
        ({"r1": reading(0), "r2": {"demanded_tps": None}}, 0.5),  # Serve's None for an expired window
    ],
)
def test_holds_when_metrics_are_missing_or_stale(fleet, age):
    policy = EnginePolicy(**params())
    state = {}
    for t in range(0, 100, 10):  # never moves, never queues a pending change
        replicas, state, reason = run(policy, context(fleet, now=1000 + t, age=age, state=state))
        assert replicas == 2 and "hold" in reason
        assert "pending" not in state[POLICY_STATE_KEY]


def test_partial_metrics_allow_scale_up_but_never_scale_down():
    policy = EnginePolicy(**params())
    # r2 is silent: the demand seen is a lower bound, enough to scale up on ...
    assert run(policy, context({"r1": reading(12), "r2": None}))[0] == 4
    # ... but never enough to scale down on
    replicas, _, reason = run(policy, context({"r1": reading(0), "r2": None, "r3": None}))
    assert replicas == 3 and "no fresh metrics from 2" in reason


def test_alternating_fresh_and_stale_readings_do_not_flap():
    policy = EnginePolicy(**params(downscale_delay_s=20.0))
    idle = {"r1": reading(0), "r2": reading(0)}
    state, seen = {}, set()
    for t in range(0, 200, 5):
        age = 0.5 if (t // 5) % 2 == 0 else 300.0  # every other tick the readings are stale
        replicas, state, _ = run(policy, context(idle, now=1000 + t, age=age, state=state))
        seen.add(replicas)
    assert seen == {2}  # a stale tick restarts the delay, so the scale-down never completes


def test_slo_guard_fires_on_a_bad_tail_with_a_fine_mean():
    policy = EnginePolicy(**params())
    # 4 rows over 2 replicas = 80 tokens/s: 67% utilisation, the demand rule alone would hold
    fine = {"r1": reading(2), "r2": reading(2)}
    assert run(policy, context(fine))[0] == 2
    bad_tail = {"r1": reading(2), "r2": reading(2, stream_tps_p50=35.0, stream_tps_p10=8.0)}
    replicas, _, reason = run(policy, context(bad_tail))
    assert replicas == 3 and "SLO guard" in reason and "p10" in reason
    slow_first = {"r1": reading(2, ttfc_pending_s=6.0), "r2": reading(2)}
    replicas, _, reason = run(policy, context(slow_first))
    assert replicas == 3 and "time to first canvas" in reason


def test_slo_guard_does_not_act_on_lightly_loaded_or_starting_replicas():
    policy = EnginePolicy(**params())
    # one row per replica: latency-bound, another replica cannot make that stream faster
    # (nor block the scale-down the demand asks for)
    light = {"r1": reading(1, stream_tps_p10=5.0), "r2": reading(1)}
    replicas, _, reason = run(policy, context(light))
    assert replicas == 1 and "SLO guard" not in reason
    # a third replica is already starting (target 3, 2 running): wait for it instead of adding a fourth
    loaded = {"r1": reading(3, stream_tps_p10=5.0), "r2": reading(3)}
    replicas, _, reason = run(policy, context(loaded, target=3))
    assert replicas == 3 and "waiting for starting replicas" in reason


def test_slo_guard_blocks_a_scale_down():
    policy = EnginePolicy(**params())
    # demand fits 1 replica, but the tail misses the SLO at 2 rows per replica: no scale-down (in fact +1)
    fleet = {"r1": reading(2, stream_tps_p10=5.0, capacity_tps=200.0), "r2": reading(2, capacity_tps=200.0)}
    assert run(policy, context(fleet))[0] == 3


def test_an_idle_fleet_scales_in_before_any_capacity_is_learned():
    idle = {"r": {"demand_rows": 0.0, "demanded_tps": 0.0}, "s": {"demand_rows": 0.0, "demanded_tps": 0.0}}
    assert run(EnginePolicy(**params()), context(idle))[0] == 1
    busy = {"r": {"demand_rows": 2.0, "demanded_tps": 40.0}, "s": {"demand_rows": 0.0, "demanded_tps": 0.0}}
    replicas, _, reason = run(EnginePolicy(**params()), context(busy))
    assert replicas == 2 and reason == "hold: no capacity learned yet"


def test_capacity_is_learned_across_ticks():
    policy = EnginePolicy(**params())
    _, state, _ = run(policy, context({"r1": reading(1, capacity_tps=100.0)}))
    assert state[POLICY_STATE_KEY]["capacity_tps"] == 100.0
    _, state, _ = run(policy, context({"r1": reading(1, capacity_tps=50.0)}, state=state))
    assert state[POLICY_STATE_KEY]["capacity_tps"] == pytest.approx(0.9 * 100 + 0.1 * 50)
    # a tick without capacity readings keeps what was learned
    no_capacity = reading(1)
    del no_capacity["capacity_tps"]
    _, state, _ = run(policy, context({"r1": no_capacity}, state=state))
    assert state[POLICY_STATE_KEY]["capacity_tps"] == pytest.approx(95.0)


def test_serve_internal_policy_state_is_kept():
    policy = EnginePolicy(**params())
    _, state, _ = run(policy, context({"r1": reading(1)}, state={"__decision_counter": 3}))
    assert state["__decision_counter"] == 3


def test_invalid_kwargs_are_refused_with_a_message():
    with pytest.raises(ValueError, match="slo_tokens_per_second must be > 0"):
        EnginePolicy(**params(slo_tokens_per_second=0))


def test_application_policy_sizes_expert_shards_with_engines():
    policy = ApplicationPolicy(**params(expert_shards_per_engine=2))
    engine = context({"r1": reading(9)}, bounds=(1, 8))
    shard = context({"s1": None, "s2": None})
    shard.deployment_name = "ExpertShard0"
    router = context({"q1": None})
    router.deployment_name = "Router"
    replicas, states = policy({"engine": engine, "shard": shard, "router": router})
    assert replicas == {"engine": 5, "shard": 10}  # the Router is left alone
    assert POLICY_STATE_KEY in states["engine"]


def test_rendered_configs_are_accepted_by_ray_serve():
    cfg = ClusterConfig.model_validate(
        {
            "engine": {"autoscaling": {"min_replicas": 1, "max_replicas": 3, "downscale_delay_s": 30}},
            "slo": {"tokens_per_second": 25, "time_to_first_canvas_s": 1.5},
        }
    )
    rendered = engine_autoscaling_config(cfg.engine.autoscaling, cfg.slo)
    ray_config = AutoscalingConfig(**rendered)  # imports the policy class by its path
    assert ray_config.max_replicas == 3 and ray_config.upscale_delay_s == 0
    assert ray_config.policy.policy_kwargs["downscale_delay_s"] == 30
    instance = ray_config.policy.get_policy()(**ray_config.policy.policy_kwargs)
    assert instance.params.slo_tokens_per_second == 25
    assert "expert_shards_per_engine" not in ray_config.policy.policy_kwargs  # fused mode: no shards
    app_policy = AutoscalingPolicy(**application_autoscaling_policy())
    assert app_policy.policy_function == "cluster.autoscaling:ApplicationPolicy"
    assert app_policy.policy_kwargs == {}  # read from the Engine's autoscaling_config (one source)


def test_replicas_push_at_rays_push_interval_variable():
    from cluster.app import engine_scaling
    from cluster.env import RAY_METRIC_PUSH_ENV, ray_metric_push_interval_s

    assert ray_metric_push_interval_s({}) is None
    assert ray_metric_push_interval_s({RAY_METRIC_PUSH_ENV: "0.5"}) == 0.5
    with pytest.raises(ValueError, match="must be > 0"):
        ray_metric_push_interval_s({RAY_METRIC_PUSH_ENV: "0"})
    cfg = ClusterConfig.model_validate({"engine": {"autoscaling": {"max_replicas": 2}}})
    # the test session sets the variable (tests/conftest.py): it reaches Serve's metrics_interval_s
    assert engine_scaling(cfg)["autoscaling_config"]["metrics_interval_s"] == 0.5
    assert engine_scaling(ClusterConfig()) == {"num_replicas": 1}


def test_fixed_replicas_and_autoscaling_do_not_mix():
    with pytest.raises(ValueError, match="engine.replicas=3 is a fixed count"):
        ClusterConfig.model_validate({"engine": {"replicas": 3, "autoscaling": {}}})
    with pytest.raises(ValueError, match="min_replicas=3 exceeds max_replicas=2"):
        ClusterConfig.model_validate({"engine": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_a_scale_down_goes_to_the_most_replicas_wanted_during_its_delay():
    policy = EnginePolicy(**params(downscale_delay_s=30.0))
    state = {}
    fleet = lambda rows: {f"r{i}": reading(rows) for i in range(4)}  # noqa: E731
    # 4 replicas: 1 row each needs 2 replicas, 0 rows needs 1; the delay ends on an idle tick
    for t, rows, expected in ((0, 1, 4), (10, 0, 4), (20, 1, 4), (30, 0, 2)):
        replicas, state, _ = run(policy, context(fleet(rows), now=1000 + t, state=state))
        assert replicas == expected, t


def _engine_config(**kwargs) -> AutoscalingConfig:
    cfg = ClusterConfig.model_validate({"engine": {"autoscaling": {"min_replicas": 1, "max_replicas": 8}}})
    rendered = engine_autoscaling_config(cfg.engine.autoscaling, cfg.slo, expert_shards_per_engine=2)
    rendered["policy"]["policy_kwargs"] |= kwargs
    return AutoscalingConfig(**rendered)


def test_application_policy_without_kwargs_reads_the_engines_own():
    """What the Serve config document declares (no kwargs), wrapped the way Serve's controller wraps an
    application-level policy (delays and scaling factors from each deployment's autoscaling_config; Serve then
    clamps each result to that deployment's bounds)."""
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

    from cluster.autoscaling import shard_autoscaling_config

    cfg = ClusterConfig.model_validate({"engine": {"autoscaling": {"min_replicas": 1, "max_replicas": 8}}})
    engine = context({"r1": reading(9)}, bounds=(1, 8))
    engine.config = _engine_config(slo_tokens_per_second=SLO, upscale_delay_s=0.0)
    shard = context({"s1": None, "s2": None}, bounds=(2, 16))
    shard.deployment_name = "ExpertShard0"
    shard.config = AutoscalingConfig(**shard_autoscaling_config(cfg.engine.autoscaling, 2))
    policy = _apply_app_level_autoscaling_config(ApplicationPolicy())
    replicas, states = policy({"engine": engine, "shard": shard})
    # 9 rows x 20 tokens/s over 60 x 0.7 per replica -> 5 Engines, so 2 x 5 replicas of the shard
    assert replicas == {"engine": 5, "shard": 10}
    assert states["shard"][POLICY_STATE_KEY] == {"engines": 5, "per_engine": 2}


def test_hold_policy_keeps_shards_where_they_are_without_the_application_policy():
    from cluster.autoscaling import HoldPolicy

    shard = context({"s1": None, "s2": None}, target=2)
    shard.total_num_requests = 500.0  # Serve's default policy would scale on this; shards follow Engines only
    assert HoldPolicy()(shard)[0] == 2


def test_document_declares_the_application_policy_only_with_autoscaling():
    from cluster.serve_config import deploy_schema, render_serve_config

    fixed = deploy_schema(render_serve_config(ClusterConfig())).applications[0]
    assert fixed.autoscaling_policy is None
    auto = ClusterConfig.model_validate({"engine": {"autoscaling": {"max_replicas": 3}}})
    app = deploy_schema(render_serve_config(auto)).applications[0]
    assert app.autoscaling_policy == {"policy_function": "cluster.autoscaling:ApplicationPolicy"}


def test_shards_get_bounds_per_engine_when_the_engines_autoscale(tmp_path):
    from cluster.app import shard_scaling

    disagg = {"execution_mode": "disaggregated"}
    fixed = ClusterConfig.model_validate({"engine": disagg, "experts": {"replicas_per_shard": 2}})
    assert shard_scaling(fixed) == {"num_replicas": 2}
    auto = ClusterConfig.model_validate(
        {
            "engine": disagg | {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
            "experts": {"replicas_per_shard": 2},
        }
    )
    config = AutoscalingConfig(**shard_scaling(auto)["autoscaling_config"])
    assert (config.min_replicas, config.initial_replicas, config.max_replicas) == (2, 2, 6)
    assert config.policy.policy_function == "cluster.autoscaling:HoldPolicy"


def test_growing_demand_is_urgent_before_its_mean_reaches_capacity():
    """Queue growth: the mean is still under one replica's capacity, but rising fast enough to pass it within
    `predict_s`; flat demand at the same mean waits for the delay."""

    def ctx(values: list[float]) -> AutoscalingContext:
        c = context({"r1": reading(sum(values) / len(values) / SLO)}, bounds=(1, 8))
        c.raw_metrics["demanded_tps"]["r1"] = [
            TimeStampedValue(1000.0 - 10 + i, v) for i, v in enumerate(values)
        ]
        return c

    rising = [
        10.0 + 5.0 * i for i in range(11)
    ]  # 10 -> 60 tokens/s over 10 s: mean 35, +5 tokens/s each second
    flat = [35.0] * 10 + [60.0]  # the same newest reading, no growth before it
    policy = EnginePolicy(**params(upscale_delay_s=10.0, predict_s=20.0))
    replicas, _, reason = run(policy, ctx(rising))
    assert replicas == 2 and "urgent" in reason  # 35 + 5 x 20 = 135 tokens/s ahead: 225% of 60
    replicas, _, reason = run(EnginePolicy(**params(upscale_delay_s=10.0, predict_s=20.0)), ctx(flat))
    assert replicas == 1 and "urgent" not in reason
