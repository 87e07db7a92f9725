"""`blockserve status`: applications, deployments, replicas and the Engine autoscaler's inputs and decision,
read from a running cluster.

Replica counts come from `serve.status()`; each deployment's target replica count, autoscaling config and
replica actors from the Serve controller's instance details (what the dashboard's REST API serves; the dashboard
itself stays off on these machines, so the controller client is asked directly, Ray Serve 2.60). Each running
Engine replica is asked for its readings through Serve's `record_routing_stats` replica hook (a handle call would
reach only one replica). The policy (cluster/autoscaling.py) is then run once on those readings: `wanted` is what
they ask for now; the policy's pending delay and learned capacity live in the controller and are not shown.
When the app was deployed from a Serve config document with the application-level policy, the application's
`autoscaling_policy` entry shows that policy's inputs and the replicas it wants for the Engine and every
ExpertShard<i> deployment.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.autoscaling import ENGINE, EXPERT_SHARD, PolicyParams, decide

SERVE_NAMESPACE = "serve"  # Ray Serve's actors live in this namespace
READING_TIMEOUT_S = 5.0


class _Sample:
    def __init__(self, timestamp: float, value: float):
        self.timestamp, self.value = timestamp, value


class _Context:
    """The fields of Serve's AutoscalingContext that `decide` reads."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def engine_readings(replicas: list[dict]) -> dict[str, dict[str, float] | str]:
    """Running Engine replica id -> its readings (or the error that stopped them)."""
    import ray

    refs = {}
    for r in replicas:
        if r.get("state") == "RUNNING" and r.get("actor_name"):
            actor = ray.get_actor(r["actor_name"], namespace=SERVE_NAMESPACE)
            refs[r["replica_id"]] = actor.record_routing_stats.remote()
    out: dict[str, dict[str, float] | str] = {}
    for rid, ref in refs.items():
        try:
            out[rid] = ray.get(ref, timeout=READING_TIMEOUT_S)
        except Exception as e:  # one unresponsive replica must not hide the others
            out[rid] = f"{type(e).__name__}: {e}"
    return out


def autoscaling_view(deployment: dict, readings: dict, now: float) -> dict[str, Any] | None:
    """The Engine policy's inputs and decision on `readings`, or None when the deployment does not autoscale
    with it."""
    config = (deployment.get("deployment_config") or {}).get("autoscaling_config")
    if not config:
        return None
    kwargs = (config.get("policy") or {}).get("policy_kwargs") or {}
    try:
        params = PolicyParams(**kwargs)
    except TypeError:
        return {
            "policy": (config.get("policy") or {}).get("policy_function"),
            "note": "not blockserve's policy",
        }
    good = {rid: r for rid, r in readings.items() if isinstance(r, dict)}
    aggregated: dict[str, dict] = {}
    for rid, values in good.items():
        for name, value in values.items():
            aggregated.setdefault(name, {})[rid] = value
    target = int(deployment.get("target_num_replicas", len(readings)))
    ctx = _Context(
        current_num_replicas=len(readings),
        target_num_replicas=target,
        running_replicas=list(readings),
        aggregated_metrics=aggregated,
        raw_metrics={
            name: {rid: [_Sample(now, v)] for rid, v in vals.items()} for name, vals in aggregated.items()
        },
        capacity_adjusted_min_replicas=config.get("min_replicas", 1),
        capacity_adjusted_max_replicas=config.get("max_replicas", target),
        policy_state={},
        current_time=now,
    )
    decision = decide(ctx, params, state={})
    return {
        "min_replicas": config.get("min_replicas"),
        "max_replicas": config.get("max_replicas"),
        "slo": {
            "tokens_per_second": params.slo_tokens_per_second,
            "ttfc_s": params.slo_time_to_first_canvas_s,
        },
        "inputs": decision.summary()["view"],
        "capacity_tps": decision.capacity_tps,
        "wanted": decision.wanted,
        "reason": decision.reason,
        "expert_shards_per_engine": params.expert_shards_per_engine,
    }


def application_policy(app_config: dict, deployments: dict[str, dict]) -> dict[str, Any] | None:
    """The application-level policy's inputs and decision (None when the app has none): the Engines' inputs and
    wanted count (as `autoscaling_view`), and the replicas each ExpertShard<i> deployment would follow with."""
    declared = app_config.get("autoscaling_policy")
    if not declared:
        return None
    out: dict[str, Any] = {"scope": "application", "policy": declared.get("policy_function")}
    engine = (deployments.get(ENGINE) or {}).get("autoscaling")
    if not engine or "wanted" not in engine:
        return out | {"note": "no Engine autoscaling readings"}
    per_engine = engine.get("expert_shards_per_engine", 0)
    wanted = {ENGINE: engine["wanted"]}
    for name in deployments:
        if name.startswith(EXPERT_SHARD) and per_engine:
            wanted[name] = engine["wanted"] * per_engine
    inputs = {"engine": engine["inputs"], "capacity_tps": engine["capacity_tps"], "slo": engine["slo"]}
    current = {name: dep.get("target_replicas") for name, dep in deployments.items() if name in wanted}
    return out | {
        "inputs": inputs,
        "expert_shards_per_engine": per_engine,
        "target_replicas": current,
        "wanted": wanted,
        "reason": engine["reason"],
    }


def collect() -> dict[str, Any]:
    """Status of every Serve application on the cluster `ray` is connected to."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client

    status = serve.status()
    details = _get_global_client().get_serve_details()
    out: dict[str, Any] = {"applications": {}}
    for app_name, app in status.applications.items():
        app_details = (details.get("applications") or {}).get(app_name, {})
        deployments = {}
        for dep_name, dep in app.deployments.items():
            dep_details = (app_details.get("deployments") or {}).get(dep_name, {})
            states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
            entry: dict[str, Any] = {
                "status": str(getattr(dep.status, "value", dep.status)),
                "target_replicas": dep_details.get("target_num_replicas"),
                "replicas": states,
            }
            if dep_name == ENGINE:
                readings = engine_readings(dep_details.get("replicas") or [])
                entry["readings"] = readings
                view = autoscaling_view(dep_details, readings, time.time())
                if view is not None:
                    entry["autoscaling"] = view
            deployments[dep_name] = entry
        out["applications"][app_name] = {
            "status": str(getattr(app.status, "value", app.status)),
            "deployments": deployments,
        }
        policy = application_policy(app_details.get("deployed_app_config") or {}, deployments)
        if policy is not None:
            out["applications"][app_name]["autoscaling_policy"] = policy
    return out


def render(status: dict[str, Any]) -> str:
    """Human-readable form of `collect()`."""
    lines = []
    for app_name, app in status["applications"].items():
        lines.append(f"application {app_name}: {app['status']}")
        for dep_name, dep in app["deployments"].items():
            states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(dep["replicas"].items())) or "none"
            lines.append(
                f"  {dep_name}: {dep['status']}, target {dep['target_replicas']}, replicas: {states}"
            )
            for rid, reading in (dep.get("readings") or {}).items():
                lines.append(f"    {rid}: {_reading_line(reading)}")
            auto = dep.get("autoscaling")
            if auto and "wanted" in auto:
                inputs = auto["inputs"]
                lines.append(
                    f"    autoscaling {auto['min_replicas']}..{auto['max_replicas']}: demand "
                    f"{inputs['demand_tps']:.0f} tokens/s over capacity {_num(auto['capacity_tps'])} tokens/s per "
                    f"replica -> wants {auto['wanted']} ({auto['reason']})"
                )
        policy = app.get("autoscaling_policy")
        if policy and "wanted" in policy:
            wanted = ", ".join(f"{name} {n}" for name, n in policy["wanted"].items())
            lines.append(f"  application policy {policy['policy']}: wants {wanted} ({policy['reason']})")
    return "\n".join(lines) if lines else "no Serve applications"


def _num(value) -> str:
    return "?" if value is None else f"{value:.0f}"


def _reading_line(reading) -> str:
    if not isinstance(reading, dict):
        return f"no readings ({reading})"
    keys = ("demand_rows", "delivered_tps", "stream_tps_p10", "ttfc_p90_s", "occupancy", "capacity_tps")
    return ", ".join(f"{k} {reading[k]:.2f}" for k in keys if k in reading)


def main_status(address: str, as_json: bool) -> int:
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster at {address!r} ({e}); start one with `blockserve serve`") from None
    try:
        status = collect()
    finally:
        ray.shutdown()
    print(json.dumps(status, indent=2, default=str) if as_json else render(status))
    return 0
