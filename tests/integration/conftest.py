"""A real Ray Serve app with real gRPC on loopback, shared by the integration tests of the session."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.env import DEFAULT_MODEL_PATH
from protos.blockserve.v1 import blockserve_pb2_grpc
from tests.tiny import served_checkpoint

# How long a test waits for Serve to start a replica (a replacement, or one more for a scale-out): a Ray worker
# process, imports and a model load, measured at over 3 minutes on a 2-core machine at load 12. A bound on
# something no test is about, so generous; a wait ends as soon as the replica serves.
REPLICA_START_S = 300.0

_HANDED_OUT: set[int] = set()


# Ports handed to servers a test starts: below Linux's ephemeral range (32768-60999 by default), where every bind
# to port 0 lands (Ray's workers and spare ports included), and above `ray start`'s worker ports (10002-19999). A
# port found free in the ephemeral range was sometimes taken by one of the many processes a Ray cluster starts
# before the server bound it ("Failed to bind to address").
def _free_ports() -> range:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return range(20_000, low if low > 21_000 else 32_768)  # a host that widened the range: no safe one left


FREE_PORTS = _free_ports()
_RANDOM = random.SystemRandom()  # not the global generator, which a test may seed


def free_port() -> int:
    """A loopback port nothing is bound to now, outside the ranges other processes draw from (FREE_PORTS), and
    never one this session handed out before (two calls in a row must not give a config colliding ports)."""
    while True:
        port = _RANDOM.randrange(FREE_PORTS.start, FREE_PORTS.stop)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
        _HANDED_OUT.add(port)
        return port


def wait_for(condition, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll until `condition()` is truthy (Ray's wait_for_condition habit); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def served_model_path(tmp_path_factory) -> Path:
    """The shipped default model when present (it is the one users get), else a random servable checkpoint."""
    if (DEFAULT_MODEL_PATH / "config.json").exists():
        return DEFAULT_MODEL_PATH
    return served_checkpoint(tmp_path_factory.mktemp("served"))


def _running_as(config) -> bool:
    """The app is RUNNING with exactly the deployments `config` builds (the previous version's are gone)."""
    from ray import serve

    from cluster.app import APP_NAME, shard_deployment_name

    names = {"Engine", "Router"}
    if config.engine.execution_mode == "disaggregated":
        names |= {shard_deployment_name(i) for i in range(len(config.expert_ranges()))}
    app = serve.status().applications.get(APP_NAME)
    return bool(app) and str(app.status).endswith("RUNNING") and set(app.deployments) == names


class App:
    def __init__(self, address: str, model_path: Path, config):
        self.address = address
        self.model_path = model_path
        self.config = config
        self.channel = grpc.insecure_channel(address)
        self.stub = blockserve_pb2_grpc.BlockDiffusionStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def engine_stats(self) -> dict:
        from ray import serve

        from cluster.app import APP_NAME

        return serve.get_deployment_handle("Engine", APP_NAME).stats.remote().result()

    def redeploy(self, config, from_document: bool = False) -> None:
        """Deploy `config` as the app (same name, same proxy ports) and wait until health says SERVING.

        `from_document`: deploy the Serve config document (what `blockserve serve` and KubeRay do, and the only
        way Serve runs an application-level autoscaling policy) instead of `serve.run`."""
        from cluster.app import start
        from cluster.serve_config import deploy, render_serve_config

        if from_document:
            deploy(render_serve_config(config))
            wait_for(lambda: _running_as(config), timeout=240, what="the app's deployments RUNNING")
        else:
            start(config)
        wait_for(self.serving, timeout=120, what="health SERVING")

    @contextmanager
    def reconfigured(self, from_document: bool = False, **sections) -> Iterator[App]:
        """Serve a variant of the session config inside a with-block, then the session config again.

        `sections` update top-level ClusterConfig sections (`engine={"max_rows": 2}`); the proxy's ports are fixed
        when Serve first starts, so `server` ports are kept. The suite shares one Ray cluster and one Serve
        instance, and one app at a time keeps gRPC clients free of `application` metadata. With `from_document`
        both the variant and the restored session config are deployed from their Serve config documents (the
        restore then also removes an application-level policy the variant registered)."""
        from cluster.config import ClusterConfig

        data = self.config.model_dump()
        for name, values in sections.items():
            data[name] = {**data.get(name, {}), **values}
        data["server"] = self.config.server.model_dump()
        variant = ClusterConfig.model_validate(data)
        original = self.config
        self.redeploy(variant, from_document)
        self.config = variant
        try:
            yield self
        finally:
            self.config = original
            self.redeploy(original, from_document)

    def serving(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="session")
def app(ray_cluster, tmp_path_factory):
    from cluster.app import start
    from cluster.config import ClusterConfig

    model_path = served_model_path(tmp_path_factory)
    config = ClusterConfig.model_validate(
        {
            "model": {"path": str(model_path), "name": "test-model"},
            "engine": {"max_rows": 8, "max_queue": 32},
            "server": {"grpc_port": free_port(), "http_port": free_port()},
        }
    )
    start(config)
    served = App(f"127.0.0.1:{config.server.grpc_port}", model_path, config)
    wait_for(served.serving, timeout=120, what="health SERVING")
    yield served
    served.channel.close()
