"""The body of an ExpertShard Serve replica: Serve owns the replica's lifecycle (start, health, replacement,
scaling); the experts themselves live in a plain Ray actor the replica starts (transport `actor`) or in the
replica (transport `serve`). See deployments/shard_client.py for why the actor path exists.

The worker actor is owned by the replica, so it dies with it: when Serve removes or replaces a replica, the
Engine's calls to its worker fail and are retried on another replica's worker.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from deployments.experts import ExpertShard, ExpertShardSettings
from deployments.shard_client import WORKER_NAMESPACE

log = logging.getLogger("blockserve.experts")

HEALTH_TIMEOUT_S = 10.0


class ExpertShardReplica:
    def __init__(self, settings: ExpertShardSettings, transport: str, prefix: str, num_gpus: float = 0.0):
        self.settings = settings
        self.local: ExpertShard | None = None
        self.worker: Any = None
        if transport == "serve":
            self.local = ExpertShard(settings)
            return
        import ray
        from ray import serve

        name = prefix + serve.get_replica_context().replica_id.unique_id
        self.worker = (
            ray.remote(ExpertShard)
            .options(
                name=name,
                namespace=WORKER_NAMESPACE,
                num_cpus=0,
                num_gpus=num_gpus,
                max_restarts=0,
                max_concurrency=2,  # two micro-batches may call one shard at once
            )
            .remote(settings)
        )
        ray.get(self.worker.ready.remote())  # the replica is ready once its experts are loaded

    def forward(self, layer: int, x: np.ndarray, weights: np.ndarray, ids: np.ndarray):
        """The `serve` transport's call (the `actor` transport calls the worker directly)."""
        if self.local is None:
            import ray

            return ray.get(self.worker.forward.remote(layer, x, weights, ids))
        return self.local.forward(layer, x, weights, ids)

    def _call(self, method: str, timeout: float | None = None):
        if self.local is not None:
            return getattr(self.local, method)()
        import ray

        return ray.get(getattr(self.worker, method).remote(), timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return self._call("stats", HEALTH_TIMEOUT_S)

    def check_health(self) -> None:
        """A replica whose worker died is unhealthy: Serve replaces it (and with it the worker)."""
        self._call("ready", HEALTH_TIMEOUT_S)

    def __del__(self):
        if self.worker is not None:
            try:
                import ray

                ray.kill(self.worker)
            except Exception:  # the worker may already be gone with its owner
                pass
