"""Fused vs disaggregated serving, through real gRPC and Ray Serve, plus the per-hop cost of each transport.

    .venv/bin/python bench/disaggregated.py [--model PATH] [--shards N] [--transport actor|serve]
        [--requests-per-client K] [--max-new-tokens N] [--hops N] [--skip-split] [--timeout-s S]

One run, on a local Ray cluster bound to loopback (cluster/env.py), only 127.0.0.1 targeted:

1. Per-hop round trip of each candidate transport between two processes, with the payload one shard call of
   this model carries (x [T, D] float32 + weights / ids [T, K] for T = 1 and T = canvas x 8 rows / shards):
     in-process   a plain function call (the floor)
     ray actor    `actor.forward.remote(...)` + `ray.get` to a plain Ray actor (what `experts.transport: actor`
                  uses: each shard replica's worker)
     serve handle `DeploymentHandle.forward.remote(...).result()` to a Serve deployment (`transport: serve`)
   Median and 90th percentile over --hops calls each, after a warm-up.
2. Aggregate tokens/s at 1, 4 and 16 concurrent gRPC clients (closed loop: each client sends K fixed-seed
   requests one after the other) for the app in `fused` mode, then in `disaggregated` mode (--shards ExpertShard
   deployments, 2 micro-batches in flight, --transport). The same requests run on both, and the script checks
   they return the same tokens.
3. Per-step time split in disaggregated mode at 16 clients, from the Engine's counters: with --micro-batches
   1 (so the parts add up to the step) and with 2. Columns, per decoder step (ms):
     step       Engine busy time / steps (iterations with a denoise; prefill and commit passes included)
     attention  everything on the Engine that is not MoE: embeddings, attention, dense MLP, routers, sampler
     dispatch   picking each shard's tokens and handing them to the transport
     experts    the shards' ExpertBank compute (the slowest shard of each call)
     transfer   waiting for the shards minus their compute: both ways over the transport
     combine    adding the shards' partial outputs
   With 2 micro-batches the parts of concurrent calls overlap, so they add up to more than the step.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/disaggregated.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench._cluster import free_port, ray_cluster, resolve_model, wait_serving  # noqa: E402

LOADS = (1, 4, 16)


@dataclass
class Settings:
    model_path: Path | None
    shards: int = 2
    transport: str = "actor"
    requests_per_client: int = 2
    max_new_tokens: int = 64
    max_denoising_steps: int = 12
    hops: int = 100
    skip_split: bool = False
    timeout_s: float = 600.0


# -- 1. per-hop transport figures ------------------------------------------------------------------------
class Echo:
    """Returns a partial output shaped like a shard's answer."""

    def forward(self, layer, x, weights, ids):
        return x.copy(), 0.0


def _time_calls(call, n: int) -> tuple[float, float]:
    for _ in range(min(20, n)):
        call()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.9 * (len(times) - 1))] * 1e3


def measure_hops(config, tokens: list[int], n: int) -> list[tuple[str, int, float, float]]:
    import numpy as np
    import ray
    from ray import serve

    D, K = config.hidden_size, config.top_k
    actor = ray.remote(Echo).options(num_cpus=0).remote()
    handle = serve.run(
        serve.deployment(Echo, name="Echo", ray_actor_options={"num_cpus": 0}).bind(),
        name="bench-echo",
        route_prefix="/bench-echo",
    )
    local = Echo()
    rows = []
    try:
        for T in tokens:
            args = (
                0,
                np.random.rand(T, D).astype(np.float32),
                np.random.rand(T, K).astype(np.float32),
                np.zeros((T, K), dtype=np.int32),
            )
            for name, call in (
                ("in-process", lambda a=args: local.forward(*a)),
                ("ray actor", lambda a=args: ray.get(actor.forward.remote(*a))),
                ("serve handle", lambda a=args: handle.forward.remote(*a).result()),
            ):
                rows.append((name, T, *_time_calls(call, n)))
    finally:
        serve.delete("bench-echo")
        ray.kill(actor)
    return rows


# -- 2. throughput through gRPC --------------------------------------------------------------------------
def make_request(index: int, s: Settings):
    from protos.blockserve.v1 import blockserve_pb2 as pb

    req = pb.GenerateRequest(prompt=f"def f{index}(x):\n", max_new_tokens=s.max_new_tokens, seed=1000 + index)
    req.sampling.max_denoising_steps = s.max_denoising_steps
    return req


async def _client(stub, requests, out: dict) -> None:
    for key, req in requests:
        reply = await stub.Generate(req, timeout=600)
        out[key] = list(reply.token_ids)


async def _load(address: str, clients: int, s: Settings) -> tuple[float, dict]:
    import grpc

    from protos.blockserve.v1 import blockserve_pb2_grpc

    k = s.requests_per_client
    out: dict = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = blockserve_pb2_grpc.BlockDiffusionStub(channel)
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                _client(stub, [((c, i), make_request(c * k + i, s)) for i in range(k)], out)
                for c in range(clients)
            )
        )
        return time.perf_counter() - t0, out


@dataclass
class ModeResult:
    name: str
    tps: dict[int, float]
    tokens: dict[int, dict]
    split: dict | None = None


def engine_counters():
    from ray import serve

    from cluster.app import APP_NAME

    engine = serve.get_deployment_handle("Engine", APP_NAME)
    return {**engine.stats.remote().result(), **engine.expert_stats.remote().result()}


def step_split(before: dict, after: dict, micro_batches: int) -> dict:
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], float) and k in before}
    steps = max(1.0, d["forwards"])
    moe = d.get("dispatch_s", 0.0) + d.get("expert_compute_s", 0.0) + d.get("transfer_s", 0.0)
    moe += d.get("combine_s", 0.0)
    return {
        "micro_batches": micro_batches,
        "step": d["busy_s"] / steps * 1e3,
        "attention": max(0.0, d["busy_s"] - moe / micro_batches) / steps * 1e3,
        "dispatch": d.get("dispatch_s", 0.0) / steps * 1e3,
        "experts": d.get("expert_compute_s", 0.0) / steps * 1e3,
        "transfer": d.get("transfer_s", 0.0) / steps * 1e3,
        "combine": d.get("combine_s", 0.0) / steps * 1e3,
        "hops": d.get("shard_hops", 0.0) / steps,
    }


def run_mode(name: str, loop, config, s: Settings, loads=LOADS, split_at: int | None = None) -> ModeResult:
    from cluster.app import start

    start(config)
    address = f"127.0.0.1:{config.server.grpc_port}"
    wait_serving(address, s.timeout_s)
    loop.run_until_complete(_load(address, 1, s))  # warm-up
    result = ModeResult(name, {}, {})
    for clients in loads:
        before = engine_counters()
        wall, tokens = loop.run_until_complete(_load(address, clients, s))
        result.tps[clients] = sum(len(t) for t in tokens.values()) / wall
        result.tokens[clients] = tokens
        if clients == split_at:
            result.split = step_split(before, engine_counters(), config.engine.micro_batches)
        print(f"  {name}: {clients:2d} clients {result.tps[clients]:8.1f} tok/s", flush=True)
    return result


# -- output ----------------------------------------------------------------------------------------------
def print_hops(rows) -> None:
    print("\nper-hop round trip (ms), one shard call's payload")
    print(f"{'transport':<14}{'tokens':>7}{'median':>9}{'p90':>9}")
    for name, T, med, p90 in rows:
        print(f"{name:<14}{T:>7}{med:>9.3f}{p90:>9.3f}")


def print_throughput(fused: ModeResult, dis: ModeResult, transport: str) -> None:
    print(f"\naggregate tokens/s through gRPC (disaggregated: transport {transport})")
    print(f"{'clients':>7}{'fused':>10}{'disagg':>10}{'disagg/fused':>14}{'same tokens':>13}")
    for c in LOADS:
        same = sum(dis.tokens[c][k] == v for k, v in fused.tokens[c].items())
        print(
            f"{c:>7}{fused.tps[c]:>10.1f}{dis.tps[c]:>10.1f}{dis.tps[c] / fused.tps[c]:>14.2f}"
            f"{f'{same}/{len(fused.tokens[c])}':>13}"
        )


def print_split(splits: list[dict]) -> None:
    cols = ("step", "attention", "dispatch", "experts", "transfer", "combine", "hops")
    print(
        "\nper-step time split, disaggregated, 16 clients (ms per decoder step; hops: shard calls per step)"
    )
    print(f"{'micro-batches':>13}" + "".join(f"{c:>11}" for c in cols))
    for sp in splits:
        print(f"{sp['micro_batches']:>13}" + "".join(f"{sp[c]:>11.2f}" for c in cols))


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint directory (default: shipped tiny model)"
    )
    p.add_argument("--shards", type=int, default=Settings.shards)
    p.add_argument("--transport", choices=["actor", "serve"], default=Settings.transport)
    p.add_argument("--requests-per-client", "-K", type=int, default=Settings.requests_per_client)
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    p.add_argument("--hops", type=int, default=Settings.hops, help="calls per transport figure")
    p.add_argument("--skip-split", action="store_true", help="skip the per-step split runs")
    p.add_argument("--timeout-s", type=float, default=Settings.timeout_s)
    a = p.parse_args(argv)
    return Settings(
        a.model,
        a.shards,
        a.transport,
        a.requests_per_client,
        a.max_new_tokens,
        12,
        a.hops,
        a.skip_split,
        a.timeout_s,
    )


def main(argv=None) -> None:
    s = parse_args(argv)
    from ray import serve

    from cluster.app import grpc_options
    from cluster.config import ClusterConfig
    from model.config import ModelConfig

    with tempfile.TemporaryDirectory(prefix="bench-disagg-") as tmp:
        model_path = resolve_model(s.model_path, Path(tmp))
        mc = ModelConfig.from_file(model_path)
        base = {
            "model": {"path": str(model_path), "name": "bench"},
            "engine": {"max_rows": 64, "torch_threads": 1},
            "experts": {"shards": s.shards, "transport": s.transport},
            "server": {"grpc_port": free_port(), "http_port": free_port()},
        }
        fused_cfg = ClusterConfig.model_validate(base)

        def disagg(micro_batches: int):
            return ClusterConfig.model_validate(
                {
                    **base,
                    "engine": {
                        **base["engine"],
                        "execution_mode": "disaggregated",
                        "micro_batches": micro_batches,
                    },
                }
            )

        print(
            f"model {model_path} ({mc.num_layers} layers, hidden {mc.hidden_size}, {mc.num_experts} experts top-"
            f"{mc.top_k}, canvas {mc.canvas_length}); {s.shards} shards, transport {s.transport}; "
            f"max_new_tokens {s.max_new_tokens}, max_denoising_steps {s.max_denoising_steps}, "
            f"K={s.requests_per_client} requests/client; CPU only, torch threads 1 per process"
        )
        loop = asyncio.new_event_loop()
        with ray_cluster():
            serve.start(
                http_options={"host": "127.0.0.1", "port": fused_cfg.server.http_port},
                grpc_options=grpc_options(fused_cfg),
            )
            hops = measure_hops(mc, [1, mc.canvas_length * 8 // s.shards], s.hops)
            print_hops(hops)
            print("\nthroughput runs:", flush=True)
            fused = run_mode("fused", loop, fused_cfg, s)
            dis = run_mode("disaggregated", loop, disagg(2), s, split_at=16)
            splits = [dis.split]
            if not s.skip_split:
                splits.insert(
                    0, run_mode("disaggregated, 1 micro-batch", loop, disagg(1), s, (16,), 16).split
                )
            print_hops(hops)
            print_throughput(fused, dis, s.transport)
            print_split(splits)
        loop.close()


if __name__ == "__main__":
    main()
