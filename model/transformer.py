"""The DiffusionGemma network: one set of weights, two modes.

Shape legend: B rows, T new tokens, L canvas, S cached tokens, D hidden, V vocab.

- `encode` (encoder mode): causal attention over [cache | new tokens]; writes the new tokens' K/V into each row's
  `SequenceCache` pages in place (model/kv_cache.py). Used for prompt prefill and to commit every finished canvas.
- `denoise` (decoder mode): bidirectional attention over [cached prefix | canvas]; reads the cache, never
  writes it. Self-conditioning enters as soft embeddings [B, L, D] (softmax(previous logits) @ embeddings),
  never as [B, L, V] logits — see model/sampling/sampler.py for how they are produced in vocabulary chunks.

Rows in one call may have different prefix lengths and (in encoder mode) different numbers of new tokens: one
batched attention pass over fixed-size key blocks with masks from absolute positions (model/attention.py). Each layer is attention + dense MLP + MoE, summed,
as in transformers' `DiffusionGemmaDecoderTextLayer`; the MoE goes through `moe_backend` so the experts can
live in this process (fused) or on ExpertShard processes (disaggregated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.attention import DenseKeys
from model.config import ModelConfig
from model.kv_cache import KVPool, PrefixBatch, SequenceCache, reservation_bytes, write_layer, write_plan
from model.layers import Attention, GatedMLP, RMSNorm, RopeTables
from model.moe import ExpertBank, Router

# (layer index, normed tokens [T, D], weights [T, K], expert ids [T, K]) -> MoE output [T, D]
MoEBackend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TokenBatch:
    """New tokens of B rows, right-padded to T."""

    ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T] absolute positions
    valid: torch.Tensor  # [B, T] bool
    lengths: list[int] | None = None  # valid (left-aligned) tokens of each row, known on the host

    @property
    def all_valid(self) -> bool:
        """Every token of every row is valid (known on the host: no padding)."""
        T = self.ids.shape[1]
        return self.lengths is not None and all(n == T for n in self.lengths)

    @classmethod
    def from_lists(cls, rows: list[list[int]], starts: list[int], pad_id: int, device="cpu") -> TokenBatch:
        T = max(len(r) for r in rows)
        # built on the host, then one copy each: no per-row writes into device memory
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            valid[i, : len(r)] = True
        positions = torch.as_tensor(starts, dtype=torch.long)[:, None] + torch.arange(T)
        return cls(ids.to(device), positions.to(device), valid.to(device), [len(r) for r in rows])


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, experts: range):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.index = index
        self.spec = config.layers[index]
        self.window = config.sliding_window
        self.self_attn = Attention(config, self.spec)
        self.mlp = GatedMLP(D, config.intermediate_size)
        self.router = Router(D, config.num_experts, config.top_k, eps)
        self.experts = ExpertBank(
            D, config.moe_intermediate_size, experts.start, len(experts), total=config.num_experts
        )
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
            "pre_feedforward_layernorm_2",
        ):
            setattr(self, name, RMSNorm(D, eps))
        # transformers keeps separate (untied) scalars for the encoder and decoder copies of each layer
        self.register_buffer("encoder_scalar", torch.ones(1))
        self.register_buffer("decoder_scalar", torch.ones(1))

    def feed_forward(self, h: torch.Tensor, moe: MoEBackend | None) -> torch.Tensor:
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])  # [B*T, D]
        weights, ids = self.router(flat)  # routing reads the un-normed residual stream
        x = self.pre_feedforward_layernorm_2(flat)
        sparse = moe(self.index, x, weights, ids) if moe is not None else self.experts(x, weights, ids)
        sparse = self.post_feedforward_layernorm_2(sparse.reshape(h.shape))
        return self.post_feedforward_layernorm(dense + sparse)

    def forward(
        self,
        h: torch.Tensor,
        batch: TokenBatch,
        prefix: PrefixBatch | None,
        *,
        encoder: bool,
        moe: MoEBackend | None,
        rope: RopeTables | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (new hidden [B, T, D], new keys, new values [B, G, T, d]). `rope`: the forward pass's RoPE
        tables, shared by the layers of one kind (made per layer when None)."""
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(h), batch.positions, rope)
        full = batch.all_valid
        # the decoder's canvas: every key valid, seen by every query (bidirectional): no mask needed
        new = DenseKeys(k, v, batch.positions, batch.valid, unmasked=full and not encoder, tag="new")
        sources = [_prefix_keys(prefix, self.index), new] if prefix is not None else [new]
        window = self.window if encoder and self.spec.is_sliding else None
        masks = rope.masks if rope is not None else None
        out = attn.attend(
            q,
            sources,
            batch.positions,
            batch.valid,
            causal=encoder,
            window=window,
            queries_valid=full,
            masks=masks,
        )
        h = h + self.post_attention_layernorm(out)
        h = h + self.feed_forward(h, moe)
        return h * (self.encoder_scalar if encoder else self.decoder_scalar), k, v


def _prefix_keys(prefix, layer: int):
    """A PrefixBatch reads the pool's pages; a training prefix (`layers` of LayerPrefix) is dense."""
    if isinstance(prefix, PrefixBatch):
        return prefix.layer_keys(layer)
    return prefix.layers[layer].as_keys()


class SelfConditioning(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.hidden_size
        self.pre_norm = RMSNorm(D, config.rms_norm_eps)
        self.post_norm = RMSNorm(D, config.rms_norm_eps, with_scale=False)
        self.mlp = GatedMLP(D, config.intermediate_size)

    def forward(self, x: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is None:  # RMSNorm(0) = 0 and the MLP maps 0 to 0: no signal is the same as a zero signal
            return self.post_norm(x)
        return self.post_norm(x + self.mlp(self.pre_norm(soft)))


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig, experts: range | None = None):
        super().__init__()
        self.config = config
        self.expert_range = experts if experts is not None else range(config.num_experts)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i, self.expert_range) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.moe_backend: MoEBackend | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed_scale(self) -> torch.Tensor:
        # the scale is rounded to the weight dtype first, as transformers does
        return torch.tensor(self.config.embed_scale).to(self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.embed_scale()

    @property
    def kv_pool(self) -> KVPool:
        """The paged K/V storage of this model's sequences, made on first use on the model's device."""
        pool = self.__dict__.get("_kv_pool")
        if pool is None or pool.device != self.device or pool.dtype != self.dtype:
            pool = self.__dict__["_kv_pool"] = KVPool(self.config, self.dtype, self.device)
        return pool

    def new_cache(self, capacity_tokens: int | None = None) -> SequenceCache:
        """A sequence's KV cache. With `capacity_tokens` (prompt + canvases x L, the admission size) its pages
        are taken now and never grow; without, pages are taken as the encoder writes. `cache.release()` gives
        them back."""
        return SequenceCache(self.kv_pool, capacity_tokens)

    def kv_reservation_bytes(self, capacity_tokens: int, new_tokens: int | None = None) -> int:
        """Bytes admission reserves for a sequence of `capacity_tokens`: its pool pages and its row's attention
        workspace (model/kv_cache.py). `new_tokens`: the most new tokens one encode call gives a row (the engine's
        prompt piece; a canvas at least); None reserves for the largest key group."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        cpu = self.device.type == "cpu"
        return reservation_bytes(self.config, capacity_tokens, itemsize, cpu=cpu, new_tokens=new_tokens)

    def prefix(self, caches: list[SequenceCache]) -> PrefixBatch:
        return PrefixBatch(caches)

    def encode(self, batch: TokenBatch, caches: list[SequenceCache]) -> torch.Tensor:
        """Encoder mode over new tokens; writes their K/V into `caches` in place. Returns final-normed hidden
        [B, T, D]. A cache without room for its new tokens raises KVCapacityError before anything runs."""
        lengths = batch.lengths if batch.lengths is not None else batch.valid.sum(1).tolist()
        for cache, n in zip(caches, lengths, strict=True):
            cache.ensure_room(n)
        prefix = PrefixBatch(caches) if any(c.length for c in caches) else None
        pool = caches[0].pool
        plan = write_plan(caches, lengths, batch.ids.shape[1], pool.device)
        h = self.embed(batch.ids)
        rope = RopeTables(batch.positions, h.dtype)
        for layer in self.layers:
            h, k, v = layer(h, batch, prefix, encoder=True, moe=self.moe_backend, rope=rope)
            write_layer(pool, layer.index, plan, k, v)  # after the layer read the cache: rings overwrite
        for r, cache in enumerate(caches):
            cache.advance(lengths[r])
        return self.norm(h)

    def denoise(
        self, canvas: torch.Tensor, prefix: PrefixBatch, soft: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder mode: canvas [B, L], optional self-conditioning soft embeddings [B, L, D] -> hidden [B, L, D]."""
        B, L = canvas.shape
        key = (L, self.dtype, canvas.device)
        # positions, validity, RoPE tables and key-group masks depend on the prefix alone: a canvas's steps over
        # one PrefixBatch share them (made once, not once per step); a duck-typed prefix (training's) has no cache
        kept = getattr(prefix, "decoder_cache", {})
        if key not in kept:
            positions = prefix.lengths.to(canvas.device)[:, None] + torch.arange(L, device=canvas.device)
            valid = torch.ones(B, L, dtype=torch.bool, device=canvas.device)
            kept[key] = positions, valid, RopeTables(positions, self.dtype)
        positions, valid, rope = kept[key]
        batch = TokenBatch(canvas, positions, valid, [L] * B)
        h = self.self_conditioning(self.embed(canvas), soft)
        for layer in self.layers:
            h, _, _ = layer(h, batch, prefix, encoder=False, moe=self.moe_backend, rope=rope)
        return self.norm(h)

    def soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] -> scaled soft embeddings [..., D] (the self-conditioning input)."""
        return (probs.to(self.dtype) @ self.embed_tokens.weight) * self.embed_scale()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full soft-capped logits [..., V] in fp32. For tests and the reference path only: the serving
        sampler works through the vocabulary in chunks (model/sampling/sampler.py)."""
        return softcap(hidden @ self.embed_tokens.weight.T, self.config.final_logit_softcapping)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = logits.float()
    return torch.tanh(logits / cap) * cap if cap else logits
