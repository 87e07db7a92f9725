"""Disaggregated mode end to end: Router + Engine (attention) + ExpertShard deployments, through real gRPC.

Each test serves a variant of the session app (`app.reconfigured`) and compares it with the session app, which
runs the same checkpoint in fused mode.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.integration.conftest import REPLICA_START_S, wait_for
from tests.integration.otlp import attrs, serve_receiver, traceparent

pytestmark = pytest.mark.slow

DISAGGREGATED = {"execution_mode": "disaggregated"}


def request(seed: int, max_new: int = 40, steps: int = 6, **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=f"def f{seed}(x):", max_new_tokens=max_new, seed=seed)
    req.sampling.max_denoising_steps = steps
    for k, v in sampling.items():
        setattr(req.sampling, k, v)
    return req


def generate_all(app, requests) -> list[list[int]]:
    """All requests at once (so the Engine batches them), token ids in request order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: app.stub.Generate(r, timeout=300), requests))
    return [list(r.token_ids) for r in replies]


def engine_expert_stats(app) -> dict:
    from ray import serve

    from cluster.app import APP_NAME

    return serve.get_deployment_handle("Engine", APP_NAME).expert_stats.remote().result()


def check_matches_fused(app, requests, fused) -> None:
    info = app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.execution_mode == "disaggregated"
    assert generate_all(app, requests) == fused
    stats = engine_expert_stats(app)
    load = stats["expert_load"]  # [layers][experts]: every layer routed top_k choices per token
    assert len(load) > 0 and len({sum(layer) for layer in load}) == 1 and sum(load[0]) > 0
    assert stats["shard_hops"] >= stats["moe_calls"] > 0


@pytest.fixture(scope="module")
def receiver():
    yield from serve_receiver()


def check_traced_shard_calls(app, receiver, experts: set[str]) -> None:
    """A traced request's canvases each get one `expert_shard` span per shard, with the shard's calls."""
    trace_id, _, header = traceparent()
    events = app.stub.GenerateStream(request(9), metadata=[("traceparent", header)], timeout=300)
    final = list(events)[-1].final

    def complete():
        spans = receiver.trace(trace_id)
        names = [s.name for s in spans]
        canvases = names.count("engine.canvas") == final.stats.canvases
        # the Engine ends `engine.generate` after its canvas and shard spans, and exports its spans in order:
        # once it has come, so has every `expert_shard` span (they can straddle two export batches)
        done = canvases and "engine.generate" in names
        return spans if done and names.count("expert_shard") >= len(experts) else None

    spans = wait_for(complete, timeout=30, what="the request's expert_shard spans")
    canvases = {s.span_id: s for s in spans if s.name == "engine.canvas"}
    by_canvas: dict[bytes, set[str]] = {}
    for span in (s for s in spans if s.name == "expert_shard"):
        assert span.parent_span_id in canvases  # under the canvas whose steps called the shard
        a = attrs(span)
        assert a["blockserve.shard_calls"] >= a["blockserve.steps"] >= 1 and a["blockserve.batch_tokens"] > 0
        by_canvas.setdefault(span.parent_span_id, set()).add(a["blockserve.experts"])
    assert by_canvas and all(seen <= experts for seen in by_canvas.values())
    assert set().union(*by_canvas.values()) == experts


def test_three_uneven_shards_match_fused_token_for_token(app, receiver):
    """Also the `serve` transport (Serve handle calls); the other test runs the default `actor` transport.
    A traced request shows the shards' calls under its canvases."""
    requests = [request(seed) for seed in (1, 2, 3, 4)]
    fused = generate_all(app, requests)
    with app.reconfigured(engine=DISAGGREGATED, experts={"split": [1, 4, 3], "transport": "serve"}):
        check_matches_fused(app, requests, fused)
        check_traced_shard_calls(app, receiver, {"0-0", "1-4", "5-7"})


def _replicas(deployment: str) -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == "serve" and f"#{deployment}#" in a["name"]
    ]


def _running_replicas(deployment: str) -> int:
    from ray import serve

    from cluster.app import APP_NAME

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_two_even_shards_match_fused_and_survive_a_killed_replica(app):
    """Two shards of two replicas each: the same tokens as fused mode for concurrent requests. Then one replica
    of a shard is killed while requests are mid-flight: they finish with the right tokens (retried on the other
    replica) or fail UNAVAILABLE; Serve replaces the replica; later requests succeed."""
    import ray

    requests = [request(seed) for seed in (1, 2, 3, 4)]
    fused = generate_all(app, requests)
    long = [request(seed, max_new=64, steps=16, confidence_threshold=1e-9) for seed in (11, 12, 13)]
    fused_long = generate_all(app, long)
    with app.reconfigured(engine=DISAGGREGATED, experts={"shards": 2, "replicas_per_shard": 2}):
        check_matches_fused(app, requests, fused)
        wait_for(lambda: len(_replicas("ExpertShard0")) == 2, what="two replicas of shard 0")
        results: list = [None] * len(long)
        streaming = [threading.Event() for _ in long]

        def run(i):
            # Streamed with drafts: the first event says the request is running, whatever this machine's speed
            # (a poll of the Engine's active rows can miss requests that come and go between two polls).
            request = pb.GenerateRequest()
            request.CopyFrom(long[i])
            request.stream_drafts = True
            tokens = []
            try:
                for event in app.stub.GenerateStream(request, timeout=300):
                    streaming[i].set()
                    if event.HasField("canvas"):
                        tokens.extend(event.canvas.token_ids)
                results[i] = tokens
            except grpc.RpcError as e:
                results[i] = e.code()
            finally:
                streaming[i].set()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(long))]
        for t in threads:
            t.start()
        wait_for(lambda: all(e.is_set() for e in streaming), what="every request streaming")
        victim = _replicas("ExpertShard0")[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        for t in threads:
            t.join(timeout=300)
        for got, want in zip(results, fused_long, strict=True):
            assert got == want or got == grpc.StatusCode.UNAVAILABLE, got
        assert any(r == w for r, w in zip(results, fused_long, strict=True))  # retries carried one through
        wait_for(lambda: victim not in _replicas("ExpertShard0"), what="the killed replica to be gone")
        wait_for(
            lambda: _running_replicas("ExpertShard0") == 2,
            timeout=REPLICA_START_S,
            what="Serve to replace it",
        )
        assert generate_all(app, requests[:2]) == fused[:2]  # and serving goes on, with the right tokens
        assert app.serving()
