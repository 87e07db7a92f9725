"""The paged KV pool: in-place writes, the sliding ring, capacity, release and reuse, batch invariance over pages."""

from __future__ import annotations

import pytest
import torch

from model.attention import BLOCK_TOKENS
from model.config import from_name
from model.kv_cache import KVCapacityError, PrefixBatch, write_layer, write_plan
from model.transformer import DiffusionGemma, TokenBatch
from model.weights import init_random


@pytest.fixture(scope="module")
def model():
    return init_random(DiffusionGemma(from_name("tiny-test")), seed=3).eval()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _encode(model, cache, ids: list[int]) -> torch.Tensor:
    batch = TokenBatch.from_lists([ids], [cache.length], 0)
    with torch.no_grad():
        return model.encode(batch, [cache])[0, : len(ids)]


def _old_append(kv: tuple | None, keys: torch.Tensor, values: torch.Tensor, keep: int | None):
    """The previous cache's append (concatenate, then trim a sliding layer to its last `keep` tokens)."""
    if kv is not None:
        keys, values = torch.cat([kv[0], keys], 1), torch.cat([kv[1], values], 1)
    if keep is not None and keys.shape[1] > keep:
        keys, values = keys[:, -keep:], values[:, -keep:]
    return keys, values


def test_ring_and_pages_hold_what_the_concatenated_cache_held(model):
    """Writes of many chunk sizes (a ring of window - 1 = 7 slots wraps several times; the full layer spans
    pages): every layer reads back, in position order, exactly the old concatenate-and-trim cache."""
    cfg = model.config
    cache = model.new_cache()
    g = torch.Generator().manual_seed(0)
    old: list = [None] * cfg.num_layers
    for n in (3, 5, 1, 9, 16, 2, 70, 7, 8):
        cache.ensure_room(n)
        plan = write_plan([cache], [n], n + 2, torch.device("cpu"))  # 2 padding tokens a row: skipped
        for i, spec in enumerate(cfg.layers):
            k = torch.randn(1, spec.num_kv_heads, n + 2, spec.head_dim, generator=g)
            v = torch.randn(1, spec.num_kv_heads, n + 2, spec.head_dim, generator=g)
            keep = cfg.sliding_window - 1 if spec.is_sliding else None
            old[i] = _old_append(old[i], k[0, :, :n], v[0, :, :n], keep)
            write_layer(cache.pool, i, plan, k, v)
        cache.advance(n)
        for i in range(cfg.num_layers):
            got = cache.layer_kv(i)
            assert torch.equal(got.keys, old[i][0]) and torch.equal(got.values, old[i][1])
            assert got.start == (cache.length - old[i][0].shape[1])
    cache.release()


def test_writes_are_in_place_and_nothing_grows(model):
    """A cache admitted with a capacity takes its pages once: encoding and denoising never reallocate the pool
    or change the pages it holds."""
    L = model.config.canvas_length
    cache = model.new_cache(capacity_tokens=20 + 3 * L)
    pool = cache.pool
    ptrs = [t.data_ptr() for t in pool.keys + pool.values]
    pages, nbytes = {g: list(p) for g, p in cache.pages.items()}, pool.nbytes()
    _encode(model, cache, _ids(20, 1))
    for c in range(3):
        with torch.no_grad():
            model.denoise(torch.randint(0, 512, (1, L)), PrefixBatch([cache]))
        _encode(model, cache, _ids(L, 10 + c))
    assert [t.data_ptr() for t in pool.keys + pool.values] == ptrs
    assert cache.pages == pages and pool.nbytes() == nbytes and cache.length == 20 + 3 * L
    cache.release()


def test_writing_past_the_capacity_is_a_clear_error_that_changes_nothing(model):
    cache = model.new_cache(capacity_tokens=10)
    _encode(model, cache, _ids(8, 2))
    before = [cache.layer_kv(i).keys.clone() for i in range(model.config.num_layers)]
    with pytest.raises(KVCapacityError, match="holds 10 tokens .* 11 were written"):
        _encode(model, cache, _ids(3, 3))
    assert cache.length == 8
    assert all(torch.equal(cache.layer_kv(i).keys, b) for i, b in enumerate(before))
    cache.release()
    with pytest.raises(KVCapacityError, match="released"):
        _encode(model, cache, _ids(1, 4))


def test_released_pages_are_reused_and_stale_contents_never_leak(model):
    """A released sequence's pages go to the next one (the pool does not grow), and what the old sequence left
    in them cannot change the new one's outputs: bit-identical to a fresh model's."""
    fresh = init_random(DiffusionGemma(from_name("tiny-test")), seed=3).eval()
    prompt, canvas = _ids(11, 5), torch.randint(0, 512, (1, model.config.canvas_length))
    first = model.new_cache(capacity_tokens=100)
    _encode(model, first, _ids(100, 6))  # fills every slot with other data
    pages = {g: list(p) for g, p in first.pages.items()}
    nbytes = first.pool.nbytes()
    first.release()
    first.release()  # idempotent
    second = model.new_cache(capacity_tokens=100)
    assert {g: sorted(p) for g, p in second.pages.items()} == {g: sorted(p) for g, p in pages.items()}
    assert second.pool.nbytes() == nbytes
    ref = fresh.new_cache(capacity_tokens=100)
    assert torch.equal(_encode(model, second, prompt), _encode(fresh, ref, prompt))
    with torch.no_grad():
        assert torch.equal(
            model.denoise(canvas, PrefixBatch([second])), fresh.denoise(canvas, PrefixBatch([ref]))
        )
    second.release()


def test_a_garbage_collected_cache_gives_its_pages_back(model):
    pool = model.kv_pool
    cache = model.new_cache(capacity_tokens=300)
    used = pool.used_pages("full")
    del cache
    assert pool.used_pages("full") == used - -(-300 // BLOCK_TOKENS)


def test_rows_spanning_several_pages_are_bit_identical_alone_and_batched(model):
    """Prefixes of 2..200 tokens (1 to 4 pages, the ring wrapped or not), prefilled in different chunkings and
    batched with each other: the encoder's hidden states and the decoder's output of every row are exactly the
    ones it gets alone."""
    L = model.config.canvas_length
    prompts = [_ids(n, 20 + n) for n in (2, 70, 200, 9)]
    alone_caches, alone_hidden = [], []
    for p in prompts:
        c = model.new_cache(capacity_tokens=len(p) + L)
        alone_hidden.append(_encode(model, c, p))
        alone_caches.append(c)
    caches = [model.new_cache(capacity_tokens=len(p) + L) for p in prompts]
    with torch.no_grad():
        hidden = model.encode(TokenBatch.from_lists(prompts, [0] * 4, 0), caches)
    for i, p in enumerate(prompts):
        assert torch.equal(hidden[i, : len(p)], alone_hidden[i])
    canvas = torch.randint(0, 512, (4, L), generator=torch.Generator().manual_seed(7))
    soft = torch.randn(4, L, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        together = model.denoise(canvas, PrefixBatch(caches), soft)
        for i in range(4):
            alone = model.denoise(canvas[i : i + 1], PrefixBatch([alone_caches[i]]), soft[i : i + 1])
            assert torch.equal(together[i : i + 1], alone)
        # a commit batched with rows of other lengths equals the commit alone
        commit = model.encode(
            TokenBatch.from_lists([canvas[0].tolist()] * 4, [len(p) for p in prompts], 0), caches
        )
        for i in range(4):
            one = model.encode(
                TokenBatch.from_lists([canvas[0].tolist()], [len(prompts[i])], 0), [alone_caches[i]]
            )
            assert torch.equal(commit[i : i + 1], one)
    for c in caches + alone_caches:
        c.release()


def test_a_pool_reserved_for_the_budget_never_grows():
    """An engine sizes the pool once (`reserve_for`); admissions within the budget then take pages without any
    reallocation, and the pool holds no more than the budget."""
    model = DiffusionGemma(from_name("tiny-test")).eval()
    pool = model.kv_pool
    need = model.kv_reservation_bytes(100)
    pool.reserve_for(budget_bytes=4 * need, max_sequences=4)
    assert pool.nbytes() <= 4 * need
    ptrs = [t.data_ptr() for t in pool.keys + pool.values]
    caches = [model.new_cache(capacity_tokens=100) for _ in range(4)]
    assert [t.data_ptr() for t in pool.keys + pool.values] == ptrs
    assert sum(c.nbytes() for c in caches) <= pool.nbytes()


def test_rows_longer_than_a_key_group_are_bit_identical_alone_and_batched(model):
    """Cached contexts of 5, 130 and 2200 tokens (the last past the largest 2048-key group; caches filled with
    random K/V, which the attention does not mind): the decoder's output and a commit's encoder output of each
    row batched with the others are exactly its numbers alone (each alone call from the same cache contents)."""
    L = model.config.canvas_length
    lengths = [5, 130, 2200]
    caches = [model.new_cache(capacity_tokens=n + L) for n in lengths]
    g = torch.Generator().manual_seed(11)
    for store in (*model.kv_pool.keys, *model.kv_pool.values):
        store.copy_(torch.randn(store.shape, generator=g))
    for c, n in zip(caches, lengths, strict=True):
        c.advance(n)
    canvas = torch.randint(0, 512, (3, L), generator=g)
    with torch.no_grad():
        together = model.denoise(canvas, PrefixBatch(caches))
        for i, c in enumerate(caches):
            assert torch.equal(together[i : i + 1], model.denoise(canvas[i : i + 1], PrefixBatch([c])))
        rows = [canvas[i, : 4 + 5 * i].tolist() for i in range(3)]  # commits of different lengths
        stores = (*model.kv_pool.keys, *model.kv_pool.values)
        before = [t.clone() for t in stores]
        batched = model.encode(TokenBatch.from_lists(rows, lengths, 0), caches)
        for i, c in enumerate(caches):
            for t, b in zip(stores, before, strict=True):  # the sliding ring was overwritten: restore it
                t.copy_(b)
            c.length = lengths[i]
            one = model.encode(TokenBatch.from_lists([rows[i]], [lengths[i]], 0), [c])
            assert torch.equal(batched[i : i + 1, : len(rows[i])], one)
    for c in caches:
        c.release()


def test_a_short_sequence_reserves_less_workspace_than_a_long_one():
    """The attention workspace admission reserves grows with the key groups a row can read: a short sequence
    (given the engine's largest prompt piece) reserves less than the largest-group bound, a long one as much."""
    model = DiffusionGemma(from_name("tiny-test")).eval()
    short = model.kv_reservation_bytes(100, new_tokens=64)
    assert short < model.kv_reservation_bytes(100)
    long = 40 * 2048
    assert model.kv_reservation_bytes(long, new_tokens=64) == model.kv_reservation_bytes(long)
    # a larger prompt piece can only raise it
    assert model.kv_reservation_bytes(100, new_tokens=512) >= short


def test_a_prefix_reused_across_steps_gives_what_a_fresh_one_gives(model):
    """`denoise` keeps what it derives from the prefix alone (positions, RoPE tables, masks) on the PrefixBatch
    for the next step: later steps over that prefix equal steps over a freshly built one, for rows of different
    prefix lengths (masked key groups) with and without self-conditioning."""
    L, D = model.config.canvas_length, model.config.hidden_size
    caches = [model.new_cache() for _ in range(3)]
    for i, (cache, n) in enumerate(zip(caches, (5, 70, 140), strict=True)):
        _encode(model, cache, _ids(n, seed=20 + i))
    g = torch.Generator().manual_seed(4)
    kept = PrefixBatch(caches)
    with torch.no_grad():
        for step in range(3):
            canvas = torch.randint(0, 512, (3, L), generator=g)
            soft = torch.randn(3, L, D, generator=g) if step else None
            assert torch.equal(
                model.denoise(canvas, kept, soft), model.denoise(canvas, PrefixBatch(caches), soft)
            )
    assert kept.decoder_cache
