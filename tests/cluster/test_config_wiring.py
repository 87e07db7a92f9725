"""Every ClusterConfig field reaches what it names: changing it changes what the app builder hands to Ray Serve
(deployment options, actor options, the settings objects the deployments are built with) or the Serve config
document's proxy options. A field nothing reads (a default that lives twice, a setting never passed on) fails
here. No Ray cluster: Serve's own app builder runs offline."""

from __future__ import annotations

import typing
from functools import cache
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ValidationError

from cluster.app import APP_NAME, build_app
from cluster.config import ClusterConfig
from cluster.env import DEFAULT_MODEL_PATH
from cluster.serve_config import render_serve_config

# Fields read outside the Serve app, each with the reason.
NOT_IN_THE_APP = {
    "server.ray_num_cpus": "logical CPUs of the Ray head `blockserve serve` starts locally (cluster/cli.py)",
    "server.metrics_port": "Prometheus port of the Ray head `blockserve serve` starts (ray.init, cluster/cli.py); "
    "the Helm chart's metrics-export-port of every pod on Kubernetes",
    "telemetry.otlp_endpoint": "tracing variables set before ray.init so every Ray process, proxies included, "
    "inherits them (cluster/telemetry.py); the Helm chart's pod environment on Kubernetes",
    "telemetry.sampling_ratio": "tracing variable set before ray.init (cluster/telemetry.py); the Helm chart's "
    "pod environment on Kubernetes",
    "telemetry.service_name": "OTEL_SERVICE_NAME set before ray.init (cluster/telemetry.py); the Helm chart's "
    "pod environment on Kubernetes",
}


def _served(config: ClusterConfig) -> str:
    return _served_json(config.model_dump_json())


@cache
def _served_json(config_json: str) -> str:
    """What Serve gets from a config: every deployment's options and init arguments, and the proxy options."""
    from ray.serve._private.build_app import build_app as build_serve_app

    config = ClusterConfig.model_validate_json(config_json)
    built = build_serve_app(build_app(config), name=APP_NAME)
    parts = [
        (d.name, repr(d._deployment_config), d.ray_actor_options, repr(d.init_args), repr(d.init_kwargs))
        for d in sorted(built.deployments, key=lambda d: d.name)
    ]
    document = render_serve_config(config)
    document["applications"] = [{k: v for k, v in a.items() if k != "args"} for a in document["applications"]]
    return repr((parts, document))


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (`Section` or `Section | None`), else None (a dict of sections is a leaf)."""
    if typing.get_origin(annotation) in (dict, list):
        return None
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)
        if sub is not None and field.annotation is not sub:
            out.append((f"{prefix}{name}", field.annotation))  # an optional section: set or not
        if sub is not None:
            out.extend(_leaves(sub, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", field.annotation))
    return out


# Fields whose valid values are constrained beyond their type (the default model has 8 experts; devices are
# cpu, cuda or cuda:N).
EXAMPLES: dict[str, list[Any]] = {
    "experts.split": [[3, 5]],
    "auth.keys_file": ["/etc/blockserve/keys"],
    "model.device": ["cuda", "cuda:1"],
    "slo.load_adaptive.classes": [{"plain": {"max_entropy_bound": 0.5, "min_denoising_steps": 8}}],
    **{
        f"chat.{m}": ["<m>"] for m in ("reasoning_start", "reasoning_end", "tool_call_start", "tool_call_end")
    },
    "chat.end_of_turn": ["<m>"],
    "server.tls.client_ca_file": ["/etc/blockserve/tls/ca.crt"],
}
# server.tls on (its fields reach Serve's http_options only with a certificate and key set)
TLS_ON = {"cert_file": "/etc/blockserve/tls/tls.crt", "key_file": "/etc/blockserve/tls/tls.key"}


def _candidates(path: str, value: Any, annotation: Any) -> list[Any]:
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if path in EXAMPLES:
        return EXAMPLES[path]
    if typing.get_origin(annotation) is Literal:
        return [o for o in typing.get_args(annotation) if o != value]
    if value is None:  # an optional section or list: its own defaults, or one entry
        return [{}, [1], 1]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float):
        return [value + 1, value * 2, value - 1, value / 2, 1]
    if isinstance(value, str):
        return [value + "-x", "/tmp/elsewhere"]
    if isinstance(value, list):
        return [value + value[-1:], [1]]
    return options


def _get(data: dict, path: str) -> Any:
    for key in path.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _with(data: dict, path: str, value: Any) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node[key] = dict(node.get(key) or {})
        node = node[key]
    node[last] = value
    return out


@cache
def _baselines() -> list[dict]:
    """The default config, and each variant that switches on a mode or an optional section: a field that
    matters only in `disaggregated` mode, or only with autoscaling on, is checked where it matters."""
    base = ClusterConfig.model_validate({"model": {"path": str(DEFAULT_MODEL_PATH)}}).model_dump(mode="json")
    out = [base, _with(base, "model.device", "cuda")]  # GPU-only fields (engine.num_gpus) matter on cuda
    out.append(_with(base, "server.tls", {**base["server"]["tls"], **TLS_ON}))
    for path, annotation in _leaves(ClusterConfig):
        value = _get(base, path)
        if typing.get_origin(annotation) is Literal:
            variants = [o for o in typing.get_args(annotation) if o != value]
        elif value is None and _section(annotation) is not None:
            variants = [_section(annotation)().model_dump(mode="json")]  # the section on, at its defaults
        else:
            continue
        for variant in variants:
            try:
                ClusterConfig.model_validate(_with(base, path, variant))
            except ValidationError:
                continue
            out.append(_with(base, path, variant))
    return out


def _reaches_serve(data: dict, path: str, annotation: Any) -> bool | None:
    """True when some valid change of `path` in `data` changes what Serve gets; None when none was valid."""
    before = _served(ClusterConfig.model_validate(data))
    for candidate in _candidates(path, _get(data, path), annotation):
        try:
            variant = ClusterConfig.model_validate(_with(data, path, candidate))
            after = _served(variant)
        except (ValidationError, ValueError):  # invalid here, or refused by the builder (ConfigFileError)
            continue
        return after != before
    return None


@pytest.mark.parametrize(("path", "annotation"), _leaves(ClusterConfig), ids=lambda p: str(p))
def test_field_reaches_serve(path, annotation):
    if path in NOT_IN_THE_APP:
        pytest.skip(NOT_IN_THE_APP[path])
    if typing.get_origin(annotation) is Literal and len(typing.get_args(annotation)) == 1:
        pytest.skip(f"config.{path} allows one value only")
    parent = path.rpartition(".")[0]
    valid = False
    for data in _baselines():
        if parent and not isinstance(_get(data, parent), dict):
            continue  # the field's section is off in this variant
        reached = _reaches_serve(data, path, annotation)
        if reached:
            return
        valid = valid or reached is not None
    assert valid, f"no valid value found to change config.{path}: add one to EXAMPLES"
    pytest.fail(
        f"changing config.{path} changes nothing Serve receives: pass it to the settings or the deployment "
        "option it names (cluster/config.py, cluster/app.py)"
    )
