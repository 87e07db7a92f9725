"""Keyed noise (model/sampling/noise.py): the splitmix64 bits, uniformity and independence of the draws.

Shape legend: R rows, L positions, C vocabulary chunk.

Chi-square thresholds are the p = 0.001 quantiles, so a correct generator fails one of these tests about once in
a thousand runs at most; the inputs are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import torch

from model.sampling import noise

CHI2_999 = {15: 37.70, 63: 103.44, 255: 330.52}  # chi-square p = 0.001 critical values by degrees of freedom


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_mix_reproduces_the_published_splitmix64_sequence():
    # splitmix64 seeded with 0: the first outputs are mix(k * golden) for k = 1, 2, 3 (Vigna's reference code)
    words = noise.mix(torch.arange(1, 4, dtype=torch.long) * noise.GOLDEN)
    want = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert words.tolist() == [w - (1 << 64) if w >= 1 << 63 else w for w in want]


def test_logical_shift_of_negative_words():
    x = torch.tensor([-1, -(1 << 63)], dtype=torch.long)
    assert noise._shr(x, 60).tolist() == [15, 8]  # sign bits are not copied in


def _keys(seeds, canvases, steps, stream=noise.STREAM_GUMBEL, L=64):
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return noise.position_keys(noise.row_keys(t(seeds), t(canvases), t(steps), stream), L)


def test_uniform_is_uniform_and_open():
    keys = _keys(list(range(16)), [0] * 16, [3] * 16)
    u = noise.uniform(noise.mix(keys[..., None] + torch.arange(1, 257) * noise.GOLDEN))  # [16, 64, 256]
    assert u.min() > 0 and u.max() < 1
    counts = torch.histc(u, bins=256, min=0, max=1)
    assert _chi2(counts) < CHI2_999[255]
    torch.testing.assert_close(u.mean().item(), 0.5, atol=2e-3, rtol=0)


def test_randint_is_uniform_over_a_range_that_is_not_a_power_of_two():
    keys = _keys(list(range(100)), list(range(100)), [0] * 100, noise.STREAM_RENOISE, L=640)
    draws = noise.randint(keys, 64 + 3)
    assert draws.min() >= 0 and draws.max() < 67
    assert _chi2(torch.bincount(draws.flatten(), minlength=67)[:64]) < CHI2_999[63]


def test_draws_are_independent_across_each_coordinate():
    """Pairs of draws that differ in one coordinate (seed, canvas, step, stream, position, vocab index): the
    joint histogram of their top 4 bits is uniform over 16 x 16 cells (no correlation between neighbours)."""
    n = 20_000
    base = torch.arange(n, dtype=torch.long)
    zeros = torch.zeros(n, dtype=torch.long)

    def top4(keys):
        return noise._shr(noise.mix(keys), 60)

    def key(seed, canvas, step, stream=noise.STREAM_GUMBEL):
        return noise.row_keys(seed, canvas, step, stream)

    variants = {
        "seed": (key(base, zeros, zeros), key(base + 1, zeros, zeros)),
        "canvas": (key(zeros, base, zeros), key(zeros, base + 1, zeros)),
        "step": (key(zeros + 7, zeros, base), key(zeros + 7, zeros, base + 1)),
        "stream": (
            key(base, zeros, zeros, noise.STREAM_CANVAS),
            key(base, zeros, zeros, noise.STREAM_RENOISE),
        ),
        "position": (noise.combine(base, zeros), noise.combine(base, zeros + 1)),
    }
    for name, (a, b) in variants.items():
        joint = top4(a) * 16 + top4(b)
        assert _chi2(torch.bincount(joint, minlength=256)) < CHI2_999[255], name
        assert (a != b).all(), name
    # neighbouring vocabulary indices of one position
    g = noise.gumbel(_keys([5], [0], [0], L=n // 100), 0, 101)[0]  # [L, 101]
    u = torch.exp(-torch.exp(-g))  # back to the uniforms
    joint = (u[:, :-1] * 16).long() * 16 + (u[:, 1:] * 16).long()
    assert _chi2(torch.bincount(joint.flatten(), minlength=256)) < CHI2_999[255]


def test_gumbel_chunks_are_slices_of_one_sequence():
    keys = _keys([1, 2], [0, 3], [4, 5], L=8)
    whole = noise.gumbel(keys, 0, 100)
    parts = torch.cat([noise.gumbel(keys, a, min(100, a + 7)) for a in range(0, 100, 7)], dim=-1)
    assert torch.equal(whole, parts)
    # one row's noise is the same whatever rows it is computed with
    assert torch.equal(noise.gumbel(keys[1:], 0, 100)[0], whole[1])


def test_gumbel_moments():
    g = noise.gumbel(_keys(list(range(8)), [0] * 8, [0] * 8, L=128), 0, 512)  # 524,288 draws
    euler_gamma = 0.5772156649
    torch.testing.assert_close(g.mean().item(), euler_gamma, atol=5e-3, rtol=0)
    torch.testing.assert_close(g.var().item(), torch.pi**2 / 6, atol=2e-2, rtol=0)


def test_the_top_word_stays_below_one_and_its_gumbel_noise_is_finite():
    top = torch.tensor([-1], dtype=torch.long)  # all 64 bits set: the largest 24-bit word
    assert noise.uniform(top).item() < 1.0
    # 2^25 draws hold the top 24-bit word about twice: none of them may give +inf noise
    keys = torch.arange(1 << 16, dtype=torch.long) * 7919
    g = noise.gumbel(keys, 0, 512)  # [65536, 512]: ~2 draws of the top word expected
    assert torch.isfinite(g).all()


def test_words_are_the_splitmix64_sequence_gumbel_reads():
    keys = _keys([3, 4], [0, 1], [2, 2], L=5)
    w = noise.words(keys, 2, 9)  # [2, 5, 7]
    third = torch.tensor(3, dtype=torch.long) * noise.GOLDEN  # int64 product, wrapping as the hash does
    assert torch.equal(w[..., 0], noise.mix(keys + third))  # element 2 is the 3rd output
    # the float32 per-token Gumbel noise is the same sequence's top 24 bits
    u = noise.uniform(w)
    torch.testing.assert_close(noise.gumbel(keys, 2, 9), -torch.log(-torch.log(u)), atol=0, rtol=0)


def test_uniform64_is_uniform_open_and_finer_than_float32():
    w = noise.words(_keys(list(range(16)), [0] * 16, [1] * 16, noise.STREAM_INVCDF), 0, 256)  # [16, 64, 256]
    u = noise.uniform64(w)
    assert u.dtype == torch.float64 and u.min() > 0 and u.max() < 1
    assert _chi2(torch.histc(u, bins=256, min=0, max=1)) < CHI2_999[255]
    assert (u * 2**24 != torch.floor(u * 2**24) + 0.5).float().mean() > 0.99  # not just 24-bit midpoints
    top = torch.tensor(
        [-1, 0], dtype=torch.long
    )  # the largest and smallest words: still strictly inside (0, 1)
    assert noise.uniform64(top).tolist() == [noise.U64_MAX, 2.0**-54]
    g = noise.gumbel64(top)
    assert torch.isfinite(g).all() and -3.7 < g.min() and g.max() < 37


def test_block_streams_differ_from_each_other_and_from_the_token_stream():
    """The per-(position, block) numbers are keyed by their own streams: not a copy of one another, nor of
    the per-token Gumbel noise at the same index."""
    seeds, zero = torch.arange(200, dtype=torch.long), torch.zeros(200, dtype=torch.long)
    streams = [noise.STREAM_BLOCK, noise.STREAM_INVCDF, noise.STREAM_GUMBEL]
    words = [noise.words(noise.position_keys(noise.row_keys(seeds, zero, zero, s), 8), 0, 4) for s in streams]
    top4 = [noise._shr(w, 60).flatten() for w in words]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (words[i] != words[j]).all()
            assert _chi2(torch.bincount(top4[i] * 16 + top4[j], minlength=256)) < CHI2_999[255]


def test_gumbel64_moments():
    g = noise.gumbel64(noise.words(_keys(list(range(8)), [0] * 8, [0] * 8, noise.STREAM_BLOCK), 0, 512))
    torch.testing.assert_close(g.mean().item(), 0.5772156649, atol=5e-3, rtol=0)
    torch.testing.assert_close(g.var().item(), torch.pi**2 / 6, atol=2e-2, rtol=0)


def test_streams_made_together_have_each_streams_bits():
    """`stream_position_keys` (one pass for several streams, what a serving step uses) gives every stream the
    bits `position_keys(row_keys(...))` gives it alone, for seeds of every sign and size."""
    seeds = torch.tensor([0, 1, -1, (1 << 63) - 1, -(1 << 63), 123456789])
    canvases, steps = torch.tensor([0, 3, 1, 7, 2, 0]), torch.tensor([0, 15, 2, 1, 30, 4])
    streams = (noise.STREAM_BLOCK, noise.STREAM_CANVAS, noise.STREAM_RENOISE, noise.STREAM_GUMBEL)
    together = noise.stream_position_keys(seeds, canvases, steps, streams, 24)  # [R, S, L]
    assert together.shape == (6, 4, 24)
    for i, stream in enumerate(streams):
        assert torch.equal(
            together[:, i], noise.position_keys(noise.row_keys(seeds, canvases, steps, stream), 24)
        )
