"""The app builder: `serve.deployment(...).bind(...)` from a `ClusterConfig` (Ray Serve LLM's builder habit).

Deployments are plain classes (deployments/); Ray is applied here, at the edge. Replicas ask for no logical
CPUs (`num_cpus: 0`) so a small machine can host several. An Engine on `model.device: cuda` asks for
`engine.num_gpus` GPUs: Ray sets CUDA_VISIBLE_DEVICES of a replica to the GPUs it was granted, so one that asks for
none would see no GPU at all. In `disaggregated` mode one `ExpertShard<i>`
deployment per expert range is bound into the Engine, so Serve deploys, health-checks and scales them with
the app.

The Router is the app's one ingress for both proxies: Serve's gRPC proxy calls its RPC methods by name, and its
HTTP proxy (`server.http_port`) hands it HTTP requests through `serve.ingress`, which serves the FastAPI app the
class builds per replica (the OpenAI-compatible API). The app's route prefix is "/" so that API answers at
/v1/... on the HTTP port (gRPC ignores the prefix, but needs one to be set).

`app_builder` is the `import_path` of the Serve config document (cluster/serve_config.py): Serve calls it
with the document's `args`, which are the ClusterConfig itself, so `blockserve serve`, `serve run` and a
KubeRay RayService all build the app from the same configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import serve
from ray.serve.config import gRPCOptions

from cluster import env
from cluster.autoscaling import engine_autoscaling_config, shard_autoscaling_config
from cluster.config import ClusterConfig
from cluster.shards import ExpertShardReplica
from deployments.engine import Engine
from deployments.openai_api import OpenAIRouter
from deployments.shard_client import ShardRoute, worker_prefix

APP_NAME = "blockserve"
# The OpenAI-compatible API lives at /v1/...; gRPC ignores the prefix, but an app without one is unreachable.
ROUTE_PREFIX = "/"
GRPC_SERVICERS = [
    # the generated registration, but undecodable request bytes reach the Router (INVALID_ARGUMENT, not UNKNOWN)
    "deployments.wire.add_BlockDiffusion_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
BUILDER_IMPORT_PATH = "cluster.app:app_builder"


def grpc_options(config: ClusterConfig) -> gRPCOptions:
    return gRPCOptions(
        port=config.server.grpc_port,
        grpc_servicer_functions=GRPC_SERVICERS,
        request_timeout_s=config.limits.max_request_s,  # the proxy's deadline matches the engine's
    )


def shard_deployment_name(index: int) -> str:
    return f"ExpertShard{index}"


def build_shards(config: ClusterConfig) -> tuple[list, list[ShardRoute]]:
    """One bound ExpertShard deployment per expert range, and the routes the Engine uses to reach them."""
    x = config.experts
    actor = x.transport == "actor"
    bound, routes = [], []
    for s in config.to_shard_settings():
        prefix = worker_prefix(APP_NAME, s)
        routes.append(ShardRoute(s.first, s.stop, prefix))
        bound.append(
            serve.deployment(
                ExpertShardReplica,
                name=shard_deployment_name(s.shard),
                **shard_scaling(config),
                # with the actor transport the GPU belongs to the worker the replica starts, not the replica
                ray_actor_options={"num_cpus": 0, "num_gpus": 0 if actor else x.num_gpus},
                max_ongoing_requests=64,
                health_check_period_s=5,
            ).bind(s, x.transport, prefix, x.num_gpus if actor else 0.0)
        )
    return bound, routes


def shards_per_engine(config: ClusterConfig) -> int:
    """Replicas of each ExpertShard per Engine replica when the Engines autoscale (0 in fused mode)."""
    disaggregated = config.engine.execution_mode == "disaggregated"
    return config.experts.replicas_per_shard if disaggregated else 0


def engine_scaling(config: ClusterConfig) -> dict:
    """A fixed replica count, or the SLO autoscaler's config when `engine.autoscaling` is set."""
    e = config.engine
    if e.autoscaling is None:
        return {"num_replicas": e.replicas}
    push_s = env.ray_metric_push_interval_s()
    per_engine = shards_per_engine(config)
    return {"autoscaling_config": engine_autoscaling_config(e.autoscaling, config.slo, push_s, per_engine)}


def shard_scaling(config: ClusterConfig) -> dict:
    """`replicas_per_shard` replicas, or, when the Engines autoscale, that many per Engine replica: the Serve
    config document's application-level policy (cluster/autoscaling.py ApplicationPolicy) scales them together."""
    e, x = config.engine, config.experts
    if e.autoscaling is None:
        return {"num_replicas": x.replicas_per_shard}
    push_s = env.ray_metric_push_interval_s()
    return {"autoscaling_config": shard_autoscaling_config(e.autoscaling, x.replicas_per_shard, push_s)}


def engine_actor_options(config: ClusterConfig) -> dict:
    """Ray actor options of an Engine replica."""
    options: dict = {"num_cpus": 0}
    if config.model.on_gpu:
        options["num_gpus"] = config.engine.num_gpus
    return options


def engine_options(config: ClusterConfig) -> dict[str, Any]:
    e = config.engine
    return dict(
        name="Engine",
        **engine_scaling(config),
        ray_actor_options=engine_actor_options(config),
        # every streaming request stays "ongoing" until it finishes: admit all rows plus the engine queue
        max_ongoing_requests=e.max_rows + e.max_queue + 8,
        health_check_period_s=5,
    )


def router_options(config: ClusterConfig) -> dict[str, Any]:
    e = config.engine
    return dict(
        name="Router",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=(e.max_rows + e.max_queue) * e.most_replicas + 8,
        max_queued_requests=config.server.max_queued_requests,
    )


def build_app(config: ClusterConfig):
    settings = config.to_engine_settings()
    shards: list = []
    if config.engine.execution_mode == "disaggregated":
        shards, routes = build_shards(config)
        settings = dataclasses.replace(settings, shards=routes)
    engine = serve.deployment(Engine, **engine_options(config)).bind(settings, shards)
    router = serve.ingress()(OpenAIRouter)  # HTTP: the class's FastAPI app; gRPC: its RPC methods
    return serve.deployment(router, **router_options(config)).bind(engine, config.to_router_settings())


def app_builder(args: dict[str, Any]):
    """Serve's application builder: `args` is a ClusterConfig document (validated here, errors name fields)."""
    return build_app(ClusterConfig.model_validate(args))


def start(config: ClusterConfig):
    """Start Serve (gRPC on the configured port) and deploy the app on the Ray cluster already initialised.

    The imperative `serve.run` path, kept for tests that swap configs quickly; `blockserve serve` deploys the
    Serve config document instead (cluster/serve_config.py `deploy`)."""
    serve.start(
        http_options={
            "host": config.server.host,
            "port": config.server.http_port,
            **config.server.http_tls_options(),
        },
        grpc_options=grpc_options(config),
    )
    return serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
