"""The Serve config document of a `ClusterConfig`, and deploying it on a running Ray cluster.

The document is what `serve run CONFIG` and a KubeRay RayService (`spec.serveConfigV2`) hand to Ray Serve:
proxy options (HTTP and gRPC), then one application whose `import_path` is the app builder
(`cluster.app:app_builder`) and whose `args` are the ClusterConfig fields the operator set. Defaults are not
copied into the document: the builder applies them from `cluster/config.py`, their one home, so a document
rendered today keeps meaning "the defaults" after an upgrade. Any section added to ClusterConfig flows
through `args` with no change here.

The Helm chart (`blockserve.serveConfig` in helm/blockserve/templates/_helpers.tpl) builds the same document;
tests/helm holds the two equal for every shipped values file.

`deploy` follows `serve run CONFIG` (ray/serve/scripts.py in Ray 2.60) without the dashboard: start Serve with
the document's proxy options, then `deploy_apps(ServeDeploySchema)`. Deploying from a document, not through
`serve.run(app)`, is what makes options that only exist in a config document (an application-level
autoscaling policy) work locally exactly as on Kubernetes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from cluster.app import APP_NAME, BUILDER_IMPORT_PATH, GRPC_SERVICERS, ROUTE_PREFIX
from cluster.autoscaling import application_autoscaling_policy
from cluster.config import ClusterConfig

PROXY_LOCATION = "EveryNode"  # a gRPC proxy on every node, so a Service may route to any pod


def config_args(config: BaseModel) -> dict[str, Any]:
    """The fields the operator set (JSON types), nested as in the YAML; defaults stay with ClusterConfig.

    Unlike `model_dump(exclude_unset=True)`, a field assigned after loading (`blockserve serve --port`) counts
    as set even inside a section that was itself defaulted."""
    out: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            section = config_args(value)
            if section or name in config.model_fields_set:
                out[name] = section
        elif name in config.model_fields_set:
            out[name] = config.model_dump(mode="json", include={name})[name]
    return out


def application(config: ClusterConfig) -> dict[str, Any]:
    """The one application; with `engine.autoscaling` set it carries the application-level SLO policy, which
    sizes the Engines and (disaggregated mode) the ExpertShard deployments together. Its kwargs are not in the
    document: the policy reads them from the Engine's autoscaling_config, which the builder renders from `args`."""
    app = {
        "name": APP_NAME,
        "route_prefix": ROUTE_PREFIX,
        "import_path": BUILDER_IMPORT_PATH,
        "args": config_args(config),
    }
    if config.engine.autoscaling is not None:
        app["autoscaling_policy"] = application_autoscaling_policy()
    return app


def render_serve_config(config: ClusterConfig) -> dict[str, Any]:
    """The Serve config document (a `ServeDeploySchema` as plain data) for `config`."""
    server = config.server
    return {
        "proxy_location": PROXY_LOCATION,
        "http_options": {"host": server.host, "port": server.http_port, **server.http_tls_options()},
        "grpc_options": {"port": server.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICERS)},
        "applications": [application(config)],
    }


def deploy_schema(document: dict[str, Any]):
    """`document` parsed as Ray's ServeDeploySchema (pydantic errors name the bad field)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(document)


def deploy(document: dict[str, Any], *, blocking: bool = False) -> None:
    """Deploy a Serve config document on the Ray cluster already initialised (what KubeRay hands to Serve).

    Serve's proxy ports and gRPC servicers are fixed when Serve first starts; on a running Serve instance the
    document's proxy options are ignored and only its applications are applied. Applications deployed earlier
    from a document but absent from this one are deleted, as Serve does for every declarative deploy."""
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    schema = deploy_schema(document)
    client = serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=blocking)
