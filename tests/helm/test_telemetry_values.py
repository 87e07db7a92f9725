"""The chart's telemetry against ClusterConfig's: every telemetry field of either side has a declared home on the
other, and the tracing environment the chart renders on every Ray pod is exactly what cluster/telemetry.py sets
before `ray.init` for the same config (so a trace behaves the same under `blockserve serve` and on Kubernetes)."""

from __future__ import annotations

import pytest

from cluster import telemetry
from cluster.config import ClusterConfig, TelemetrySection
from tests.helm.chart import VALUES_FILES, merged_values, one, overlay, render

# ClusterConfig.telemetry field -> how the chart carries it to the processes that read it
CONFIG_FIELDS = {
    "otlp_endpoint": "pod environment (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, the exporter import path)",
    "sampling_ratio": "pod environment (RAY_SERVE_TRACING_SAMPLING_RATIO)",
    "service_name": "pod environment (OTEL_SERVICE_NAME)",
    "log_requests": "the Serve application's args (serveConfigV2: the Router's request log)",
    "log_prompts": "the Serve application's args (serveConfigV2: the Router's request log)",
}
# the chart's own `telemetry.*` keys -> why ClusterConfig has no such field
CHART_ONLY = {
    "exporterImportPath": "Kubernetes only: which span processors Serve loads (locally always the OTLP one)",
}
TRACING_VARS = {
    telemetry.SERVE_EXPORTER_VAR,
    telemetry.SERVE_RATIO_VAR,
    telemetry.SERVICE_NAME_VAR,
    *telemetry.ENDPOINT_VARS,
}


def test_every_telemetry_field_has_a_home_on_the_other_side():
    assert set(TelemetrySection.model_fields) == set(CONFIG_FIELDS), (
        "ClusterConfig.telemetry and this table disagree: say how the chart carries a new field"
    )
    chart_keys = set(merged_values({})["telemetry"])
    assert chart_keys == set(CHART_ONLY), (
        f"the chart's telemetry keys {sorted(chart_keys)}: a key that duplicates a ClusterConfig field belongs "
        "under config.telemetry"
    )


def _pod_envs(values: dict) -> list[dict[str, str]]:
    cluster = one(render(values), "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    return [
        {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0]["env"]} for g in groups
    ]


def _expected(values: dict) -> dict[str, str]:
    config = ClusterConfig.model_validate(merged_values(values)["config"])
    return telemetry.tracing_env(
        config.telemetry.otlp_endpoint,
        config.telemetry.sampling_ratio,
        config.telemetry.service_name,
        environ={},
    )


OVERRIDES = [
    {},
    {"config": {"telemetry": {"otlp_endpoint": "http://collector:4317", "service_name": "bs-prod"}}},
    {"config": {"telemetry": {"otlp_endpoint": "http://collector:4317", "sampling_ratio": 1}}},
]


@pytest.mark.parametrize("override", OVERRIDES, ids=["defaults", "endpoint+name", "endpoint+ratio"])
@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_tracing_env_equals_what_ray_init_gets_locally(values_file, override):
    values = {**overlay(values_file)}
    values["config"] = {**values.get("config", {}), **override.get("config", {})}
    expected = _expected(values)
    for env in _pod_envs(values):
        rendered = {k: v for k, v in env.items() if k in TRACING_VARS}
        if not expected:  # tracing off: ray.init gets nothing; the pods may only name the service and a ratio
            assert telemetry.SERVE_EXPORTER_VAR not in rendered
            assert not set(telemetry.ENDPOINT_VARS) & set(rendered)
            continue
        assert set(rendered) == set(expected)
        for name, value in expected.items():
            if name == telemetry.SERVE_RATIO_VAR:
                assert float(rendered[name]) == float(value)
            else:
                assert rendered[name] == value, name


def test_metrics_port_is_config_server_metrics_port():
    values = {"config": {"server": {"metrics_port": 9123}}}
    docs = render(values)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", []):
        assert group["rayStartParams"]["metrics-export-port"] == "9123"
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 9123
    assert ClusterConfig().server.metrics_port == int(
        one(render({}), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"][
            "metrics-export-port"
        ]
    )
