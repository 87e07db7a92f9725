"""`ExpertBank` (dispatch -> experts -> combine) against `moe_reference` (the plain per-token loop).

Shape legend: T tokens, K top-k, E experts, D hidden, INNER expert inner size.

Covers the edges the ExpertShard seam depends on: one token and many, top-k 1 and more, expert ranges that do not
divide the expert count evenly, a range no token routes to (exactly zero), an empty range, and partial sums of
shards adding up to the whole bank.
"""

from __future__ import annotations

import pytest
import torch

from model import moe
from model.moe import ExpertBank, Router, dispatch, grouped_layout, moe_reference

D, INNER, E = 32, 24, 8
ATOL, RTOL = 1e-5, 1e-5  # fp32; the bank and the loop add the same terms in a different order


def _bank(first: int, count: int, full: ExpertBank | None = None, seed: int = 0) -> ExpertBank:
    """A bank of experts [first, first + count); a slice of `full` when given, so shards share weights."""
    bank = ExpertBank(D, INNER, first, count)
    with torch.no_grad():
        if full is not None:
            lo = first - full.first
            bank.gate_up_proj.copy_(full.gate_up_proj[lo : lo + count])
            bank.down_proj.copy_(full.down_proj[lo : lo + count])
        else:
            g = torch.Generator().manual_seed(seed)
            bank.gate_up_proj.copy_(torch.randn(count, 2 * INNER, D, generator=g) * 0.3)
            bank.down_proj.copy_(torch.randn(count, D, INNER, generator=g) * 0.3)
    return bank


def _routing(T: int, k: int, seed: int = 1, experts: int = E):
    """Tokens x [T, D] and a real top-k routing (distinct ids per token, positive weights)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    scores = torch.randn(T, experts, generator=g)
    weights, ids = torch.topk(torch.softmax(scores, -1), k, dim=-1)
    return x, weights * (0.5 + torch.rand(T, k, generator=g)), ids


FULL = _bank(0, E)


@pytest.mark.parametrize("T", [1, 2, 37, 300])
@pytest.mark.parametrize("k", [1, 2, 3, E])
def test_full_bank_matches_plain_loop(T, k):
    x, w, ids = _routing(T, k, seed=T * 10 + k)
    got = FULL(x, w, ids)
    want = moe_reference(x, w, ids, FULL)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert got.abs().max() > 0.1  # real output, not a zero that trivially matches


SPLITS = {
    "halves": [(0, 4), (4, 4)],
    "3/5": [(0, 3), (3, 5)],
    "3/3/2": [(0, 3), (3, 3), (6, 2)],
    "singletons": [(e, 1) for e in range(E)],
    "with-empty": [(0, 5), (5, 0), (5, 3)],
}


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("T,k", [(1, 1), (1, 3), (40, 2), (200, 1), (64, E)])
def test_shards_match_plain_loop_and_sum_to_the_full_bank(split, T, k):
    x, w, ids = _routing(T, k, seed=T + k)
    total = torch.zeros(T, D)
    for first, count in SPLITS[split]:
        shard = _bank(first, count, FULL)
        part = shard(x, w, ids)
        torch.testing.assert_close(part, moe_reference(x, w, ids, shard), atol=ATOL, rtol=RTOL)
        # a shard only touches the tokens that chose one of its experts
        hit = ((ids >= first) & (ids < first + count)).any(-1)
        assert (part[~hit] == 0).all()
        total += part
    torch.testing.assert_close(total, FULL(x, w, ids), atol=ATOL, rtol=RTOL)


def test_range_no_token_routes_to_is_exactly_zero():
    x, w, ids = _routing(50, 2, experts=5)  # every choice is an expert in [0, 5)
    shard = _bank(5, 3, FULL)
    out = shard(x, w, ids)
    assert out.shape == (50, D) and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros(50, D))
    assert torch.equal(moe_reference(x, w, ids, shard), torch.zeros(50, D))
    d = dispatch(ids, 5, 3)
    assert d.expert_counts == [0, 0, 0] and d.token.numel() == 0


def test_dispatch_groups_pairs_by_expert_in_the_range():
    ids = torch.tensor([[3, 0], [5, 3], [0, 7], [4, 3]])
    d = dispatch(ids, 3, 3)  # experts 3, 4, 5
    assert d.expert_counts == [3, 1, 1]
    pairs = list(zip(d.token.tolist(), d.slot.tolist(), strict=True))
    assert pairs == [(0, 0), (1, 1), (3, 1), (3, 0), (1, 0)]  # expert 3 (stable token order), 4, then 5
    assert all(int(ids[t, s]) - 3 == e for (t, s), e in zip(pairs, [0, 0, 0, 1, 2], strict=True))


def test_weights_scale_each_choice_linearly():
    """Doubling one slot's weight adds exactly that expert's contribution once more (combine is weighted)."""
    x, w, ids = _routing(10, 2)
    base = FULL(x, w, ids)
    w2 = w.clone()
    w2[:, 1] *= 2
    only_slot1 = FULL(x, torch.stack([torch.zeros(10), w[:, 1]], -1), ids)
    torch.testing.assert_close(FULL(x, w2, ids), base + only_slot1, atol=ATOL, rtol=RTOL)


def test_bf16_bank_stays_close_to_fp32_loop():
    x, w, ids = _routing(33, 2)
    bank16 = _bank(0, E, FULL).to(torch.bfloat16)
    got = bank16(x.to(torch.bfloat16), w, ids)
    assert got.dtype == torch.bfloat16
    want = moe_reference(x, w, ids, FULL)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_router_weights_are_renormalised_top_k_times_per_expert_scale():
    router = Router(D, E, 3, 1e-6)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(4)))
        router.per_expert_scale.copy_(torch.linspace(0.5, 2.0, E))
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(5))
    w, ids = router(x)
    assert w.dtype == torch.float32 and ids.shape == (20, 3)
    assert all(len(set(r)) == 3 for r in ids.tolist())
    torch.testing.assert_close((w / router.per_expert_scale[ids]).sum(-1), torch.ones(20))
    # the chosen experts are the most probable ones
    h = router.norm(x) * router.scale * router.scalar_root
    top = torch.topk(h @ router.proj.weight.T, 3, dim=-1).indices
    assert torch.equal(ids, top)


@pytest.mark.parametrize("threads", [1, 16])
def test_a_tokens_output_does_not_depend_on_its_batch_mates(torch_threads, threads):
    """Bit-identical, not just close: a token alone, or routed with 1..300 others to the same experts. With 16
    threads a CPU GEMM splits its rows between threads in blocks of 8, so an expert group of 9-11 rows used to
    end in a block of 1-3 rows computed another way: groups are padded to multiples of 8."""
    torch_threads(threads)
    x, w, ids = _routing(300, 2, seed=9)
    together = FULL(x, w, ids)
    for t in (0, 1, 150, 299):
        assert torch.equal(FULL(x[t : t + 1], w[t : t + 1], ids[t : t + 1])[0], together[t])
    for n in range(1, 80, 3):  # every group size from 1 to ~40 rows turns up
        assert torch.equal(FULL(x[:n], w[:n], ids[:n]), together[:n]), n


@pytest.mark.parametrize("T,k", [(1, 1), (37, 3), (200, E)])
def test_segment_loop_fallback_matches_grouped_gemm(monkeypatch, T, k):
    """Where torch._grouped_mm is unavailable (torch 2.11 CPU, pre-sm90 GPUs) the per-group GEMM fallback runs
    the same layout and gives the same bits."""
    x, w, ids = _routing(T, k, seed=T + 3 * k)
    grouped = FULL(x, w, ids)
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda device, dtype: False)
    fallback = FULL(x, w, ids)
    assert torch.equal(fallback, grouped) or not moe.grouped_mm_supported(x.device, x.dtype)
    torch.testing.assert_close(fallback, moe_reference(x, w, ids, FULL), atol=ATOL, rtol=RTOL)


def test_grouped_layout_pads_groups_and_dumps_foreign_pairs():
    ids = torch.tensor([[3, 0], [5, 3], [0, 7], [4, 3]])  # bank of experts 3, 4, 5
    layout = grouped_layout(ids, 3, 3, min_rows=4)
    assert layout.offsets.tolist() == [4, 8, 12]  # 3, 1 and 1 pairs, each group padded to 4 rows
    dump = layout.source.numel() - 1
    rows = layout.row_of_pair.tolist()
    assert [rows[i] for i in (0, 3, 7)] == [0, 1, 2]  # expert 3's pairs, token order
    assert rows[6] == 4 and rows[2] == 8  # expert 4 (token 3), expert 5 (token 1)
    assert [rows[i] for i in (1, 4, 5)] == [dump] * 3 and not layout.local[[1, 4, 5]].any()
    assert layout.source[:12].tolist() == [0, 1, 3, 4, 3, 4, 4, 4, 1, 4, 4, 4]  # 4 = T: the zero row
    # a group is padded to a multiple of min_rows: 5 pairs of expert 3 take 8 rows
    layout = grouped_layout(torch.tensor([[3], [3], [4], [3], [3], [3]]), 3, 3, min_rows=4)
    assert layout.offsets.tolist() == [8, 12, 12]


@pytest.mark.parametrize("T,k", [(1, 1), (5, 2), (37, 3), (300, 2), (200, E)])
@pytest.mark.parametrize("first,count", [(0, E), (3, 3), (2, 6)])
def test_counting_and_sorting_layouts_are_the_same_integers(monkeypatch, T, k, first, count):
    """Small batches rank pairs by a running count, large ones by a stable sort: the same rows either way."""
    _, _, ids = _routing(T, k, seed=T + k)
    for whole in (False, True) if (first, count) == (0, E) else (False,):
        counted = grouped_layout(ids, first, count, min_rows=8, whole=whole)
        monkeypatch.setattr(moe, "COUNTING_LAYOUT_ELEMENTS", 0)
        sorted_ = grouped_layout(ids, first, count, min_rows=8, whole=whole)
        monkeypatch.undo()
        for name in ("source", "row_of_pair", "offsets"):
            assert torch.equal(getattr(counted, name), getattr(sorted_, name))


@pytest.mark.parametrize("T,k", [(1, 1), (64, 2), (300, 3)])
def test_a_bank_known_to_hold_every_expert_gives_the_same_bits(T, k):
    """`ExpertBank(total=...)` skips masking pairs routed elsewhere when it holds every expert: same output."""
    x, w, ids = _routing(T, k, seed=7 * T + k)
    whole = _bank(0, E)
    whole.whole = True
    assert torch.equal(whole(x, w, ids), FULL(x, w, ids))
    assert ExpertBank(D, INNER, 0, E, total=E).whole and not ExpertBank(D, INNER, 0, 4, total=E).whole


def test_layout_index_constants_are_kept_views_and_growth_keeps_the_old_ones():
    """The layout's 0..P-1, p // K and ones are slices of kept tensors (no kernel per layer to make them); a
    larger request grows the kept tensor and leaves the old one alive, since a captured CUDA graph may read it."""
    cpu = torch.device("cpu")
    assert moe.counting(7, cpu, per=3).tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert moe.counting(4, cpu, ones=True).tolist() == [1, 1, 1, 1]
    small = moe.counting(10, cpu)
    assert moe.counting(12, cpu).data_ptr() == small.data_ptr()  # the same storage, sliced
    kept = moe._COUNTING[(str(cpu), 1, False)]
    size = kept[-1].shape[0]
    big = moe.counting(size + 1, cpu)
    assert big.tolist() == list(range(size + 1)) and big.data_ptr() != small.data_ptr()
    assert small.tolist() == list(range(10)) and len(kept) >= 2 and kept[-2].data_ptr() == small.data_ptr()
