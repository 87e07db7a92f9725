"""The Helm chart's `values.schema.json`, generated: ClusterConfig's JSON Schema under `config`, plus the chart's
own keys (image, pods, checkpoint volume, telemetry, optional objects).

Helm validates values against this schema on every install, upgrade, lint and template, so a negative replica
count, a misspelt key or a wrong type fails before anything reaches the cluster, with a message naming the
key. `config` is generated from cluster/config.py (its defaults and bounds appear as `default`, `minimum`,
...), never written by hand: `make helm-schema` rewrites the file and tests/helm fails while it is stale.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.config import ClusterConfig

SCHEMA_FILE = "helm/blockserve/values.schema.json"

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}  # a Kubernetes object passed through as written (resources, nodeSelector, ...)
_LIST = {"type": "array"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(description: str, **properties: dict) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "properties": properties,
    }


def _int(minimum: int, description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if description:
        out["description"] = description
    return out


def _pods(description: str) -> dict[str, Any]:
    return _obj(
        description,
        resources=_OBJ,
        nodeSelector=_STR_MAP,
        tolerations=_LIST,
        rayStartParams=_STR_MAP,
        labels=_STR_MAP,
        annotations=_STR_MAP,
        gpusPerPod=_int(1, "GPUs of one worker pod (the pod's nvidia.com/gpu request and limit)"),
        idleTimeoutSeconds=_int(0, "Seconds an idle worker pod stays before the autoscaler removes it"),
    )


CHART_PROPERTIES: dict[str, Any] = {
    "nameOverride": _STR,
    "fullnameOverride": _STR,
    "rayVersion": _STR,
    "image": _obj(
        "The serving image (Dockerfile)", repository=_STR, tag=_STR, pullPolicy=_STR, pullSecrets=_LIST
    ),
    "checkpoint": _obj(
        "Where the model weights come from: a PVC, or an init container that downloads them",
        numExperts=_int(
            1, "Experts per MoE layer of the checkpoint; the chart checks experts.split against it"
        ),
        mountPath=_STR,
        pvc=_obj("A read-only claim holding the checkpoint directory", claimName=_STR, subPath=_STR),
        download=_obj(
            "Download the checkpoint from the Hugging Face Hub in an init container of every pod",
            enabled=_BOOL,
            repo=_STR,
            revision=_STR,
            tokenSecret=_STR,
            tokenKey=_STR,
            sizeLimit=_STR,
        ),
    ),
    "tls": _obj(
        "A Secret with the proxies' certificate (config.server.tls names files under mountPath)",
        secretName=_STR,
        mountPath=_STR,
    ),
    "head": _pods("The Ray head pod: Serve controller, proxies, the Router; never GPUs"),
    "engineWorkers": _pods("Worker pods for Engines (used when config.engine.num_gpus > 0)"),
    "expertWorkers": _pods("Worker pods for ExpertShards (disaggregated mode)"),
    "gpu": _obj(
        "GPU nodes", resourceName=_STR, tolerateTaint=_BOOL, shmSize=_STR, productLabel=_STR, product=_STR
    ),
    "autoscaler": _obj(
        "KubeRay in-tree autoscaler: Serve scale-ups add pods",
        enabled=_BOOL,
        upscalingMode=_STR,
        idleTimeoutSeconds=_int(0),
    ),
    "telemetry": _obj(
        "Kubernetes-only telemetry settings (endpoint, sampling, metrics port: config.telemetry / config.server)",
        exporterImportPath=_STR,
    ),
    "service": _obj("The gRPC Service in front of the Serve proxies", type=_STR, annotations=_STR_MAP),
    "serviceMonitor": _obj(
        "Prometheus Operator ServiceMonitor", enabled=_BOOL, interval=_STR, labels=_STR_MAP
    ),
    "prometheusRule": _obj(
        "Prometheus Operator alert rules on Ray Serve's metrics",
        enabled=_BOOL,
        labels=_STR_MAP,
        errorRatio={"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        queuedRequests=_int(0),
    ),
    "grafanaDashboard": _obj("The Grafana dashboard ConfigMap", enabled=_BOOL, labels=_STR_MAP),
    "podDisruptionBudget": _obj(
        "PodDisruptionBudget of the worker pods", enabled=_BOOL, maxUnavailable=_int(0)
    ),
    "networkPolicy": _obj(
        "Admit only the gRPC port, from the listed namespaces (and the release's own pods, and KubeRay to "
        "the head's dashboard port)",
        enabled=_BOOL,
        allowedNamespaces={"type": "array", "items": _STR},
        metricsNamespaces={"type": "array", "items": _STR},
        operatorNamespace=_STR,
    ),
    "newClusterOnConfigChange": _BOOL,
    "upgradeStrategy": _obj(
        "RayService upgrade strategy (KubeRay spec.upgradeStrategy)",
        type={"type": "string", "enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
        clusterUpgradeOptions=_OBJ,
    ),
}


def _strip_titles(node: Any) -> Any:
    # Pydantic titles repeat the key names; they only add noise to a schema people read.
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def values_schema() -> dict[str, Any]:
    """The chart's values schema: ClusterConfig under `config`, its `$defs` at the root where refs point."""
    config = _strip_titles(ClusterConfig.model_json_schema(mode="validation"))
    defs = config.pop("$defs", {})
    config["description"] = "blockserve's ClusterConfig (the YAML `blockserve serve --config` reads)"
    return {
        "$comment": "Generated by `make helm-schema` from cluster/config.py and cluster/helm_schema.py; do not edit",
        "type": "object",
        "additionalProperties": False,
        "properties": {"config": config, **CHART_PROPERTIES},
        "$defs": defs,
    }


def values_schema_text() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"
