"""The Helm chart, offline, for every shipped values file: it lints, renders, validates against the KubeRay
v1.7.0 RayService CRD (unknown fields rejected) and Kubernetes' schemas, embeds the Serve config document
`blockserve render-serve-config` prints, and asks for exactly the GPUs the Serve deployments need."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from cluster.app import APP_NAME
from cluster.config import ClusterConfig
from cluster.env import DEFAULT_MODEL_PATH
from tests.helm.chart import (
    CHART,
    CRD_FILE,
    KUBE_VERSION,
    VALUES_FILES,
    lint,
    merged_values,
    one,
    overlay,
    render,
    validate_rayservice,
)

needs_crd = pytest.mark.skipif(
    not CRD_FILE.exists(), reason=f"KubeRay CRD not found at {CRD_FILE} (set KUBERAY_CRD)"
)


def _needs_section(values_file: str) -> None:
    # The disaggregated file uses config sections another change adds; say so instead of failing on them.
    config = overlay(values_file).get("config", {})
    missing = [k for k in config if k not in ClusterConfig.model_fields]
    if missing:
        pytest.skip(f"{values_file}: ClusterConfig has no section {missing} yet")


@pytest.fixture(params=VALUES_FILES)
def values_file(request) -> str:
    _needs_section(request.param)
    return request.param


def _config(values_file: str) -> ClusterConfig:
    return ClusterConfig.model_validate(merged_values(overlay(values_file))["config"])


def test_chart_lints_clean(values_file):
    report = lint(overlay(values_file))
    assert report["errors"] == [], report
    worse = [m for m in report["messages"] if m["severity"] >= 2]
    assert worse == [], worse


@needs_crd
def test_rayservice_validates_against_the_kuberay_crd(values_file):
    validate_rayservice(one(render(overlay(values_file)), "RayService"))


@needs_crd
def test_the_crd_check_rejects_unknown_fields():
    doc = one(render(), "RayService")
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["gpuz"] = 1
    doc["spec"]["serveConfigV3"] = "x"
    with pytest.raises(AssertionError) as e:
        validate_rayservice(doc)
    assert "gpuz" in str(e.value) and "serveConfigV3" in str(e.value)


def test_builtin_kinds_validate(values_file):
    import kubernetes_validate

    values = overlay(values_file)
    values.update(
        networkPolicy={"enabled": True, "allowedNamespaces": ["apps"], "metricsNamespaces": ["monitoring"]}
    )
    kinds = set()
    for doc in render(values):
        if doc["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            continue  # custom resources: the CRD check above (ServiceMonitor: no schema shipped here)
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert {"Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_serve_config_is_the_documented_one_and_parses(values_file):
    from cluster.serve_config import deploy_schema, render_serve_config

    embedded = yaml.safe_load(one(render(overlay(values_file)), "RayService")["spec"]["serveConfigV2"])
    assert embedded == render_serve_config(_config(values_file))
    schema = deploy_schema(embedded)
    (app,) = schema.applications
    assert app.name == APP_NAME and app.route_prefix
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    for servicer in schema.grpc_options.grpc_servicer_functions:
        module, _, attr = servicer.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))
    ClusterConfig.model_validate(app.args)  # the builder's own validation


def _serve_gpus(config: ClusterConfig) -> tuple[float, float]:
    """GPUs the Serve deployments of `config` ask for, at deploy time and at their most replicas."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from cluster.app import build_app

    built = build_serve_app(build_app(config), name=APP_NAME)
    low = high = 0.0
    x = config.experts
    actor = config.engine.execution_mode == "disaggregated" and x.transport == "actor"
    for d in built.deployments:
        gpus = (d.ray_actor_options or {}).get("num_gpus", 0) or 0
        if actor and d.name.startswith("ExpertShard"):
            gpus = x.num_gpus  # each shard replica starts a worker actor that holds its GPU (cluster/app.py)
        auto = d._deployment_config.autoscaling_config
        least, most = (auto.min_replicas, auto.max_replicas) if auto else (d.num_replicas, d.num_replicas)
        low, high = low + gpus * least, high + gpus * most
    return low, high


def _local_stand_in(config: ClusterConfig, num_experts: int, tmp_path) -> ClusterConfig:
    """`config` with model.path on a local checkpoint config of the same expert count when the real one (a
    path on the cluster's volume) is not here: building the app reads the checkpoint's config.json only."""
    if Path(config.model.path, "config.json").exists():
        return config
    data = json.loads((DEFAULT_MODEL_PATH / "config.json").read_text())
    data["text_config"]["num_experts"] = num_experts
    (tmp_path / "config.json").write_text(json.dumps(data))
    return config.model_copy(update={"model": config.model.model_copy(update={"path": str(tmp_path)})})


def test_gpu_pods_hold_exactly_the_gpus_serve_asks_for(values_file, tmp_path):
    values = merged_values(overlay(values_file))
    config = _local_stand_in(_config(values_file), values["checkpoint"]["numExperts"], tmp_path)
    low, high = _serve_gpus(config)
    spec = one(render(overlay(values_file)), "RayService")["spec"]["rayClusterConfig"]
    groups = spec.get("workerGroupSpecs", [])
    resource = values["gpu"]["resourceName"]
    if high == 0:
        assert groups == [], "a config without GPUs gets no GPU pods"
        return
    (group,) = groups
    per_pod = group["template"]["spec"]["containers"][0]["resources"]["limits"][resource]
    assert per_pod == group["template"]["spec"]["containers"][0]["resources"]["requests"][resource]
    assert group["minReplicas"] * per_pod == math.ceil(low / per_pod) * per_pod >= low
    assert group["maxReplicas"] * per_pod == math.ceil(high / per_pod) * per_pod >= high
    # at deploy time the shipped files waste no GPU; at most Engines the last whole pod may have spare GPUs
    # (with engine.autoscaling, ExpertShards scale with the Engines: the application-level policy)
    assert group["minReplicas"] * per_pod == low
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True


def test_ports_telemetry_and_volumes(values_file):
    values = merged_values(overlay(values_file))
    docs = render(overlay(values_file))
    grpc = one(docs, "Service", "-grpc")
    assert grpc["spec"]["ports"][0]["name"] == "serve-grpc"
    assert grpc["spec"]["ports"][0]["port"] == values["config"]["server"]["grpc_port"]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    for group in pods:
        container = group["template"]["spec"]["containers"][0]
        assert "serve-grpc" in {p["name"] for p in container["ports"]}
        env = {e["name"] for e in container["env"]}
        assert {"RAY_SERVE_TRACING_SAMPLING_RATIO", "OTEL_SERVICE_NAME"} <= env
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts
        path = values["config"].get("model", {}).get("path")
        if path:  # a checkpoint outside the image is mounted where config.model.path points
            assert any(path.startswith(m) for m in mounts if m != "/dev/shm")


@pytest.mark.parametrize("endpoint", ["", "http://otel-collector.observability:4317"])
def test_tracing_exporter_is_set_only_with_an_endpoint(endpoint):
    docs = render({"config": {"telemetry": {"otlp_endpoint": endpoint}}})
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", []):
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        if endpoint:
            assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == endpoint
            module, _, function = env["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"].partition(":")
            assert callable(getattr(importlib.import_module(module), function))  # Serve imports it by name
        else:  # no collector: Serve installs no exporter that would retry a missing endpoint
            assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in env
            assert "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH" not in env


@pytest.mark.parametrize("with_file", [False, True])
def test_dashboard_configmap_only_when_the_file_exists(tmp_path, with_file):
    import helm_python

    chart = tmp_path / "blockserve"
    shutil.copytree(CHART, chart)
    dashboard = chart / "dashboards" / "blockserve.json"
    dashboard.unlink(missing_ok=True)
    if with_file:
        dashboard.parent.mkdir(exist_ok=True)
        dashboard.write_text(json.dumps({"title": "blockserve", "panels": []}))

    def configmaps(enabled: bool) -> list[dict]:
        with helm_python.Chart.load(str(chart)) as loaded:
            manifests = loaded.render({"grafanaDashboard": {"enabled": enabled}}, name="bs")
        texts = [text for path, text in manifests.items() if path.endswith(".yaml")]
        docs = [d for text in texts for d in yaml.safe_load_all(text) if d]
        return [d for d in docs if d.get("kind") == "ConfigMap"]

    maps = configmaps(True)
    if with_file:
        assert len(maps) == 1 and json.loads(maps[0]["data"]["blockserve.json"])["title"] == "blockserve"
        assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    else:
        assert maps == []
    assert configmaps(False) == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"engine": {"replicas": -1}}}, "/config/engine/replicas': minimum: got -1, want 1"),
        ({"config": {"engine": {"max_rowz": 4}}}, "additional properties 'max_rowz' not allowed"),
        ({"config": {"sampling": {"t_min": "warm"}}}, "/config/sampling/t_min"),
        ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
        ({"engineWorkers": {"gpusPerPod": 0}}, "/engineWorkers/gpusPerPod': minimum: got 0, want 1"),
        (
            {"checkpoint": {"pvc": {"claimName": "w"}}, "config": {"model": {"path": "/elsewhere/m"}}},
            "config.model.path must lie under checkpoint.mountPath /models",
        ),
        (
            {"checkpoint": {"download": {"enabled": True}}},
            "checkpoint.download.enabled needs checkpoint.download.repo",
        ),
    ],
)
def test_bad_values_fail_at_render_time_with_a_clear_message(values, message):
    import helm_python

    with pytest.raises(helm_python.HelmError) as e:
        render(values)
    assert message in str(e.value)


def test_a_shard_split_that_misses_the_expert_count_fails_at_render_time():
    import helm_python

    if "experts" not in ClusterConfig.model_fields:
        pytest.skip("ClusterConfig has no experts section yet")
    values = overlay("values-8xh100-disaggregated.yaml")
    values["config"]["experts"]["split"] = [64, 32, 16]
    with pytest.raises(helm_python.HelmError, match=r"sums to 112 but checkpoint.numExperts is 128"):
        render(values)


def test_every_alert_is_documented():
    rule = one(render({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    operations = (CHART.parents[1] / "docs" / "OPERATIONS.md").read_text()
    assert alerts and all(f"`{a}`" in operations for a in alerts), alerts


def test_new_cluster_on_config_change_stamps_the_config_on_the_head_pod():
    def stamp(values):
        head = one(render(values), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
        return (head["template"]["metadata"].get("annotations") or {}).get("blockserve/serve-config-sha256")

    assert stamp({}) is None
    on = {"newClusterOnConfigChange": True}
    first, second = stamp(on), stamp({**on, "config": {"engine": {"max_rows": 7}}})
    assert first and second and first != second
