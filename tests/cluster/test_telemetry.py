"""cluster/telemetry.py (the tracing environment of every Ray process), the `telemetry` config section, and
the Grafana dashboard's queries against the metrics the deployments register."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster import telemetry
from cluster.config import ClusterConfig
from deployments import observability as obs

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "blockserve" / "dashboards" / "blockserve.json"


def test_no_endpoint_means_tracing_off():
    assert telemetry.tracing_env("", 1.0, environ={}) == {}
    environ = {}
    assert telemetry.apply_tracing_env(environ=environ) == {} and environ == {}


def test_endpoint_from_config_or_the_standard_variables():
    env = telemetry.tracing_env("http://127.0.0.1:4317", 0.25, environ={})
    assert env == {
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "cluster.telemetry:span_processors",
        "RAY_SERVE_TRACING_SAMPLING_RATIO": "0.25",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_SERVICE_NAME": "blockserve",
    }
    generic = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SERVICE_NAME": "edge"}
    env = telemetry.tracing_env(environ=generic)
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:1"
    assert env["OTEL_SERVICE_NAME"] == "edge"  # the operator's own service name wins
    specific = {**generic, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:2"}
    assert telemetry.otlp_endpoint("", specific) == "http://127.0.0.1:2"
    assert telemetry.otlp_endpoint("http://127.0.0.1:3", specific) == "http://127.0.0.1:3"
    with pytest.raises(ValueError, match="sampling_ratio"):
        telemetry.tracing_env("http://127.0.0.1:4317", 1.5, environ={})


def test_span_processors_export_over_otlp_grpc_to_the_configured_endpoint(monkeypatch):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4999")
    (processor,) = telemetry.span_processors()
    try:
        assert isinstance(processor, BatchSpanProcessor)
        exporter = processor._batch_processor._exporter  # no public accessor; the SDK's own tests do this
        assert isinstance(exporter, OTLPSpanExporter)
        assert exporter._endpoint == "127.0.0.1:4999"
    finally:
        processor.shutdown()


def test_config_section_reaches_the_environment_and_the_router():
    config = ClusterConfig.model_validate(
        {"telemetry": {"otlp_endpoint": "http://127.0.0.1:4317", "sampling_ratio": 0.1, "log_prompts": True}}
    )
    environ = {}
    telemetry.apply_config(config.telemetry, environ)
    assert environ["RAY_SERVE_TRACING_SAMPLING_RATIO"] == "0.1"
    assert config.server.metrics_port == 8080
    assert telemetry.ray_init_metrics_kwargs(9100) == {"_metrics_export_port": 9100}
    with pytest.raises(ValidationError, match="sampling_ratio"):
        ClusterConfig.model_validate({"telemetry": {"sampling_ratio": 2}})


def test_dashboard_queries_name_registered_metrics_only():
    dashboard = json.loads(DASHBOARD.read_text())
    registered = {f"ray_{s.name}" for s in obs.METRICS}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {f"ray_{s.name}{x}" for s in obs.METRICS for x in suffixes[s.kind]}
    used = set()
    titles = [p["title"] for p in dashboard["panels"]]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"ray_blockserve_\w+", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            used |= names
    for wanted in (
        "Throughput",
        "latency",
        "Time to first canvas",
        "SLO",
        "Steps per canvas",
        "Rows per forward",
    ):
        assert any(wanted.lower() in t.lower() for t in titles), wanted
    assert any("KV" in t for t in titles) and any("Errors" in t for t in titles)
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert shown == registered  # every metric we export is on the dashboard
