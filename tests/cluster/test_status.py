"""`blockserve status` rendering and its autoscaling view, on fabricated Serve details (no Ray cluster; the live
test in tests/integration/test_autoscaling_live.py reads a real one)."""

from __future__ import annotations

import json

from cluster.autoscaling import engine_autoscaling_config
from cluster.config import ClusterConfig
from cluster.status import autoscaling_view, render


def engine_details(target: int = 1) -> dict:
    cfg = ClusterConfig.model_validate(
        {"engine": {"autoscaling": {"max_replicas": 3}}, "slo": {"tokens_per_second": 20}}
    )
    return {
        "target_num_replicas": target,
        "deployment_config": {
            "autoscaling_config": engine_autoscaling_config(cfg.engine.autoscaling, cfg.slo)
        },
    }


def reading(rows: float) -> dict[str, float]:
    return {"demand_rows": rows, "demanded_tps": 20.0 * rows, "delivered_tps": 15.0, "capacity_tps": 60.0}


def test_view_shows_the_inputs_and_what_the_policy_wants():
    view = autoscaling_view(engine_details(), {"r1": reading(9)}, now=100.0)
    assert view["wanted"] == 3 and "demand 180 tokens/s" in view["reason"]
    assert view["inputs"]["demand_tps"] == 180.0 and view["capacity_tps"] == 60.0
    assert view["min_replicas"] == 1 and view["max_replicas"] == 3
    # an unreachable replica is listed as missing and blocks a scale-down
    view = autoscaling_view(engine_details(target=2), {"r1": reading(0), "r2": "GetTimeoutError"}, now=100.0)
    assert view["wanted"] == 2 and view["inputs"]["missing"] == ["r2"]


def test_fixed_replica_count_has_no_autoscaling_view():
    assert autoscaling_view({"deployment_config": {}}, {}, now=0.0) is None


def test_render_is_readable_and_json_serialisable():
    status = {
        "applications": {
            "blockserve": {
                "status": "RUNNING",
                "deployments": {
                    "Engine": {
                        "status": "UPSCALING",
                        "target_replicas": 2,
                        "replicas": {"RUNNING": 1, "STARTING": 1},
                        "readings": {"r1": reading(9), "r2": "RayActorError: gone"},
                        "autoscaling": autoscaling_view(engine_details(), {"r1": reading(9)}, now=1.0),
                    },
                    "Router": {"status": "HEALTHY", "target_replicas": 1, "replicas": {"RUNNING": 1}},
                },
            }
        }
    }
    text = render(status)
    assert "Engine: UPSCALING, target 2, replicas: 1 running, 1 starting" in text
    assert "r2: no readings (RayActorError: gone)" in text
    assert "autoscaling 1..3: demand 180 tokens/s over capacity 60 tokens/s per replica -> wants 3" in text
    json.dumps(status)
    assert render({"applications": {}}) == "no Serve applications"


def test_application_policy_view_sizes_every_shard_with_the_engines():
    from cluster.autoscaling import application_autoscaling_policy
    from cluster.status import application_policy

    cfg = ClusterConfig.model_validate({"engine": {"autoscaling": {"max_replicas": 3}}})
    details = {
        "target_num_replicas": 1,
        "deployment_config": {
            "autoscaling_config": engine_autoscaling_config(
                cfg.engine.autoscaling, cfg.slo, expert_shards_per_engine=2
            )
        },
    }
    engine = {"target_replicas": 1, "autoscaling": autoscaling_view(details, {"r1": reading(9)}, now=1.0)}
    deployments = {"Engine": engine, "ExpertShard0": {"target_replicas": 2}, "Router": {"target_replicas": 1}}
    app_config = {"autoscaling_policy": application_autoscaling_policy()}
    view = application_policy(app_config, deployments)
    assert view["scope"] == "application" and view["policy"] == "cluster.autoscaling:ApplicationPolicy"
    assert view["wanted"] == {"Engine": 3, "ExpertShard0": 6}  # the Router is not the policy's
    assert view["target_replicas"] == {"Engine": 1, "ExpertShard0": 2}
    assert view["inputs"]["engine"]["demand_tps"] == 180.0
    assert application_policy({}, deployments) is None  # deployed with serve.run: no application policy
    text = render(
        {"applications": {"blockserve": {"status": "RUNNING", "deployments": {}, "autoscaling_policy": view}}}
    )
    assert "application policy cluster.autoscaling:ApplicationPolicy: wants Engine 3, ExpertShard0 6" in text
