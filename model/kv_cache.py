"""The KV pool, per-sequence caches in it, and the batch view the attention layers read.

Shape legend: B rows, G kv heads, P tokens per page (= attention key block), d head dim, nb pages per row.

The pool holds, per layer, keys and values in pages: `keys[layer]` is [pages, G, P, d]. Pages come in two
groups with their own free lists: full-attention layers (a page holds P consecutive positions) and sliding-window
layers (a ring of `window - 1` token slots, position p in slot p % (window - 1)). A page id means the same page in
every layer of its group, so one page table per group serves all layers.

A `SequenceCache` takes its pages once: at creation when it is given `capacity_tokens` (the serving path: prompt
plus canvases x L, sized at admission), or page by page as the encoder writes when it is not (tests and tools).
The encoder writes new tokens' K/V into the pages in place; nothing is concatenated or copied per step. The
sliding ring keeps exactly the last `window - 1` tokens — what transformers' `DynamicSlidingWindowLayer` keeps —
so the decoder (which reads the cache with no mask) sees the same keys as the reference. Reading more than a
sequence's capacity is impossible: writing past it raises `KVCapacityError` before anything is computed.

`PrefixBatch` is the batch's view: page tables and per-slot positions and validity (small int tensors, built once
per batch composition), padded to whole key groups; the attention gathers the pages of one key group of every
row with one index op (model/attention.py).

The pool itself grows (doubling) only when a cache asks for pages it lacks; a server sizes it once with
`KVPool.reserve` so serving never reallocates it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from model.attention import (
    BLOCK_TOKENS,
    GROUP_BLOCKS,
    DenseKeys,
    PagedKeys,
    group_rows,
    largest_group_keys,
    padded_blocks,
    workspace_bytes,
)
from model.config import ModelConfig

FULL, RING = "full", "ring"


class KVCapacityError(ValueError):
    """A sequence was asked to hold more tokens than the capacity it was admitted with."""


@dataclass
class LayerPrefix:
    """A dense prefix (training cuts it from one window pass, which keeps the gradient path)."""

    keys: torch.Tensor  # [B, G, S, d]
    values: torch.Tensor  # [B, G, S, d]
    positions: torch.Tensor  # [B, S] absolute positions, -1 where padded
    valid: torch.Tensor  # [B, S] bool

    def as_keys(self) -> DenseKeys:
        return DenseKeys(self.keys, self.values, self.positions, self.valid)


@dataclass
class LayerKV:
    """One layer of one sequence's cache in position order (for inspection and tests)."""

    keys: torch.Tensor  # [G, S, d]
    values: torch.Tensor  # [G, S, d]
    start: int  # absolute position of keys[:, 0]


def ring_tokens(config: ModelConfig) -> int:
    return config.sliding_window - 1


def pages_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


class KVPool:
    """Paged K/V storage of one model on one device."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.group = [RING if s.is_sliding else FULL for s in config.layers]
        self.pages = {FULL: 0, RING: 0}
        self.free: dict[str, list[int]] = {FULL: [], RING: []}
        self.keys: list[torch.Tensor] = [self._empty(i, 0) for i in range(config.num_layers)]
        self.values: list[torch.Tensor] = [self._empty(i, 0) for i in range(config.num_layers)]

    def _empty(self, layer: int, pages: int) -> torch.Tensor:
        s = self.config.layers[layer]
        # zeros, not empty: masked keys are multiplied by 0, which must not meet a NaN from uninitialised memory
        return torch.zeros(
            pages, s.num_kv_heads, BLOCK_TOKENS, s.head_dim, dtype=self.dtype, device=self.device
        )

    def page_bytes(self, group: str) -> int:
        """Bytes of one page id of `group` (K and V of every layer in the group)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return page_bytes(self.config, item)[group]

    def nbytes(self) -> int:
        """Bytes the pool holds on its device (free pages included)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    def used_pages(self, group: str) -> int:
        return self.pages[group] - len(self.free[group])

    def reserve(self, full_pages: int, ring_pages: int) -> None:
        """Grow the pool to at least these many pages per group, once (a server calls this at start-up)."""
        for group, want in ((FULL, full_pages), (RING, ring_pages)):
            if want > self.pages[group]:
                self._grow(group, want)

    def reserve_for(self, budget_bytes: int, max_sequences: int) -> None:
        """Size the pool once for an engine with this KV budget and row count: a ring for every sequence, full
        pages for the rest. Admission keeps the pages in use within the budget, so the pool never grows after."""
        item = torch.empty((), dtype=self.dtype).element_size()
        page = page_bytes(self.config, item)
        ring = max_sequences * pages_for(ring_tokens(self.config)) if page[RING] else 0
        full = (budget_bytes - ring * page[RING]) // page[FULL] if page[FULL] else 0
        self.reserve(max(0, full), ring)

    def allocate(self, group: str, n: int) -> list[int]:
        if n > len(self.free[group]):
            self._grow(group, max(2 * self.pages[group], self.used_pages(group) + n))
        taken, self.free[group] = self.free[group][:n], self.free[group][n:]
        return taken

    def release(self, group: str, pages: list[int]) -> None:
        self.free[group].extend(pages)

    def _grow(self, group: str, pages: int) -> None:
        old = self.pages[group]
        for i, g in enumerate(self.group):
            if g == group:
                for store in (self.keys, self.values):
                    grown = self._empty(i, pages)
                    grown[:old] = store[i]
                    store[i] = grown
        self.free[group].extend(range(old, pages))
        self.pages[group] = pages


class SequenceCache:
    """The encoder KV cache of one sequence (prompt + committed canvases): page ids in the pool and a length."""

    def __init__(self, pool: KVPool, capacity_tokens: int | None = None):
        self.pool = pool
        self.config = pool.config
        self.length = 0  # tokens written so far (absolute position of the next token)
        self.capacity = capacity_tokens  # None: pages are taken as tokens arrive
        self.pages: dict[str, list[int]] = {FULL: [], RING: []}
        self.released = False
        self._finalizer = weakref.finalize(self, _give_back, pool, self.pages)
        if capacity_tokens is not None:
            self._take(capacity_tokens)

    def _take(self, tokens: int) -> None:
        want = {FULL: pages_for(tokens), RING: pages_for(ring_tokens(self.config))}
        for group in set(self.pool.group):
            missing = want[group] - len(self.pages[group])
            if missing > 0:
                self.pages[group].extend(self.pool.allocate(group, missing))

    def ensure_room(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more; with a fixed capacity, refuse (before any compute) past it."""
        if self.released:
            raise KVCapacityError("this sequence's KV cache was released")
        need = self.length + new_tokens
        if self.capacity is not None:
            if need > self.capacity:
                raise KVCapacityError(
                    f"sequence cache holds {self.capacity} tokens (admitted size) but {need} were written; "
                    "admit the request with a capacity of prompt + canvases x canvas_length"
                )
            return
        self._take(need)

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        """Bytes of the pool pages this sequence holds."""
        return sum(len(p) * self.pool.page_bytes(g) for g, p in self.pages.items())

    def release(self) -> None:
        """Give the pages back to the pool (idempotent); the cache cannot be written or read afterwards."""
        self.released = True
        self._finalizer()

    def slots(self, group: str, start: int, n: int) -> tuple[list[int], list[int], int]:
        """(page ids, offsets) where tokens start..start+n-1 are written, and how many leading tokens are
        skipped (a ring keeps only the last `window - 1`)."""
        if group == FULL:
            pos = range(start, start + n)
            return [self.pages[FULL][p // BLOCK_TOKENS] for p in pos], [p % BLOCK_TOKENS for p in pos], 0
        R = ring_tokens(self.config)
        skip = max(0, n - R)
        slots = [p % R for p in range(start + skip, start + n)]
        return [self.pages[RING][s // BLOCK_TOKENS] for s in slots], [s % BLOCK_TOKENS for s in slots], skip

    def layer_kv(self, layer: int) -> LayerKV:
        """The keys and values of one layer in position order (a copy; for inspection and tests)."""
        g = self.pool.group[layer]
        if g == FULL:
            start, positions = 0, list(range(self.length))
            where = [(self.pages[FULL][p // BLOCK_TOKENS], p % BLOCK_TOKENS) for p in positions]
        else:
            R = ring_tokens(self.config)
            start = max(0, self.length - R)
            slots = [p % R for p in range(start, self.length)]
            where = [(self.pages[RING][s // BLOCK_TOKENS], s % BLOCK_TOKENS) for s in slots]
        pages = torch.tensor([w[0] for w in where], dtype=torch.long, device=self.pool.device)
        offs = torch.tensor([w[1] for w in where], dtype=torch.long, device=self.pool.device)
        k = self.pool.keys[layer][pages, :, offs].transpose(0, 1)  # [S, G, d] -> [G, S, d]
        v = self.pool.values[layer][pages, :, offs].transpose(0, 1)
        return LayerKV(k.contiguous(), v.contiguous(), start)


def _give_back(pool: KVPool, pages: dict[str, list[int]]) -> None:
    for group, ids in pages.items():
        pool.release(group, list(ids))
        ids.clear()


def page_bytes(config: ModelConfig, itemsize: int) -> dict[str, int]:
    """Bytes of one page id per group: K and V of P tokens in every layer of the group."""
    page = {FULL: 0, RING: 0}
    for s in config.layers:
        page[RING if s.is_sliding else FULL] += 2 * s.num_kv_heads * BLOCK_TOKENS * s.head_dim * itemsize
    return page


def cache_bytes(config: ModelConfig, capacity_tokens: int, itemsize: int) -> int:
    """Pool bytes a sequence admitted with `capacity_tokens` holds (whole pages)."""
    page = page_bytes(config, itemsize)
    return pages_for(capacity_tokens) * page[FULL] + pages_for(ring_tokens(config)) * page[RING]


def reservation_bytes(
    config: ModelConfig, capacity_tokens: int, itemsize: int, cpu: bool = True, new_tokens: int | None = None
) -> int:
    """What admission reserves for one sequence: its pages plus its row's attention workspace (the largest
    layer's; layers run one after another; longer encoder calls are cut into canvas-sized query chunks, see
    `Attention.attend`). Every byte the KV path allocates is in here.

    The workspace grows with the largest key group the row reads: the groups of its own cached keys (at most
    `capacity_tokens`) and those of the new tokens of any call it is in (at most `new_tokens` per row: the
    engine's largest prompt piece or a canvas). Without `new_tokens`, the largest group there is."""
    T = config.canvas_length
    if new_tokens is None:
        group = GROUP_BLOCKS * BLOCK_TOKENS
    else:
        group = max(largest_group_keys(capacity_tokens), largest_group_keys(max(new_tokens, T)))
    work = max(
        workspace_bytes(config.num_heads, s.num_kv_heads, s.head_dim, T, itemsize, cpu, group)
        for s in config.layers
    )
    return cache_bytes(config, capacity_tokens, itemsize) + work


class PrefixBatch:
    """The cached prefixes of B rows as the attention reads them: page tables, positions and validity per group.

    Built once per batch composition (a few small host lists, one upload each); holds no K/V copy."""

    def __init__(self, caches: list[SequenceCache]):
        if any(c.released for c in caches):
            raise KVCapacityError("a released KV cache cannot be read")
        self.caches = caches
        self.pool = caches[0].pool
        device = self.pool.device
        lens = [c.length for c in caches]
        self.lengths = torch.tensor(lens, dtype=torch.long, device=device)  # [B]
        build = {FULL: self._full_view, RING: self._ring_view}
        self.views = {g: build[g](lens) for g in set(self.pool.group)}
        # what the decoder derives from the prefix alone (canvas positions, RoPE tables, key-group masks), kept
        # for the next step over the same prefix (`DiffusionGemma.denoise`); keyed by canvas length and dtype
        self.decoder_cache: dict = {}

    def _table(self, group: str, nb: int) -> torch.Tensor:
        rows = [c.pages[group][:nb] for c in self.caches]
        return torch.tensor([r + [0] * (nb - len(r)) for r in rows], dtype=torch.long).view(len(rows), nb)

    def _full_view(self, lens: list[int]):
        nb = padded_blocks(max(pages_for(n) for n in lens))  # whole key groups (model/attention.py)
        pos = torch.arange(nb * BLOCK_TOKENS).view(1, nb, BLOCK_TOKENS).expand(len(lens), nb, BLOCK_TOKENS)
        valid = pos < torch.tensor(lens)[:, None, None]
        return (*self._upload(self._table(FULL, nb), pos, valid), group_rows(lens, self.pool.device))

    def _ring_view(self, lens: list[int]):
        R = ring_tokens(self.caches[0].config)
        nb = padded_blocks(max(pages_for(min(n, R)) for n in lens))
        slot = torch.arange(nb * BLOCK_TOKENS).view(1, nb, BLOCK_TOKENS)
        n = torch.tensor(lens)[:, None, None]
        valid = slot < torch.clamp(n, max=R)
        pos = slot + R * torch.div(
            n - 1 - slot, R, rounding_mode="floor"
        )  # the latest position p < n in slot
        groups = group_rows([min(n, R) for n in lens], self.pool.device)  # a ring holds its last R tokens
        return (*self._upload(self._table(RING, nb), torch.where(valid, pos, -1), valid), groups)

    def _upload(self, *tensors: torch.Tensor):
        return tuple(t.to(self.pool.device) for t in tensors)

    def layer_keys(self, layer: int) -> PagedKeys:
        table, pos, valid, groups = self.views[self.pool.group[layer]]
        group = self.pool.group[layer]
        return PagedKeys(self.pool.keys[layer], self.pool.values[layer], table, pos, valid, groups, tag=group)

    def kv_bytes(self) -> int:
        """K/V bytes one forward over this prefix reads (whole pages up to each row's length)."""
        R = ring_tokens(self.caches[0].config)
        lens = [c.length for c in self.caches]
        pages = {FULL: sum(pages_for(n) for n in lens), RING: sum(pages_for(min(n, R)) for n in lens)}
        item = torch.empty((), dtype=self.pool.dtype).element_size()
        return sum(n * page_bytes(self.caches[0].config, item)[g] for g, n in pages.items())


def write_plan(caches: list[SequenceCache], lengths: list[int], T: int, device: torch.device) -> dict:
    """Where the encoder's new K/V ([B, G, T, d], rows' tokens left-aligned) go, per group:
    (source index into the B*T flattened tokens, page ids, offsets), uploaded once for all layers."""
    plan = {}
    for group in set(caches[0].pool.group):
        src, pages, offs = [], [], []
        for r, (c, n) in enumerate(zip(caches, lengths, strict=True)):
            p, o, skip = c.slots(group, c.length, n)
            src.extend(range(r * T + skip, r * T + n))
            pages.extend(p)
            offs.extend(o)
        plan[group] = tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (src, pages, offs))
    return plan


def write_layer(pool: KVPool, layer: int, plan: dict, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Write one layer's new K/V ([B, G, T, d]) into the pool in place, following `write_plan`."""
    src, pages, offs = plan[pool.group[layer]]
    if src.numel() == 0:
        return
    B, G, T, d = keys.shape
    for store, new in ((pool.keys[layer], keys), (pool.values[layer], values)):
        flat = new.transpose(1, 2).reshape(B * T, G, d)[src]  # [N, G, d]
        store[pages, :, offs] = flat.to(store.dtype)
