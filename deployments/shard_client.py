"""The Engine -> ExpertShard data path: one call per shard per layer per micro-batch.

Two transports, chosen by `experts.transport` (bench/disaggregated.py measures both on the machine at hand):

- `actor` (default): every shard replica starts its `ExpertShard` as a plain Ray actor registered under a name
  that encodes the app, the shard, its expert range and a settings digest (`worker_prefix`). The Engine finds
  the live ones by that prefix and calls `forward` on them directly, round-robin over replicas. This skips
  Serve's router and the replica's request machinery, the bulk of a Serve handle call's cost.
- `serve`: a Serve `DeploymentHandle` call to the shard deployment (Serve picks the replica).

Either way the shards stay Serve deployments: Serve starts, health-checks, replaces and scales their replicas;
a worker lives and dies with the replica that started it. A call that fails because its replica died (or that
times out) is retried on another replica; when no replica answers within `wait_s` the call raises
`ShardsUnavailable` and the Engine fails the requests in flight with UNAVAILABLE.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.experts import ExpertShardSettings, ShardsUnavailable

log = logging.getLogger("blockserve.experts")

WORKER_NAMESPACE = "blockserve-experts"
# How often the actor transport looks for new replicas (Serve scaled a shard up or replaced a replica) when
# nothing failed; one listing of named actors costs about a millisecond.
REFRESH_S = 5.0


def worker_prefix(app: str, settings: ExpertShardSettings) -> str:
    """Name prefix of a shard's workers: replicas of an older deployment (another range, dtype or checkpoint)
    never match, even while a redeploy still has them running."""
    digest = hashlib.sha1(repr(settings).encode()).hexdigest()[:10]
    return f"{app}/shard{settings.shard}/{settings.first}-{settings.stop}/{digest}/"


@dataclass
class ShardRoute:
    """What the Engine needs to reach one shard."""

    first: int
    stop: int
    prefix: str  # worker name prefix (actor transport)


@dataclass
class Call:
    args: tuple
    target: Any
    ref: Any


class ActorShardClient:
    """Plain Ray actor calls to the workers of one shard's replicas."""

    def __init__(self, route: ShardRoute, timeout_s: float, wait_s: float):
        self.route, self.timeout_s, self.wait_s = route, timeout_s, wait_s
        self._workers: list[tuple[str, Any]] = []
        self._next = 0
        self._refreshed = 0.0
        self._lock = threading.Lock()

    def refresh(self) -> int:
        import ray

        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == WORKER_NAMESPACE and a["name"].startswith(self.route.prefix)
        ]
        workers = []
        for name in sorted(names):
            try:
                workers.append((name, ray.get_actor(name, namespace=WORKER_NAMESPACE)))
            except ValueError:  # died between the listing and the lookup
                continue
        with self._lock:
            self._workers = workers
            self._refreshed = time.monotonic()
        return len(workers)

    def _pick(self, avoid: str | None = None) -> tuple[str, Any]:
        deadline = time.monotonic() + self.wait_s
        if time.monotonic() - self._refreshed > REFRESH_S:
            self.refresh()
        while True:
            with self._lock:
                live = [w for w in self._workers if w[0] != avoid] or list(self._workers)
                if live:
                    self._next += 1
                    return live[self._next % len(live)]
            if time.monotonic() > deadline:
                raise ShardsUnavailable(
                    f"no replica of expert shard {self.route.prefix} answered within {self.wait_s:.0f}s"
                )
            if not self.refresh():
                time.sleep(0.2)

    def _drop(self, name: str) -> None:
        with self._lock:
            self._workers = [w for w in self._workers if w[0] != name]

    def submit(self, layer: int, x: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> Call:
        args = (layer, x, weights, ids)
        target = self._pick()
        return Call(args, target, target[1].forward.remote(*args))

    def result(self, call: Call) -> tuple[np.ndarray, float]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return ray.get(call.ref, timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError) as e:
                name = call.target[0]
                log.warning(
                    "expert worker %s failed (%s); retrying on another replica", name, type(e).__name__
                )
                self._drop(name)
                if time.monotonic() > deadline:
                    raise ShardsUnavailable(f"expert shard {self.route.prefix} failed: {e}") from e
                self.refresh()
                target = self._pick(avoid=name)
                call = Call(call.args, target, target[1].forward.remote(*call.args))

    def ready(self) -> bool:
        return bool(self._workers) or self.refresh() > 0


class ServeShardClient:
    """Serve `DeploymentHandle` calls to one shard deployment."""

    def __init__(self, handle: Any, timeout_s: float, wait_s: float):
        self.handle, self.timeout_s, self.wait_s = handle, timeout_s, wait_s

    def submit(self, layer: int, x: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> Call:
        args = (layer, x, weights, ids)
        return Call(args, None, self.handle.forward.remote(*args))

    def result(self, call: Call) -> tuple[np.ndarray, float]:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return call.ref.result(timeout_s=self.timeout_s)
            except Exception as e:  # a replica that died or timed out: Serve routes the retry to a live one
                if time.monotonic() > deadline:
                    raise ShardsUnavailable(f"expert shard call failed: {type(e).__name__}: {e}") from e
                log.warning("expert shard call failed (%s); retrying", type(e).__name__)
                time.sleep(0.2)
                call = Call(call.args, None, self.handle.forward.remote(*call.args))

    def ready(self) -> bool:
        return True
