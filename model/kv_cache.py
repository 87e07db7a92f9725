"""Per-sequence KV cache and the padded batch view the attention layers read.

Shape legend: B rows, H kv heads, S cached tokens, T new tokens, d head dim.

A sequence's cache keeps, per layer, keys (normed + rotated) and values (normed) for every token the encoder has
written. Sliding-window layers keep only the last `window - 1` tokens — exactly what transformers'
`DynamicSlidingWindowLayer` keeps — so their memory is bounded whatever the context length, and the decoder
(which reads the cache with no mask) sees the same keys as the reference.

`PrefixBatch` pads the caches of several rows to one length with a validity mask. The decoder's prefix does not
change while a canvas is denoised, so the engine builds it once per batch composition and reuses it every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig


@dataclass
class LayerKV:
    keys: torch.Tensor  # [H, S, d]
    values: torch.Tensor  # [H, S, d]
    start: int  # absolute position of keys[:, 0]


class SequenceCache:
    """The encoder KV cache of one sequence (prompt + committed canvases)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.config = config
        self.length = 0  # tokens written so far (absolute position of the next token)
        self.layers: list[LayerKV] = [
            LayerKV(
                torch.empty(s.num_kv_heads, 0, s.head_dim, dtype=dtype, device=device),
                torch.empty(s.num_kv_heads, 0, s.head_dim, dtype=dtype, device=device),
                0,
            )
            for s in config.layers
        ]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append new tokens' K/V ([H, T, d]) of one layer, trimming sliding layers to their window."""
        kv = self.layers[layer]
        k = torch.cat([kv.keys, keys], dim=1)
        v = torch.cat([kv.values, values], dim=1)
        start = kv.start
        if self.config.layers[layer].is_sliding:
            keep = self.config.sliding_window - 1
            if k.shape[1] > keep:
                start += k.shape[1] - keep
                k, v = k[:, -keep:], v[:, -keep:]
        self.layers[layer] = LayerKV(k.contiguous(), v.contiguous(), start)

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(kv.keys.nbytes + kv.values.nbytes for kv in self.layers)


@dataclass
class LayerPrefix:
    keys: torch.Tensor  # [B, H, S, d]
    values: torch.Tensor  # [B, H, S, d]
    positions: torch.Tensor  # [B, S] absolute positions, -1 where padded
    valid: torch.Tensor  # [B, S] bool
    sizes: list[int] | None = None  # valid (left-aligned) entries of each row, known on the host


class PrefixBatch:
    """Cached prefixes of B rows, right-padded per layer to the longest row."""

    def __init__(self, caches: list[SequenceCache]):
        self.caches = caches
        device = caches[0].layers[0].keys.device
        self.lengths = torch.tensor([c.length for c in caches], dtype=torch.long, device=device)  # [B]
        self.layers = [self._stack(i) for i in range(len(caches[0].layers))]

    def _stack(self, layer: int) -> LayerPrefix:
        kvs = [c.layers[layer] for c in self.caches]
        s_max = max(kv.keys.shape[1] for kv in kvs)
        h, _, d = kvs[0].keys.shape
        b = len(kvs)
        ref = kvs[0].keys
        keys = ref.new_zeros(b, h, s_max, d)
        values = ref.new_zeros(b, h, s_max, d)
        # positions are built on the host (a few ints per row) and copied once: no per-row device op
        positions = torch.full((b, s_max), -1, dtype=torch.long)
        for r, kv in enumerate(kvs):
            s = kv.keys.shape[1]
            keys[r, :, :s] = kv.keys
            values[r, :, :s] = kv.values
            positions[r, :s] = torch.arange(kv.start, kv.start + s)
        positions = positions.to(ref.device)
        return LayerPrefix(keys, values, positions, positions >= 0, [kv.keys.shape[1] for kv in kvs])
