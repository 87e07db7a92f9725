"""Live autoscaling on the local cluster: a bounded load generator on 127.0.0.1 drives the Engine deployment from
1 to 2 replicas through the SLO policy running in Serve's controller, and the Engines back to 1 when the load
stops, with every request answered in full. The app is deployed from its Serve config document, as `blockserve
serve` and KubeRay deploy it, so the application-level policy runs: it scales the ExpertShard deployments of
disaggregated mode with the Engines. Load-adaptive sampling is on, and a client reproduces an adapted reply.
(The deployment-level `EnginePolicy` that `serve.run` uses is the same rule: ApplicationPolicy calls it.)

The SLO (20,000 tokens/s per stream: 0.8 ms per denoising step of a 16-step canvas) is out of reach for any
CPU, however fast, so a replica's measured capacity is its one-row floor and any sustained load of several
streams is demand well above it: both the policy (scale up past 90% of capacity) and load-adaptive sampling
(pressure past 100%) are engaged whatever the machine's speed. The test is about the live path (Engine
readings -> Serve's metrics push -> the policy in the controller -> replicas started and stopped), while the
policy's arithmetic is unit-tested on fabricated contexts (tests/cluster/test_autoscaling_policy.py)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cluster.app import APP_NAME
from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.integration.conftest import REPLICA_START_S, wait_for

pytestmark = pytest.mark.slow

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0}
SLO = {"tokens_per_second": 20000.0, "time_to_first_canvas_s": 30.0}
CLIENTS = 4
MAX_REQUESTS = 400  # the generator's bound, whatever happens


def engine_replicas(deployment: str = "Engine") -> dict[str, int]:
    from ray import serve

    dep = serve.status().applications[APP_NAME].deployments[deployment]
    return {str(getattr(k, "value", k)): n for k, n in dep.replica_states.items() if n}


def running(deployment: str) -> int:
    return engine_replicas(deployment).get("RUNNING", 0)


class LoadGenerator:
    """CLIENTS closed-loop gRPC clients, each sending its next request when the previous one has finished."""

    def __init__(self, stub, steps: int = 8):
        self.stub = stub
        self.steps = steps
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.completed: list[pb.GenerateResponse] = []
        self.seeds: list[int] = []  # of `completed`, in order
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, i: int) -> None:
        while not self.stop.is_set():
            with self.lock:
                if self.sent >= MAX_REQUESTS:
                    return
                self.sent += 1
                seed = self.sent
            req = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=64, seed=seed)
            req.sampling.max_denoising_steps = self.steps
            try:
                reply = self.stub.Generate(req, timeout=60)
                with self.lock:
                    self.completed.append(reply)
                    self.seeds.append(seed)
            except grpc.RpcError as e:
                with self.lock:
                    self.failures.append(f"{e.code().name}: {e.details()}")

    def adapted(self) -> int:
        with self.lock:
            return sum(r.stats.HasField("load_adaptation") for r in self.completed)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


DISAGGREGATED = {"autoscaling": AUTOSCALING, "max_rows": 4, "execution_mode": "disaggregated"}
ADAPTIVE = {"enabled": True, "classes": {"plain": {"max_entropy_bound": 0.5, "min_denoising_steps": 4}}}


def test_application_policy_from_the_document_scales_engines_and_shards_together(app):
    """Deployed from the Serve config document: the application-level policy (not Serve's per-deployment
    policies) sizes Engine and ExpertShard0 together; pressed Engines adapt sampling and report it, and a client
    resending the reported values with the same seed gets the same tokens."""
    from ray.serve.context import _get_global_client

    from cluster.status import collect

    with app.reconfigured(
        from_document=True,
        engine=DISAGGREGATED,
        experts={"shards": 1},
        slo=SLO | {"load_adaptive": ADAPTIVE},
    ):
        details = _get_global_client().get_serve_details()["applications"][APP_NAME]
        policy = details["deployed_app_config"]["autoscaling_policy"]
        assert policy["policy_function"] == "cluster.autoscaling:ApplicationPolicy"
        assert (running("Engine"), running("ExpertShard0")) == (1, 1)
        t0 = time.monotonic()
        with LoadGenerator(app.stub, steps=16) as load:
            wait_for(
                lambda: running("Engine") >= 2 and running("ExpertShard0") >= 2,
                timeout=REPLICA_START_S,
                what="a second Engine and a second ExpertShard0",
            )
            wait_for(lambda: load.adapted(), timeout=60, what="a reply adapted under load")
            scaled_out_s = time.monotonic() - t0
            status = collect()["applications"][APP_NAME]
        assert not load.failures, load.failures[:3]
        assert load.sent == len(load.completed) > 0  # no request lost
        decision = status["autoscaling_policy"]
        assert decision["scope"] == "application" and decision["expert_shards_per_engine"] == 1
        assert decision["wanted"]["ExpertShard0"] == decision["wanted"]["Engine"]
        assert decision["inputs"]["engine"]["demand_tps"] > 0
        adapted = [
            (s, r)
            for s, r in zip(load.seeds, load.completed, strict=True)
            if r.stats.HasField("load_adaptation")
        ]
        assert adapted, "an Engine over capacity adapted no request"
        seed, reply = adapted[-1]
        a = reply.stats.load_adaptation
        assert a.request_class == "plain" and 0 < a.pressure <= 1
        assert 4 <= a.max_denoising_steps < 16 or a.entropy_bound > 0.1 + 1e-6
        t1 = time.monotonic()
        wait_for(
            lambda: engine_replicas() == {"RUNNING": 1} and engine_replicas("ExpertShard0") == {"RUNNING": 1},
            timeout=60,
            what="back to one Engine and one ExpertShard0",
        )
        # unpressed now: the reported values, resent with the same seed, reproduce the adapted reply
        again = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=64, seed=seed)
        again.sampling.max_denoising_steps = a.max_denoising_steps
        again.sampling.entropy_bound = a.entropy_bound
        replayed = app.stub.Generate(again, timeout=60)
        assert not replayed.stats.HasField("load_adaptation")
        assert list(replayed.token_ids) == list(reply.token_ids)
        print(
            f"document: Engine+ExpertShard0 1 -> 2 in {scaled_out_s:.1f}s; back to 1 in "
            f"{time.monotonic() - t1:.1f}s; {len(adapted)}/{len(load.completed)} requests adapted"
        )
