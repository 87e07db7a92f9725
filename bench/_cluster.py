"""Start-up shared by the server benchmarks: a loopback Ray cluster and the blockserve app, stopped afterwards.

Every server bench (soak, http_vs_grpc, serve_throughput, disaggregated, tracing_overhead) needs the same steps:
the loopback environment before Ray is imported (cluster/env.py: nothing leaves 127.0.0.1), Ray's progress lines
kept out of the figures, the model resolved (the shipped default, else a random tests.tiny checkpoint), a free
port pair for the proxies, the app deployed and SERVING, and at the end Serve and the Ray processes this run
started stopped again.

    with serving({"engine": {"max_rows": 64}}, model=path) as server:
        stub = server.stub()
"""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repo root
    sys.path.insert(0, str(ROOT))

from cluster.env import DEFAULT_MODEL_PATH, apply_loopback_env, ray_init_kwargs  # noqa: E402

apply_loopback_env()  # on import, before any bench imports Ray: every Ray process inherits it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_model(path: Path | str | None, tmp: Path) -> Path:
    """`path` if given (it must be a checkpoint directory), else the shipped model, else a random tiny one."""
    if path is not None:
        path = Path(path)
        if not (path / "config.json").exists():
            raise SystemExit(f"--model {path} has no config.json; give a checkpoint directory")
        return path
    if (DEFAULT_MODEL_PATH / "config.json").exists():
        return DEFAULT_MODEL_PATH
    from tests.tiny import served_checkpoint

    print(f"{DEFAULT_MODEL_PATH} not built yet (make tiny-model): using a random tests.tiny checkpoint")
    return served_checkpoint(tmp / "served")


def quiet_ray_loggers() -> None:
    for name in ("ray", "ray.serve"):  # keep Ray's progress lines out of the figures
        logging.getLogger(name).setLevel(logging.WARNING)


def wait_serving(address: str, timeout_s: float) -> None:
    """Until the app's health service says SERVING (the proxy answers before the replicas are ready)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"the app on {address} was not SERVING within {timeout_s:.0f}s")
            time.sleep(0.5)


@dataclass
class Server:
    config: object  # cluster.config.ClusterConfig
    model_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.config.server.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.config.server.http_port}"

    def stub(self):
        import grpc

        from protos.blockserve.v1 import blockserve_pb2_grpc

        return blockserve_pb2_grpc.BlockDiffusionStub(grpc.insecure_channel(self.address))

    def engine(self):
        from ray import serve

        from cluster.app import APP_NAME

        return serve.get_deployment_handle("Engine", APP_NAME)

    @staticmethod
    def raylet_pid() -> int:
        import ray

        return ray._private.worker._global_node.all_processes["raylet"][0].process.pid

    def deploy(self, config, timeout_s: float = 300.0) -> None:
        """Deploy `config` as the app (same proxies) and wait until it serves."""
        from cluster.app import start

        start(config)
        self.config = config
        wait_serving(self.address, timeout_s)


def make_config(sections: dict, model_path: Path):
    """A ClusterConfig from `sections` on the given model and a fresh loopback port pair."""
    from cluster.config import ClusterConfig

    data = {key: dict(value) for key, value in sections.items()}
    data["model"] = {"path": str(model_path), **data.get("model", {})}
    data["server"] = {"grpc_port": free_port(), "http_port": free_port(), **data.get("server", {})}
    return ClusterConfig.model_validate(data)


@contextmanager
def ray_cluster(num_cpus: int = 32) -> Iterator[None]:
    """A local Ray cluster on loopback for the block; Serve and Ray stopped after (the processes it started)."""
    apply_loopback_env()  # again: a bench may have changed os.environ since
    import ray
    from ray import serve

    quiet_ray_loggers()
    try:
        ray.init(**ray_init_kwargs(num_cpus=num_cpus), log_to_driver=False)
        yield
    finally:
        if ray.is_initialized():  # serve.shutdown() on no cluster would start one to look for Serve
            serve.shutdown()
            ray.shutdown()


@contextmanager
def serving(sections: dict, model: Path | str | None = None, timeout_s: float = 300.0) -> Iterator[Server]:
    """The app with config `sections` (model, engine, ...; ports are picked here) SERVING on 127.0.0.1."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        model_path = resolve_model(model, Path(tmp))
        config = make_config(sections, model_path)
        with ray_cluster():
            server = Server(config, model_path)
            server.deploy(config, timeout_s)
            yield server
