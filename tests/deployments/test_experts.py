"""ExpertShard and the Engine's disaggregated MoE backend, in one process (the transport is a direct call here;
the real Ray / Serve transports are exercised by tests/integration/test_disaggregated.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.placement import ranges
from deployments.experts import (
    ExpertShard,
    ExpertShardSettings,
    LocalExperts,
    ShardedExperts,
    ShardsUnavailable,
    micro_batched,
)
from model.config import from_name
from model.kv_cache import PrefixBatch
from model.transformer import DiffusionGemma, TokenBatch
from model.weights import init_random, load_model, save_model


class DirectClient:
    """In-process stand-in for a transport: calls the shard when the result is asked for."""

    def __init__(self, shard: ExpertShard):
        self.shard = shard

    def submit(self, layer, x, weights, ids):
        return (layer, np.array(x), np.array(weights), np.array(ids))

    def result(self, call):
        return self.shard.forward(*call)

    def ready(self):
        return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_model(init_random(DiffusionGemma(from_name("tiny-test")), seed=3), path)
    return path


def _disaggregated(path, sizes, parts=1):
    model = load_model(path, experts=range(0))
    shards = [
        ExpertShard(ExpertShardSettings(str(path), r.start, r.stop, shard=i))
        for i, r in enumerate(ranges(sizes))
    ]
    backend = ShardedExperts(ranges(sizes), [DirectClient(s) for s in shards], model.config.num_layers)
    model.moe_backend = backend
    micro_batched(model, parts)
    return model, backend, shards


def _prefix(model, rows: int, seed: int = 0) -> PrefixBatch:
    g = torch.Generator().manual_seed(seed)
    caches = [model.new_cache() for _ in range(rows)]
    lengths = [3 + 5 * r for r in range(rows)]  # ragged prompts
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    with torch.no_grad():
        model.encode(TokenBatch.from_lists(prompts, [0] * rows, model.config.pad_token_id), caches)
    return PrefixBatch(caches)


@pytest.mark.parametrize(
    ("sizes", "parts"), [([8], 1), ([4, 4], 1), ([3, 5], 2), ([2, 3, 3], 2), ([1, 6, 1], 3)]
)
def test_disaggregated_forward_equals_fused_bit_for_bit(checkpoint, sizes, parts):
    fused = load_model(checkpoint)
    model, backend, _ = _disaggregated(checkpoint, sizes, parts)
    rows = 5
    canvas = torch.randint(3, fused.config.vocab_size, (rows, fused.config.canvas_length))
    with torch.no_grad():
        want = fused.denoise(canvas, _prefix(fused, rows))
        got = model.denoise(canvas, _prefix(model, rows))  # its encode ran through the shards too
    assert torch.equal(got, want)
    assert backend.times.hops > 0


def test_bf16_shards_carry_bf16_over_numpy(checkpoint):
    """numpy has no bfloat16: bf16 activations and partial outputs cross the transport as 16-bit patterns. The
    shards' partial sums (rounded to bf16 each, then added) match the fused bank's one bf16 rounding closely."""
    fused = load_model(checkpoint, dtype=torch.bfloat16)
    model = load_model(checkpoint, dtype=torch.bfloat16, experts=range(0))
    shards = [
        ExpertShard(ExpertShardSettings(str(checkpoint), r.start, r.stop, shard=i, dtype="bfloat16"))
        for i, r in enumerate(ranges([3, 5]))
    ]
    backend = ShardedExperts(ranges([3, 5]), [DirectClient(s) for s in shards], model.config.num_layers)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, model.config.hidden_size, generator=g).bfloat16()
    weights, ids = fused.layers[0].router(x)
    with torch.no_grad():
        got = backend(0, x, weights, ids)
        want = fused.layers[0].experts(x, weights, ids)
    scale = want.abs().max().item()
    assert got.dtype == torch.bfloat16 and scale > 0
    torch.testing.assert_close(got.float(), want.float(), atol=0.02 * scale, rtol=0.02)
    model.moe_backend = backend
    with torch.no_grad():  # a whole bf16 step through the shards
        out = model.denoise(torch.randint(3, 100, (2, model.config.canvas_length)), _prefix(model, 2))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_shards_hold_only_their_experts_and_count_their_load(checkpoint):
    model, backend, shards = _disaggregated(checkpoint, [3, 5])
    assert all(layer.experts.count == 0 for layer in model.layers)  # the Engine holds no expert weights
    assert [tuple(s.banks[0].gate_up_proj.shape[:1]) for s in shards] == [(3,), (5,)]
    rows = 2
    with torch.no_grad():
        model.denoise(torch.randint(3, 100, (rows, model.config.canvas_length)), _prefix(model, rows))
    stats = backend.stats()
    load = torch.tensor(stats["expert_load"])  # [layers, E] counted by the Engine
    shard_load = torch.cat([torch.tensor(s.stats()["expert_load"]) for s in shards], dim=1)
    assert torch.equal(load, shard_load)  # the shards saw exactly the tokens the Engine routed to them
    cfg = model.config
    # the denoise step, and the prompts' encode (padded to the longest prompt: padding is routed too)
    tokens = rows * cfg.canvas_length + rows * (3 + 5 * (rows - 1))
    assert load.sum(1).tolist() == [tokens * cfg.top_k] * cfg.num_layers
    assert stats["combine_s"] >= 0 and stats["moe_calls"] == 2 * cfg.num_layers


def test_shard_receives_only_tokens_routed_to_it(checkpoint):
    model, _, shards = _disaggregated(checkpoint, [4, 4])
    with torch.no_grad():
        model.denoise(torch.randint(3, 100, (1, model.config.canvas_length)), _prefix(model, 1))
    T = model.config.canvas_length + 3
    per_shard = [s.stats()["tokens"] for s in shards]
    assert all(0 < n < T * model.config.num_layers for n in per_shard)  # a subset, never all tokens


def test_fused_backend_counts_load_and_changes_nothing(checkpoint):
    plain, counted = load_model(checkpoint), load_model(checkpoint)
    backend = LocalExperts(counted)
    counted.moe_backend = backend
    rows = 3
    canvas = torch.randint(3, 100, (rows, plain.config.canvas_length))
    with torch.no_grad():
        want = plain.denoise(canvas, _prefix(plain, rows))
        got = counted.denoise(canvas, _prefix(counted, rows))
    assert torch.equal(got, want)
    load = torch.tensor(backend.stats()["expert_load"])
    tokens = rows * plain.config.canvas_length + rows * (3 + 5 * (rows - 1))
    assert load.sum(1).tolist() == [tokens * plain.config.top_k] * plain.config.num_layers


class FlakyClient(DirectClient):
    """Fails the first `failures` calls as a transport does when no replica of the shard answers."""

    def __init__(self, shard: ExpertShard, failures: int):
        super().__init__(shard)
        self.failures = failures

    def result(self, call):
        if self.failures > 0:
            self.failures -= 1
            raise ShardsUnavailable("no replica of expert shard 1 answered within 0s")
        return super().result(call)


def test_engine_fails_requests_unavailable_when_a_shard_is_gone_and_keeps_serving(checkpoint):
    import asyncio

    from deployments.engine import Engine, EngineSettings
    from deployments.scheduler import EngineRequest, ErrorEvent, FinalEvent
    from model.sampling.params import SamplingParams

    engine = Engine(EngineSettings(str(checkpoint)))
    try:
        ranges_ = ranges([4, 4])
        shards = [
            ExpertShard(ExpertShardSettings(str(checkpoint), r.start, r.stop, shard=i))
            for i, r in enumerate(ranges_)
        ]
        clients = [DirectClient(shards[0]), FlakyClient(shards[1], failures=1)]
        engine.experts = ShardedExperts(ranges_, clients, engine.model.config.num_layers)
        engine.model.moe_backend = engine.experts

        async def run(seed):
            req = EngineRequest("", [5, 6, 7], SamplingParams(max_new_tokens=4, max_denoising_steps=2), seed)
            return [e async for batch in engine.generate(req) for e in batch][-1]

        first = asyncio.run(run(1))
        assert isinstance(first, ErrorEvent) and first.code == "UNAVAILABLE"
        assert engine.ready()  # not an Engine failure: it keeps serving
        assert isinstance(asyncio.run(run(1)), FinalEvent)
    finally:
        engine.shutdown()
