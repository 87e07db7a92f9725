"""Blocked attention (model/attention.py) against plain softmax attention, and the CPU fact it relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import (
    BLOCK_TOKENS,
    GROUP_BLOCKS,
    DenseKeys,
    PagedKeys,
    _bmm,
    blocked_attention,
    group_rows,
    key_groups,
    largest_group_keys,
    workspace_bytes,
)


def _reference(q, k, v, mask):
    """Plain attention: q [B, H, T, d], k/v [B, G, S, d], mask [B, T, S] (scale 1, GQA by repetition)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1)) @ v


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 8)])
def test_blocked_attention_equals_softmax_attention(causal, window):
    """Prefix (150 keys: three blocks, rows of different valid lengths) then new tokens; GQA 4 heads on 2."""
    g = torch.Generator().manual_seed(0)
    B, H, G, T, S, d = 3, 4, 2, 20, 150, 16
    q = torch.randn(B, H, T, d, generator=g)
    pk, pv = torch.randn(B, G, S, d, generator=g), torch.randn(B, G, S, d, generator=g)
    nk, nv = torch.randn(B, G, T, d, generator=g), torch.randn(B, G, T, d, generator=g)
    sizes, news = torch.tensor([150, 7, 64]), torch.tensor([20, 1, 13])
    p_pos = torch.arange(S).expand(B, S)
    p_valid = p_pos < sizes[:, None]
    q_pos = sizes[:, None] + torch.arange(T)
    q_valid = torch.arange(T) < news[:, None]
    sources = [DenseKeys(pk, pv, p_pos, p_valid), DenseKeys(nk, nv, q_pos, q_valid)]
    got = blocked_attention(q, sources, q_pos, q_valid, causal=causal, window=window, min_rows=8)
    k_pos, k_valid = torch.cat([p_pos, q_pos], 1), torch.cat([p_valid, q_valid], 1)
    mask = k_valid[:, None, :] & q_valid[:, :, None]
    if causal:
        mask &= k_pos[:, None, :] <= q_pos[:, :, None]
        if window is not None:
            mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    want = _reference(q, torch.cat([pk, nk], 2), torch.cat([pv, nv], 2), mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert torch.equal(got[:, :, T - 1][~q_valid[:, -1]], torch.zeros_like(got[:, :, T - 1][~q_valid[:, -1]]))
    assert (got[:, :, T - 1][q_valid[:, -1]] != 0).any()


def test_blocked_attention_is_differentiable():
    """Training runs the same attention with gradients (the prefix is cut from one window pass)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 1, 70, 8, generator=g, requires_grad=True)
    pos = torch.arange(70).expand(2, 70)
    out = blocked_attention(
        q,
        [DenseKeys(k, k, pos, pos < 66)],
        pos[:, 60:65],
        torch.ones(2, 5, dtype=torch.bool),
        causal=True,
        window=None,
    )
    out.sum().backward()
    assert q.grad.abs().sum() > 0 and k.grad[:, :, :65].abs().sum() > 0
    assert torch.equal(k.grad[:, :, 65:], torch.zeros_like(k.grad[:, :, 65:]))  # masked or later keys


def test_cpu_batched_gemm_rows_do_not_depend_on_their_batch():
    """The platform fact the blocked attention relies on (model/attention.py): with >= 2 matrices and >= 8 rows,
    one matrix's product has the same bits whatever the batch count and row count around it."""
    g = torch.Generator().manual_seed(0)
    # (inner size, outer size, rows): q·k reduces over d; probabilities x values over a key group's K keys
    for d, P, M in (
        (16, 64, 8),
        (32, 64, 17),
        (256, 64, 100),
        (1024, 32, 8),
        (2048, 64, 17),
        (2048, 64, 128),
    ):
        a, b = torch.randn(M, d, generator=g), torch.randn(d, P, generator=g)
        ref = None
        for rows, count in ((M, 2), (M + 5, 3), (300, 33)):
            A, B = torch.randn(count, rows, d, generator=g), torch.randn(count, d, P, generator=g)
            A[1, :M], B[1] = a, b
            out = torch.bmm(A, B)[1, :M]
            ref = out if ref is None else ref
            assert torch.equal(out, ref)
        # one matrix: its rows cut in two halves of >= 8 rows (M = 100, 128), else a stride-0 second copy
        assert torch.equal(_bmm(a[None], b[None], min_rows=8)[0], ref)
        assert torch.equal(_bmm(a[None], b[None])[0], ref)


def test_sdpa_is_not_used_because_padding_changes_its_rounding():
    """Why the blocked form exists: SDPA over a row's keys padded with masked ones (as a batch with a longer row
    pads it) does not round like SDPA over the row's keys alone on CPU."""
    g = torch.Generator().manual_seed(2)
    differs = 0
    for s in range(5, 40):
        q = torch.randn(1, 2, 16, 16, generator=g)
        k, v = torch.randn(1, 2, s, 16, generator=g), torch.randn(1, 2, s, 16, generator=g)
        alone = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        mask = (torch.arange(s + 29) < s).expand(16, s + 29)
        padded = F.scaled_dot_product_attention(
            q, F.pad(k, (0, 0, 0, 29)), F.pad(v, (0, 0, 0, 29)), attn_mask=mask, scale=1.0
        )
        differs += not torch.equal(alone, padded)
    assert differs


def test_cutting_queries_into_chunks_changes_no_bit():
    """Attention.attend cuts long encoder calls into canvas-sized query chunks (bounding the transient memory
    admission reserves for); each query's numbers are its own, so the output is identical to one call."""
    from model.config import from_name
    from model.layers import Attention

    config = from_name("tiny-test")
    attn = Attention(config, config.layers[2])
    g = torch.Generator().manual_seed(3)
    B, T, G, d = 2, 45, attn.spec.num_kv_heads, attn.spec.head_dim
    q = torch.randn(B, config.num_heads, T, d, generator=g)
    k, v = torch.randn(B, G, T, d, generator=g), torch.randn(B, G, T, d, generator=g)
    pos, valid = torch.arange(T).expand(B, T), torch.arange(T) < torch.tensor([[45], [30]])
    sources = [DenseKeys(k, v, pos, valid)]
    with torch.no_grad():
        chunked = attn.attend(q, sources, pos, valid, causal=True, window=None)
        attn.query_chunk = T
        whole = attn.attend(q, sources, pos, valid, causal=True, window=None)
    assert attn.query_chunk > config.canvas_length
    assert torch.equal(chunked, whole)


def test_key_groups_depend_only_on_their_index():
    """The partition of a source's blocks into key groups: 1, 1, 2, 4, ... then GROUP_BLOCKS-wide groups; a
    longer source only adds groups after a shorter one's (so a row's groups never depend on its batch-mates),
    every block is covered once, and the padding stays below the row's own length plus a group."""
    whole = key_groups(40 * GROUP_BLOCKS)
    assert whole[:3] == [(0, 1), (1, 2), (2, 4)]
    assert all(b - a <= GROUP_BLOCKS for a, b in whole)
    assert all(a == prev_b for (a, _), (_, prev_b) in zip(whole[1:], whole, strict=False))
    for n in range(1, 3 * GROUP_BLOCKS + 2):
        groups = key_groups(n)
        assert groups == whole[: len(groups)]
        assert groups[-1][0] < n <= groups[-1][1] <= max(2 * n, n + GROUP_BLOCKS)
    assert len(key_groups(1563)) < 60  # a 100k-token prefix: ~55 iterations per layer, not 1563


def _paged_case(lengths: list[int], T: int, G: int, d: int, seed: int):
    """A pool holding rows with `lengths` cached keys on scattered pages, their dense equivalents, and T new
    tokens per row. Returns (pool keys, pool values, table, positions, valid, dense k, v, positions, valid)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK_TOKENS) for n in lengths]
    pages = sum(need) + 3
    pk = torch.randn(pages, G, BLOCK_TOKENS, d, generator=g)
    pv = torch.randn(pages, G, BLOCK_TOKENS, d, generator=g)
    order = torch.randperm(pages, generator=g).tolist()  # pages out of order, as a pool hands them out
    nb, B = max(need), len(lengths)
    table = torch.zeros(B, nb, dtype=torch.long)
    for r, n in enumerate(need):
        table[r, :n] = torch.tensor(order[sum(need[:r]) : sum(need[:r]) + n])
    pos = torch.arange(nb * BLOCK_TOKENS).view(1, nb, BLOCK_TOKENS).expand(B, nb, BLOCK_TOKENS)
    valid = pos < torch.tensor(lengths)[:, None, None]
    return pk, pv, table, pos, valid


def _attend_paged(q, pk, pv, table, pos, valid, nk, nv, q_pos, q_valid, causal, window):
    """Paged prefix then new tokens, as PrefixBatch reads it: each key group only for the rows with keys in it,
    without a mask where all its keys are valid in those rows."""
    groups = group_rows(valid.flatten(1).sum(1).tolist(), "cpu")
    sources = [PagedKeys(pk, pv, table, pos, valid, groups), DenseKeys(nk, nv, q_pos, q_valid)]
    with torch.no_grad():
        return blocked_attention(q, sources, q_pos, q_valid, causal=causal, window=window, min_rows=8)


MIXED = ([1, 64, 65, 700, GROUP_BLOCKS * BLOCK_TOKENS + 1, 4470], [3, 20, 1, 20, 7, 20])
LONG = ([GROUP_BLOCKS * BLOCK_TOKENS + 1, 4470, 700], [20, 5, 1])  # 10 leading pages valid in every row


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 100)])
@pytest.mark.parametrize("lengths,news", [MIXED, LONG])
def test_long_paged_contexts_alone_equal_batched_and_match_softmax(causal, window, lengths, news):
    """Rows with 1 key to more than one largest key group (1 page ... 70 pages) on scattered pool pages, plus new
    tokens: each row alone gives exactly its batched numbers (decoder, causal encoder, sliding window), and all
    match plain softmax attention over the row's keys. Batched, a group is computed only for the rows with keys
    in it, and without a mask when all its keys are valid in those rows."""
    B, H, G, T, d = len(lengths), 4, 2, 20, 16
    pk, pv, table, pos, valid = _paged_case(lengths, T, G, d, seed=4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, T, d, generator=g)
    nk, nv = torch.randn(B, G, T, d, generator=g), torch.randn(B, G, T, d, generator=g)
    q_pos = torch.tensor(lengths)[:, None] + torch.arange(T)
    q_valid = torch.arange(T) < torch.tensor(news)[:, None]
    together = _attend_paged(q, pk, pv, table, pos, valid, nk, nv, q_pos, q_valid, causal, window)
    padding = together.transpose(1, 2)[~q_valid]  # queries that are padding get zeros, masked or not
    assert torch.equal(padding, torch.zeros_like(padding))
    for r, n in enumerate(lengths):
        nb = -(-n // BLOCK_TOKENS)
        one = slice(r, r + 1)
        alone = _attend_paged(
            q[one], pk, pv, table[one, :nb], pos[one, :nb], valid[one, :nb], nk[one], nv[one], q_pos[one],
            q_valid[one], causal, window,
        )  # fmt: skip
        assert torch.equal(alone, together[one])
        # the reference: this row's keys in position order, dense
        rows = table[r, :nb]
        k = torch.cat([pk[rows].transpose(0, 1).reshape(G, -1, d)[:, :n], nk[r]], 1)[None]
        v = torch.cat([pv[rows].transpose(0, 1).reshape(G, -1, d)[:, :n], nv[r]], 1)[None]
        k_pos = torch.cat([torch.arange(n), q_pos[r]])
        k_valid = torch.cat([torch.ones(n, dtype=torch.bool), q_valid[r]])
        mask = k_valid[None, :] & q_valid[r][:, None]
        if causal:
            mask &= k_pos[None, :] <= q_pos[r][:, None]
            if window is not None:
                mask &= k_pos[None, :] > q_pos[r][:, None] - window
        want = _reference(q[one], k, v, mask[None])
        torch.testing.assert_close(together[one], want, atol=2e-5, rtol=1e-4)


def _transient_peak(fn) -> int:
    """Largest sum of live bytes allocated inside `fn` (CPU allocator events under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def _decoder_chunk_peak(lengths: list[int], H: int, G: int, T: int, d: int, seed: int) -> int:
    """Transient bytes one canvas-sized query chunk of rows with cached `lengths` allocates in `blocked_attention`."""
    rows = len(lengths)
    pk, pv, table, pos, valid = _paged_case(lengths, T, G, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(rows, H, T, d, generator=g)
    nk, nv = torch.randn(rows, G, T, d, generator=g), torch.randn(rows, G, T, d, generator=g)
    q_pos = torch.tensor(lengths)[:, None] + torch.arange(T)
    q_valid = torch.ones(rows, T, dtype=torch.bool)
    return _transient_peak(
        lambda: _attend_paged(q, pk, pv, table, pos, valid, nk, nv, q_pos, q_valid, True, None)
    )


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_workspace_bound_covers_long_contexts(rows):
    """What admission reserves per row for one layer's attention (`workspace_bytes`) covers the transient bytes a
    canvas-sized query chunk really allocates over a context longer than the largest key group (4 rows: one
    short, so the long groups run for some rows only)."""
    H, G, T, d = 4, 2, 32, 32
    lengths = [GROUP_BLOCKS * BLOCK_TOKENS * 2 + 5] * min(rows, 3) + [100] * (rows - 3)
    peak = _decoder_chunk_peak(lengths, H, G, T, d, seed=6)
    bound = rows * workspace_bytes(H, G, d, T, itemsize=4, cpu=True)
    assert (
        H * T * GROUP_BLOCKS * BLOCK_TOKENS * 4 * rows < peak <= bound
    )  # the largest group's scores are in it


@pytest.mark.parametrize("rows", [1, 4])
def test_a_short_rows_workspace_bound_is_its_own_largest_group(rows):
    """Rows that never read a long key group reserve only for the largest group of their own keys and new
    tokens (`group_keys`), and the transient bytes they really allocate stay within that smaller bound."""
    H, G, T, d = 4, 2, 32, 32
    group = max(largest_group_keys(100 + T), largest_group_keys(T))
    assert group < GROUP_BLOCKS * BLOCK_TOKENS
    peak = _decoder_chunk_peak([100] * rows, H, G, T, d, seed=8)
    bound = rows * workspace_bytes(H, G, d, T, itemsize=4, cpu=True, group_keys=group)
    assert peak <= bound < rows * workspace_bytes(H, G, d, T, itemsize=4, cpu=True)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 100)])
def test_shortcuts_change_no_bit(causal, window):
    """What the serving path skips gives the same bits: masks made once per pass and reused by later layers
    (`masks`), no mask for the decoder's own canvas (`unmasked`), no padding-query work (`queries_valid`)."""
    lengths, T = [1, 64, 65, 700], 20
    B, H, G, d = len(lengths), 4, 2, 16
    pk, pv, table, pos, valid = _paged_case(lengths, T, G, d, seed=8)
    groups = group_rows(valid.flatten(1).sum(1).tolist(), "cpu")
    q_pos = torch.tensor(lengths)[:, None] + torch.arange(T)
    q_valid = torch.ones(B, T, dtype=torch.bool)
    masks: dict = {}
    for layer in range(2):  # the second "layer" reads the first one's masks
        g = torch.Generator().manual_seed(10 + layer)
        q = torch.randn(B, H, T, d, generator=g)
        nk, nv = torch.randn(B, G, T, d, generator=g), torch.randn(B, G, T, d, generator=g)
        plain = [PagedKeys(pk, pv, table, pos, valid, groups), DenseKeys(nk, nv, q_pos, q_valid)]
        tagged = [
            PagedKeys(pk, pv, table, pos, valid, groups, tag="full"),
            DenseKeys(nk, nv, q_pos, q_valid, unmasked=not causal, tag="new"),
        ]
        with torch.no_grad():
            want = blocked_attention(q, plain, q_pos, q_valid, causal=causal, window=window, min_rows=8)
            got = blocked_attention(
                q,
                tagged,
                q_pos,
                q_valid,
                causal=causal,
                window=window,
                min_rows=8,
                queries_valid=True,
                masks=masks,
            )
        assert torch.equal(got, want)
    assert masks  # the prefix's masked groups were cached


def test_model_dtype_gemms_run_in_bf16_and_stay_close_to_fp32(monkeypatch):
    """On a device listed in MODEL_DTYPE_GEMM_DEVICES (CUDA; forced here on CPU), a bf16 model's score and value
    GEMMs take bf16 operands while the softmax and running sums stay fp32; the result stays within bf16
    rounding of fp32 attention over the same (bf16-rounded) inputs, padding queries still get zeros, and fp32
    models are untouched."""
    import model.attention as attention

    lengths, T, G, H, d = [GROUP_BLOCKS * BLOCK_TOKENS + 70, 130, 5], 24, 2, 4, 32
    pk, pv, table, pos, valid = _paged_case(lengths, T, G, d, seed=21)
    g = torch.Generator().manual_seed(22)
    q = torch.randn(len(lengths), H, T, d, generator=g)
    nk, nv = torch.randn(len(lengths), G, T, d, generator=g), torch.randn(len(lengths), G, T, d, generator=g)
    q_pos = torch.tensor(lengths)[:, None] + torch.arange(T)
    q_valid = torch.ones(len(lengths), T, dtype=torch.bool)
    q_valid[2, 20:] = False
    bf = [t.bfloat16() for t in (q, pk, pv, nk, nv)]
    args = (table, pos, valid)
    want = _attend_paged(
        *[t.float() for t in bf[:3]], *args, *[t.float() for t in bf[3:]], q_pos, q_valid, True, None
    )

    seen = []
    real_bmm = attention._bmm
    monkeypatch.setattr(
        attention, "_bmm", lambda a, b, *r: seen.append((a.dtype, b.dtype)) or real_bmm(a, b, *r)
    )
    fp32_path = _attend_paged(*bf[:3], *args, *bf[3:], q_pos, q_valid, True, None)
    assert set(seen) == {(torch.float32, torch.float32)}  # CPU: fp32 GEMMs, as before
    seen.clear()
    monkeypatch.setattr(attention, "MODEL_DTYPE_GEMM_DEVICES", ("cuda", "cpu"))
    got = _attend_paged(*bf[:3], *args, *bf[3:], q_pos, q_valid, True, None)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[2, :, 20:], torch.zeros_like(got[2, :, 20:]))
    err = (got.float() - want).norm() / want.norm()
    assert 0 < err < 2e-2  # CPU has no fp32-output bf16 GEMM: its scores are rounded to bf16 first
    assert (fp32_path.float() - want).norm() / want.norm() < err  # fp32 GEMMs are the closer of the two
    seen.clear()
    _attend_paged(q, pk, pv, *args, nk, nv, q_pos, q_valid, True, None)  # an fp32 model: fp32 GEMMs
    assert set(seen) == {(torch.float32, torch.float32)}


def test_workspace_bound_covers_model_dtype_gemms(monkeypatch):
    """The bf16 bound covers the transient bytes of the model-dtype GEMM path (scores as written, their fp32
    copy, the probabilities cast back), forced on CPU."""
    import model.attention as attention

    monkeypatch.setattr(attention, "MODEL_DTYPE_GEMM_DEVICES", ("cuda", "cpu"))
    H, G, T, d, rows = 4, 2, 32, 32, 3
    lengths = [GROUP_BLOCKS * BLOCK_TOKENS * 2 + 5] * rows
    pk, pv, table, pos, valid = _paged_case(lengths, T, G, d, seed=23)
    g = torch.Generator().manual_seed(24)
    q = torch.randn(rows, H, T, d, generator=g).bfloat16()
    nk, nv = (torch.randn(rows, G, T, d, generator=g).bfloat16() for _ in range(2))
    q_pos = torch.tensor(lengths)[:, None] + torch.arange(T)
    q_valid = torch.ones(rows, T, dtype=torch.bool)
    peak = _transient_peak(
        lambda: _attend_paged(
            q, pk.bfloat16(), pv.bfloat16(), table, pos, valid, nk, nv, q_pos, q_valid, True, None
        )
    )
    assert (
        H * T * GROUP_BLOCKS * BLOCK_TOKENS * 4 * rows
        < peak
        <= rows * workspace_bytes(H, G, d, T, 2, cpu=False)
    )
