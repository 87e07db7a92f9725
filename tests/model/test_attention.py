"""Blocked attention (model/attention.py) against plain softmax attention, and the CPU fact it relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import DenseKeys, _bmm, blocked_attention


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
    for d, P, M in ((16, 64, 8), (32, 64, 17), (256, 64, 100)):
        a, b = torch.randn(M, d, generator=g), torch.randn(d, P, generator=g)
        ref = None
        for rows, count in ((M, 2), (M + 5, 3), (300, 33)):
            A, B = torch.randn(count, rows, d, generator=g), torch.randn(count, d, P, generator=g)
            A[1, :M], B[1] = a, b
            out = torch.bmm(A, B)[1, :M]
            ref = out if ref is None else ref
            assert torch.equal(out, ref)
        assert torch.equal(_bmm(a[None], b[None])[0], ref)  # one matrix: padded to a batch of two (no copy)


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
