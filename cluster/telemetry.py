"""Tracing set-up for every Ray process: where spans go, how many requests are sampled.

Ray Serve opens its own spans (proxy, handle routing, replica) and sets an OpenTelemetry tracer provider in each
of its processes, but in Ray 2.60.0 `serve.start(tracing_config=...)` reaches the replicas and never the
proxies, so the proxy ignores a client's `traceparent` and every request starts a new trace. Serve's
environment variables do reach every process: `RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH` (a function returning
span processors; we point it at `span_processors` below) and `RAY_SERVE_TRACING_SAMPLING_RATIO` (Serve's
default is 0.01). They must be in the environment before `ray.init`, which starts the processes that inherit
them; on Kubernetes the Helm chart sets the same variables on the head and every worker group.

The exporter is OTLP over gRPC, configured by the standard OpenTelemetry variables
(`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_SERVICE_NAME`, `OTEL_BSP_*` for batching), or by `ClusterConfig.telemetry`. With no endpoint anywhere,
tracing stays off: Serve installs no provider and our span helpers (deployments/observability.py) return at
once. Sampling is parent-based: a client's sampled `traceparent` is always followed; requests without one are
sampled at `sampling_ratio`.

Metrics need no set-up here: `ray.serve.metrics` go out through Ray's Prometheus endpoint
(`ray.init(_metrics_export_port=server.metrics_port)`, see `ray_init_metrics_kwargs`).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

EXPORTER_IMPORT_PATH = "cluster.telemetry:span_processors"
SERVE_EXPORTER_VAR = "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"
SERVE_RATIO_VAR = "RAY_SERVE_TRACING_SAMPLING_RATIO"
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SERVICE_NAME_VAR = "OTEL_SERVICE_NAME"


def otlp_endpoint(configured: str = "", environ: MutableMapping[str, str] = os.environ) -> str:
    """The endpoint spans go to: the config's, else the standard variables' (traces-specific first)."""
    return configured or next((environ[v] for v in ENDPOINT_VARS if environ.get(v)), "")


def tracing_env(
    endpoint: str = "",
    sampling_ratio: float = 1.0,
    service_name: str = "blockserve",
    environ: MutableMapping[str, str] = os.environ,
) -> dict[str, str]:
    """The variables every Ray process needs for tracing; empty when no endpoint is configured (tracing off).

    The caller's own `OTEL_SERVICE_NAME` wins over `service_name`, as OpenTelemetry users expect."""
    if not 0.0 <= sampling_ratio <= 1.0:
        raise ValueError(f"sampling_ratio={sampling_ratio}: give a fraction of requests in [0, 1]")
    url = otlp_endpoint(endpoint, environ)
    if not url:
        return {}
    return {
        SERVE_EXPORTER_VAR: EXPORTER_IMPORT_PATH,
        SERVE_RATIO_VAR: repr(float(sampling_ratio)),
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url,
        SERVICE_NAME_VAR: environ.get(SERVICE_NAME_VAR) or service_name,
    }


def apply_tracing_env(
    endpoint: str = "",
    sampling_ratio: float = 1.0,
    service_name: str = "blockserve",
    environ: MutableMapping[str, str] = os.environ,
) -> dict[str, str]:
    """Put `tracing_env(...)` into `environ` (call before `ray.init`); returns what was set."""
    values = tracing_env(endpoint, sampling_ratio, service_name, environ)
    environ.update(values)
    return values


def apply_config(telemetry, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """`apply_tracing_env` from a `ClusterConfig.telemetry` section."""
    return apply_tracing_env(
        telemetry.otlp_endpoint, telemetry.sampling_ratio, telemetry.service_name, environ
    )


def span_processors() -> list:
    """Called by Ray Serve in each of its processes (proxy, controller, replicas) when tracing is set up.

    A batching processor: spans are queued and exported off the request path by a background thread.
    The endpoint, headers and batching come from the OTEL_* variables `tracing_env` put in the environment."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


def ray_init_metrics_kwargs(metrics_port: int) -> dict[str, int]:
    """`ray.init` keyword arguments that export Prometheus metrics (ours: `ray_blockserve_*`) on the port."""
    return {"_metrics_export_port": metrics_port}
