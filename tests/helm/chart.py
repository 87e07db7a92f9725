"""Render the Helm chart offline (Helm's Go SDK through `helm_python`: no helm binary, no cluster) and check
what it renders against the KubeRay RayService CRD and Kubernetes' built-in schemas."""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "blockserve"
VALUES_FILES = ["values.yaml", "values-h100.yaml", "values-8xh100-disaggregated.yaml"]
# The KubeRay v1.7.0 CRD lives beside the repository (CI lays the same folder next to its clone); it is not
# copied in, so the chart is checked against KubeRay's own file.
# KUBERAY_CRD points elsewhere (a git worktree whose parent folder lacks it).
CRD_FILE = Path(
    os.environ.get("KUBERAY_CRD")
    or REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0" / "ray.io_rayservices.yaml"
)
KUBE_VERSION = "1.32.0"
RELEASE = "bs"


def overlay(values_file: str) -> dict[str, Any]:
    """What `-f FILE` adds to the chart's values.yaml (values.yaml itself adds nothing to itself)."""
    if values_file == "values.yaml":
        return {}
    return yaml.safe_load((CHART / values_file).read_text())


@cache
def _chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders for `values` (merged over values.yaml by Helm), in template order."""
    manifests = _chart().render(copy.deepcopy(values or {}), name=RELEASE, namespace="serving")
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def merged_values(values: dict[str, Any]) -> dict[str, Any]:
    return _chart().merge_values(copy.deepcopy(values))


def lint(values: dict[str, Any]) -> dict[str, Any]:
    import helm_python

    return helm_python.lint(str(CHART), copy.deepcopy(values), strict=True, kube_version=f"v{KUBE_VERSION}")


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (
        f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected: every object that lists its properties gets
    `additionalProperties: false` (Kubernetes prunes unknown fields silently; a typo would vanish)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def rayservice_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _closed(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server's ObjectMeta, not the CRD; check the fields Helm sets.
    schema["properties"]["metadata"] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "labels": {"type": "object"},
            "annotations": {"type": "object"},
        },
    }
    return schema


def validate_rayservice(doc: dict[str, Any]) -> None:
    """jsonschema errors (all of them, each with its path) for a rendered RayService."""
    import jsonschema

    validator = jsonschema.Draft7Validator(rayservice_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
