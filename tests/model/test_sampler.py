"""The sampler as functions over per-row state: batching does not change a row, chunks do not change the maths.

Shape legend: R rows, L canvas, V vocab, D hidden.

- a batch of rows at different steps, with different seeds, settings, prefixes and constraints gives each row
  exactly what it gets alone (the engine's continuous batching stands on this);
- `draw_fast` (vocabulary in chunks, online softmax, hierarchical keyed sample) agrees with the full-vocabulary
  computation (`draw_reference`, the transformers calls) on argmax, entropy and soft embeddings, whatever the
  chunk size; its samples depend on the chunk size (the fixed `VOCAB_CHUNK`), never on the batch;
- the hierarchical sample (inverse CDF inside a block, Gumbel-max among blocks) follows softmax(logits / t) over
  several blocks, with masked tokens, ragged and massless blocks; rows with a joint constraint keep per-token
  Gumbel noise without changing their batch-mates' draws;
- acceptance, parameter validation and canvas constraints (pins, allowed-token classes) at their edges.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from model.config import from_name
from model.kv_cache import PrefixBatch
from model.sampling import noise
from model.sampling import sampler as sampler_mod
from model.sampling.params import SamplingParams
from model.sampling.sampler import (
    CanvasConstraint,
    RowState,
    accept_mask,
    advance,
    draw_fast,
    draw_reference,
    step,
)
from model.structured.decode import SlotCanvas, SlotRun
from model.transformer import DiffusionGemma, TokenBatch
from model.weights import init_random

CFG = from_name("tiny-test")  # vocab 512, hidden 64, canvas 16
V, L, D = CFG.vocab_size, CFG.canvas_length, CFG.hidden_size


@pytest.fixture(scope="module")
def model() -> DiffusionGemma:
    m = init_random(DiffusionGemma(CFG), seed=0)
    with torch.no_grad():  # larger embeddings: peaked, varied distributions instead of near-uniform ones
        m.embed_tokens.weight.mul_(20)
    return m.eval()


def _clone(row: RowState) -> RowState:
    """An independent copy of a row (keyed noise: the seed and the counters are all the random state)."""
    return dataclasses.replace(
        row,
        canvas=row.canvas.clone(),
        argmax=row.argmax.clone(),
        soft=None if row.soft is None else row.soft.clone(),
    )


def _cache(model, n: int, seed: int):
    cache = model.new_cache()
    prompt = torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    model.encode(TokenBatch.from_lists([prompt], [0], CFG.pad_token_id), [cache])
    return cache


@torch.no_grad()
def _denoise(model, rows: list[RowState], caches) -> torch.Tensor:
    """Decoder hidden [R, L, D] of several rows in one call; rows without self-conditioning yet get zeros,
    which the self-conditioning block maps to exactly what it gives for no signal."""
    soft = None
    if any(r.soft is not None for r in rows):
        soft = torch.stack([r.soft if r.soft is not None else torch.zeros(L, D) for r in rows])
    return model.denoise(torch.stack([r.canvas for r in rows]), PrefixBatch(caches), soft)


def _pins(positions, ids) -> CanvasConstraint:
    pin = torch.full((L,), -1, dtype=torch.long)
    pin[list(positions)] = torch.tensor(ids)
    return CanvasConstraint(pin_ids=pin, class_ids=torch.zeros(L, dtype=torch.long))


# prompt length, seed, params, steps done alone before joining the batch, constraint
ROWS = [
    (3, 10, SamplingParams(max_denoising_steps=12, entropy_bound=0.5), 0, None),
    (
        21,
        11,
        SamplingParams(max_denoising_steps=6, t_min=0.2, t_max=1.0, entropy_bound=2.0, stability_threshold=2),
        3,
        None,
    ),
    (
        9,
        12,
        SamplingParams(
            max_denoising_steps=20, entropy_bound=0.05, confidence_threshold=0.5, stability_threshold=0
        ),
        5,
        None,
    ),
    (14, 13, SamplingParams(max_denoising_steps=9, entropy_bound=1.0), 1, _pins([0, 7, 15], [3, 250, 511])),
    (5, 10, SamplingParams(max_denoising_steps=12, entropy_bound=0.5), 2, None),  # row 0's seed, ahead of it
]


def _start_rows(model):
    rows, caches = [], []
    for n, seed, params, done, constraint in ROWS:
        cache = _cache(model, n, seed)
        row = RowState.start(params, V, L, seed, constraint)
        for _ in range(done):
            step(model, _denoise(model, [row], [cache]), [row])
        assert row.steps == done
        rows.append(row)
        caches.append(cache)
    return rows, caches


def _assert_same_row(a: RowState, b: RowState, where: str):
    assert torch.equal(a.canvas, b.canvas), where
    assert torch.equal(a.argmax, b.argmax), where
    assert (a.steps, a.finished, a.accepted, a.streak) == (b.steps, b.finished, b.accepted, b.streak), where
    # batched matmuls and padded attention move the hidden by ~1e-6; soft embeddings are ~10 in size here
    torch.testing.assert_close(a.soft, b.soft, atol=1e-4, rtol=1e-5, msg=where)


@pytest.mark.parametrize("budget", ["default", "one-row-per-group"])
@torch.no_grad()
def test_batched_steps_give_each_row_what_it_gets_alone(model, monkeypatch, budget):
    if budget != "default":  # draw_fast splits the batch into row groups; make every row its own group
        monkeypatch.setattr(sampler_mod, "ELEMENT_BUDGET", L * sampler_mod.VOCAB_CHUNK)
    rows, caches = _start_rows(model)
    together = [_clone(r) for r in rows]
    alone = [_clone(r) for r in rows]
    finished_seen = 0
    for s in range(8):
        active = [i for i, r in enumerate(together) if not r.finished]
        assert active == [i for i, r in enumerate(alone) if not r.finished]
        if not active:
            break
        batch = [together[i] for i in active]
        step(model, _denoise(model, batch, [caches[i] for i in active]), batch)
        for i in active:
            step(model, _denoise(model, [alone[i]], [caches[i]]), [alone[i]])
            _assert_same_row(together[i], alone[i], f"row {i} after batched step {s}")
        finished_seen = sum(r.finished for r in together)
    assert finished_seen >= 1  # a row left the batch along the way (row 1 stops at its 6th step)
    assert any(r.accepted > 1 for r in together)  # acceptance really varies, not one token per step
    pinned = together[3].constraint.pinned
    assert torch.equal(together[3].canvas[pinned], torch.tensor([3, 250, 511]))


@pytest.mark.parametrize("chunk", [8192, 100])
@torch.no_grad()
def test_sampler_alone_vs_batched_on_identical_hidden(model, monkeypatch, chunk):
    """The sampler by itself: the same hidden rows in one batch or one at a time give identical draws."""
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", chunk)
    monkeypatch.setattr(sampler_mod, "ELEMENT_BUDGET", 2 * L * chunk)  # groups of two rows: 2 + 2 + 1
    rows, caches = _start_rows(model)
    hidden = torch.cat([_denoise(model, [r], [c]) for r, c in zip(rows, caches, strict=True)])
    batch = [_clone(r) for r in rows]
    draws = draw_fast(model, hidden, batch)
    for i, r in enumerate(rows):
        one = draw_fast(model, hidden[i : i + 1], [_clone(r)])
        assert torch.equal(draws.sampled[i], one.sampled[0]) and torch.equal(draws.argmax[i], one.argmax[0])
        torch.testing.assert_close(draws.entropy[i], one.entropy[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(draws.soft[i], one.soft[0], atol=1e-6, rtol=1e-6)


def _full_vocab(model, hidden_row: torch.Tensor, row: RowState):
    ref_row = dataclasses.replace(_clone(row), seed=None)
    return draw_reference(model, hidden_row, [ref_row])


@pytest.mark.parametrize("chunk", [8192, 512, 100, 7])
@torch.no_grad()
def test_draw_fast_matches_full_vocabulary_computation(model, monkeypatch, chunk):
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", chunk)  # read at call time; 512 % 100 and 512 % 7 != 0
    g = torch.Generator().manual_seed(3)
    # from near-uniform to nearly one-hot distributions: noise plus a pull of random strength towards one token
    jitter = torch.randn(3, L, D, generator=g) * torch.exp(
        torch.empty(3, L, 1).uniform_(-3, 0.5, generator=g)
    )
    targets = model.embed_tokens.weight[torch.randint(0, V, (3, L), generator=g)]  # [3, L, D]
    hidden = jitter + torch.empty(3, L, 1).uniform_(0, 1.5, generator=g) * targets
    rows = [
        RowState.start(
            SamplingParams(max_denoising_steps=10, t_min=t, t_max=t + 0.5),
            V,
            L,
            i,
        )
        for i, t in enumerate((0.3, 0.6, 1.0))
    ]
    rows[1].steps = 4
    fast = draw_fast(model, hidden, rows)
    entropies = []
    for i, row in enumerate(rows):
        want = _full_vocab(model, hidden[i : i + 1], row)
        assert torch.equal(fast.argmax[i], want.argmax[0])
        # 2e-5, not 1e-5: see test_fast_entropy_is_as_precise_as_the_full_softmax (a known precision loss)
        torch.testing.assert_close(fast.entropy[i], want.entropy[0], atol=2e-5, rtol=0)
        torch.testing.assert_close(fast.soft[i], want.soft[0], atol=1e-5, rtol=1e-5)
        entropies.append(want.entropy[0])
    spread = torch.cat(entropies)
    assert spread.min() < 0.05 and spread.max() > 5  # both peaked and flat distributions were covered
    assert ((fast.sampled >= 0) & (fast.sampled < V)).all()


@pytest.mark.parametrize("chunk", [8192, 100])
@torch.no_grad()
def test_fast_entropy_is_as_precise_as_the_full_softmax(model, monkeypatch, chunk):
    """Against an fp64 truth, the chunked entropy should be no worse than torch's Categorical in fp32 (~1e-6)."""
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    targets = model.embed_tokens.weight[torch.randint(0, V, (1, L), generator=g)]
    hidden = 0.3 * torch.randn(1, L, D, generator=g) + torch.linspace(0.5, 1.5, L)[None, :, None] * targets
    row = RowState.start(SamplingParams(t_min=0.4, t_max=0.4), V, L, 0)
    fast = draw_fast(model, hidden, [row])
    logits = model.logits(hidden[0]) / 0.4
    truth = torch.distributions.Categorical(logits=logits.double()).entropy()
    categorical = torch.distributions.Categorical(logits=logits).entropy()
    assert (categorical.double() - truth).abs().max() < 2e-6  # what fp32 can do
    torch.testing.assert_close(fast.entropy[0].double(), truth, atol=2e-6, rtol=0)


class _IdentityHead(nn.Module):
    """The three things draw_fast reads from a model, with an identity LM head so `hidden` are the logits.
    Lets a test fix the exact distribution being sampled."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(vocab))
        self.config = SimpleNamespace(final_logit_softcapping=None)

    def embed_scale(self) -> torch.Tensor:
        return torch.tensor(1.0)


@pytest.mark.parametrize("chunk,temperature", [(8192, 1.0), (4, 1.0), (4, 0.5), (1, 2.0)])
@torch.no_grad()
def test_gumbel_max_frequencies_follow_softmax(monkeypatch, chunk, temperature):
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", chunk)
    p = torch.tensor([0.45, 0.2, 0.15, 0.1, 0.06, 0.04])
    head = _IdentityHead(len(p))
    n = 30_000
    hidden = p.log().expand(1, n, len(p)).contiguous()  # n independent draws of the same position
    params = SamplingParams(t_min=temperature, t_max=temperature)
    row = RowState.start(params, len(p), n, 123)
    draws = draw_fast(head, hidden, [row])
    expected = torch.softmax(p.log() / temperature, -1)
    counts = torch.bincount(draws.sampled[0], minlength=len(p)).double()
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 20.5, (chi2, (counts / n).tolist(), expected.tolist())  # df=5, p=0.001
    assert (draws.argmax[0] == 0).all()
    torch.testing.assert_close(draws.soft[0, 0], expected, atol=1e-6, rtol=0)  # identity head: soft == probs
    entropy = -(expected * expected.log()).sum()
    torch.testing.assert_close(draws.entropy[0], entropy.expand(n).float(), atol=1e-5, rtol=0)


# one position's distribution over 11 tokens in blocks of 4 (the last block ragged): (logits, allowed tokens)
_LOGITS = torch.tensor([1.0, 0.2, -0.5, 0.7, 0.0, 1.3, -1.0, 0.4, 0.9, -0.3, 0.6])
HIERARCHY_CASES = {
    "spread": (_LOGITS, None),
    # masked tokens in every block, block 1 left with one allowed token
    "masked": (_LOGITS, [0, 3, 4, 8, 10]),
    # all the mass in block 1: the other blocks' exponentials underflow to 0 (massless blocks must never win)
    "one block": (torch.where((torch.arange(11) // 4) == 1, _LOGITS, -200.0), None),
    # one allowed token per block, and the last block entirely masked
    "one per block": (_LOGITS, [2, 5]),
}


@pytest.mark.parametrize("case", sorted(HIERARCHY_CASES))
@torch.no_grad()
def test_hierarchical_draws_follow_softmax_over_several_blocks(monkeypatch, case):
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", 4)  # blocks [0, 4), [4, 8), [8, 11)
    logits, allowed = HIERARCHY_CASES[case]
    V_ = len(logits)
    head = _IdentityHead(V_)
    n = 40_000
    hidden = logits.expand(1, n, V_).contiguous()  # n independent draws of the same position
    constraint = None
    mask = torch.ones(V_, dtype=torch.bool)
    if allowed is not None:
        mask = torch.zeros(V_, dtype=torch.bool)
        mask[allowed] = True
        masks = torch.stack([torch.ones(V_, dtype=torch.bool), mask])  # class 1: the allowed set
        no_pins = torch.full((n,), -1, dtype=torch.long)
        constraint = CanvasConstraint(no_pins, torch.ones(n, dtype=torch.long), masks)
    row = RowState.start(SamplingParams(t_min=0.8, t_max=0.8), V_, n, 321, constraint)
    draws = draw_fast(head, hidden, [row])
    expected = torch.softmax((logits / 0.8).masked_fill(~mask, float("-inf")).double(), -1)
    counts = torch.bincount(draws.sampled[0], minlength=V_).double()
    assert (counts[expected == 0] == 0).all(), counts  # masked or massless tokens are never drawn
    live = expected > 0
    chi2 = float(((counts[live] - n * expected[live]) ** 2 / (n * expected[live])).sum())
    df = int(live.sum()) - 1
    if df == 0:
        return
    crit = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 9: 27.88, 10: 29.59}[df]  # chi-square p = 0.001
    assert chi2 < crit, (case, chi2, (counts / n).tolist(), expected.tolist())


def test_block_pick_never_lands_on_a_token_without_mass():
    e = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.0]).expand(1, 4, 6).contiguous()  # [1, 4, C]
    u = torch.tensor([[2.0**-54, 0.3, 0.34, noise.U64_MAX]], dtype=torch.float64)  # [1, 4]
    pick, mass = sampler_mod.block_pick(e, u)
    assert pick.tolist() == [[1, 1, 3, 3]]  # the top uniform is clamped to the last token with mass, not 5
    assert mass.tolist() == [[3.0] * 4]


def test_exp_below_the_floor_is_exactly_zero_and_above_it_exact():
    d = torch.tensor([0.0, -1.5, -86.9, -87.0, -95.0, -200.0, float("-inf")]).expand(2, 3, 7).contiguous()
    want = torch.exp(d.clone())
    e = sampler_mod._exp_below_max(d.clone())
    assert torch.equal(e[..., :3], want[..., :3])  # normal results: the same bits as exp
    assert (e[..., 3:] == 0).all()  # under e^-87 of the running max, and masked (-inf): no mass at all


def test_the_floor_is_cut_exactly_at_the_clamped_elements():
    """The clamped elements are zeroed by a threshold on exp's result (one cheap pass): exactly the elements at
    the floor, never the floats just above it (every one of the 4,000 nearest), whatever their position in a
    vectorised pass."""
    above = [torch.tensor(sampler_mod.EXP_FLOOR)]
    for _ in range(4000):
        above.append(torch.nextafter(above[-1], torch.tensor(0.0)))
    d = torch.stack(above)
    d = torch.cat([d, torch.tensor([-87.5, -300.0, float("-inf")]), d[:7]]).view(1, 1, -1)
    e = sampler_mod._exp_below_max(d.clone())
    clamped = d.clamp(min=sampler_mod.EXP_FLOOR)
    assert torch.equal(e, torch.exp(clamped).masked_fill_(clamped == sampler_mod.EXP_FLOOR, 0.0))
    assert (e[0, 0, 1:4001] > 0).all() and e[0, 0, 0] == 0


@torch.no_grad()
def test_joint_rows_keep_per_token_noise_and_batch_mates_draw_as_alone(monkeypatch):
    """A group holding a joint-constrained row (slot minimums, whose hook draws per-token noise); a row without
    a joint constraint in that group draws exactly what it draws alone, and the joint row's sample follows the
    per-token keyed Gumbel-max (STREAM_GUMBEL), the scores its constraint solver ranks."""
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", 5)
    V_, n = 12, 64
    head = _IdentityHead(V_)
    logits = torch.randn(2, n, V_, generator=torch.Generator().manual_seed(2))
    run = SlotRun([(0, n, 0)], n, pad_id=0)  # a slot with minimum 0: the solver keeps the sampled canvas
    joint = CanvasConstraint(
        torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long), joint=SlotCanvas(run, 0)
    )
    params = SamplingParams(t_min=1.0, t_max=1.0)
    rows = [RowState.start(params, V_, n, 5, joint), RowState.start(params, V_, n, 6)]
    both = draw_fast(head, logits, rows)
    alone = draw_fast(head, logits[1:], [rows[1]])
    assert torch.equal(both.sampled[1], alone.sampled[0]) and torch.equal(both.argmax[1], alone.argmax[0])
    keys = noise.position_keys(
        noise.row_keys(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), noise.STREAM_GUMBEL), n
    )
    per_token = (noise.gumbel(keys, 0, V_) + logits[:1]).argmax(-1)  # [1, n]
    assert torch.equal(both.sampled[0], per_token[0])


def test_rows_with_the_same_seed_draw_the_same_and_other_seeds_differ():
    head = _IdentityHead(50)
    hidden = torch.zeros(3, 200, 50)  # uniform: every draw is pure noise
    rows = [RowState.start(SamplingParams(), 50, 200, s) for s in (1, 1, 2)]
    d = draw_fast(head, hidden, rows)
    assert torch.equal(d.sampled[0], d.sampled[1])
    assert (d.sampled[0] != d.sampled[2]).float().mean() > 0.9


# -- acceptance ------------------------------------------------------------------------------------------------


def test_accept_mask_all_zero_entropy_accepts_everything():
    assert accept_mask(torch.zeros(16), 0.1).all()


def test_accept_mask_tiny_bound_accepts_exactly_the_lowest():
    e = torch.tensor([0.9, 0.3, 2.0, 0.31, 1.5])
    assert accept_mask(e, 1e-12).tolist() == [False, True, False, False, False]


def test_accept_mask_single_position_is_always_accepted():
    assert accept_mask(torch.tensor([7.0]), 1e-9).tolist() == [True]


def test_accept_mask_ties():
    # sum of all but the largest accepted: 0 (one), 0.5 (two), 1.0 (three) -> two fit under 0.5, three do not
    got = accept_mask(torch.full((4,), 0.5), 0.5)
    assert int(got.sum()) == 2
    # a tie at the boundary is accepted or not as a block of equal values would be counted, never the larger
    e = torch.tensor([0.25, 0.125, 0.25, 0.875, 0.25])  # binary fractions: the sums are exact
    got = accept_mask(e, 0.375)  # sums before each sorted entry: 0, 0.125, 0.375 (fits), 0.625 (does not)
    assert int(got.sum()) == 3 and bool(got[1]) and not bool(got[3])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=24),  # entropies on a 1/8 grid: sums are exact in fp32
    st.integers(0, 80),
)
def test_accept_mask_is_the_lowest_prefix_that_fits_the_bound(eighths, bound8):
    e = torch.tensor(eighths, dtype=torch.float32) / 8
    bound = bound8 / 8
    got = accept_mask(e, bound)
    # brute force: the k lowest, for the largest k with sum(k lowest) - max(k lowest) <= bound
    ordered = sorted(eighths)
    k = max(j for j in range(1, len(ordered) + 1) if (sum(ordered[:j]) - ordered[j - 1]) / 8 <= bound)
    assert int(got.sum()) == k
    if 0 < k < len(eighths):
        assert e[got].max() <= e[~got].min()


# -- parameter validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("max_denoising_steps", 0),
        ("max_denoising_steps", 1025),
        ("entropy_bound", 0.0),
        ("entropy_bound", -1.0),
        ("entropy_bound", math.nan),
        ("t_min", 0.0),
        ("t_min", math.nan),
        ("t_max", 0.3),  # below the default t_min 0.4
        ("t_max", math.nan),
        ("stability_threshold", -1),
        ("stability_threshold", 65),
        ("stability_threshold", 1.0),
        ("confidence_threshold", 0.0),
        ("confidence_threshold", math.nan),
    ],
)
def test_sampling_params_errors_name_the_field(field, value):
    params = SamplingParams(**{field: value})
    errors = params.errors()
    assert errors, (field, value)
    assert all(field in msg for msg in errors), errors
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_sampling_params_defaults_are_the_references_and_valid():
    p = SamplingParams()
    assert (p.max_denoising_steps, p.entropy_bound, p.t_min, p.t_max) == (48, 0.1, 0.4, 0.8)
    assert (p.stability_threshold, p.confidence_threshold) == (1, 0.005)
    assert p.errors() == [] and p.validate() is p
    several = SamplingParams(max_new_tokens=0, t_min=0.0, confidence_threshold=-1.0).errors()
    assert len(several) == 3  # every problem reported at once


def test_temperature_schedule_is_linear_from_t_max_to_t_min():
    p = SamplingParams(max_denoising_steps=4, t_min=0.2, t_max=1.0)
    assert [round(p.temperature(s), 6) for s in range(4)] == [1.0, 0.8, 0.6, 0.4]


# -- constraints -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [8192, 100])
@torch.no_grad()
def test_pins_hold_in_canvas_and_argmax_with_zero_entropy(model, monkeypatch, chunk):
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", chunk)  # pins in the first, a middle and the last chunk
    positions, ids = [0, 5, 6, 15], [3, 250, 251, 511]
    constraint = _pins(positions, ids)
    params = SamplingParams(max_denoising_steps=6, entropy_bound=0.3)
    row = RowState.start(params, V, L, 4, constraint)
    cache = _cache(model, 11, 4)
    pins = torch.tensor(ids)
    assert torch.equal(row.canvas[positions], pins)
    while not row.finished:
        hidden = _denoise(model, [row], [cache])
        draws = draw_fast(model, hidden, [row])
        assert torch.equal(draws.argmax[0, positions], pins)
        assert torch.equal(draws.sampled[0, positions], pins)
        assert (draws.entropy[0, positions] == 0).all()
        assert (draws.entropy[0, ~constraint.pinned] > 0).all()
        advance([row], draws, V)
        assert torch.equal(row.canvas[positions], pins) and torch.equal(row.argmax[positions], pins)
    assert row.steps == 6 or row.finished


@pytest.mark.parametrize("chunk", [8192, 100])
@torch.no_grad()
def test_class_mask_keeps_samples_and_argmax_in_the_allowed_set(model, monkeypatch, chunk):
    monkeypatch.setattr(sampler_mod, "VOCAB_CHUNK", chunk)
    allowed = torch.tensor([7, 99, 100, 101, 230, 388, 389, 402, 500])  # spread over several chunks
    masks = torch.zeros(2, V, dtype=torch.bool)
    masks[1, allowed] = True
    class_ids = torch.zeros(L, dtype=torch.long)
    class_ids[2:10] = 1
    constraint = CanvasConstraint(torch.full((L,), -1, dtype=torch.long), class_ids, masks)
    params = SamplingParams(max_denoising_steps=5, entropy_bound=1.0, t_min=1.0, t_max=2.0)
    row = RowState.start(params, V, L, 5, constraint)
    free = RowState.start(params, V, L, 5)
    cache = _cache(model, 6, 5)
    in_set = lambda t: torch.isin(t, allowed).all()  # noqa: E731
    while not row.finished:
        hidden = _denoise(model, [row], [cache])
        free.steps = row.steps  # same temperature
        both = draw_fast(model, hidden.expand(2, L, D), [row, free])
        draws = draw_fast(model, hidden, [row])
        assert in_set(draws.argmax[0, 2:10]) and in_set(draws.sampled[0, 2:10])
        assert torch.equal(
            both.argmax[0], draws.argmax[0]
        )  # a batch-mate without constraints changes nothing
        # the other positions are untouched by the mask
        torch.testing.assert_close(draws.entropy[0, 10:], both.entropy[1, 10:], atol=1e-6, rtol=0)
        assert torch.equal(draws.argmax[0, 10:], both.argmax[1, 10:])
        # constrained entropy is the entropy of the distribution renormalised over the allowed set
        logits = model.logits(hidden[0, 2:10]) / params.temperature(row.steps)
        masked = logits.masked_fill(~masks[1], float("-inf"))
        want = torch.distributions.Categorical(logits=masked).entropy()
        torch.testing.assert_close(draws.entropy[0, 2:10], want, atol=1e-5, rtol=0)
        assert (draws.entropy[0, 2:10] < math.log(len(allowed)) + 1e-5).all()
        advance([row], draws, V)
        assert in_set(row.argmax[2:10])


@torch.no_grad()
def test_fast_sampler_statistics_match_the_reference_sampler(model):
    """The serving sampler (keyed Gumbel-max over vocabulary chunks) and the reference sampler (transformers'
    multinomial over full probabilities) draw from the same distribution: both fit the exact softmax, and
    each other (two-sample chi-square), over 20,000 draws of one position's distribution."""
    n = 20_000
    target = (model.embed_tokens.weight[7] + model.embed_tokens.weight[9]) * 0.25
    hidden = target.expand(1, n, D).contiguous()
    params = SamplingParams(t_min=0.7, t_max=0.7)
    probs = torch.softmax(model.logits(hidden[0, :1])[0] / 0.7, -1).double()  # [V]
    assert 0.05 < probs.max() < 0.9  # neither flat nor one-hot: the test can tell distributions apart
    fast = draw_fast(model, hidden, [RowState.start(params, V, n, 17)]).sampled[0]
    torch.manual_seed(17)
    ref = draw_reference(model, hidden, [RowState.start(params, V, n, None)]).sampled[0]
    big = probs * n >= 5  # pool the rare tokens into one cell, as the chi-square test needs

    def cells(t: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(t, minlength=V)
        return torch.cat([counts[big], counts[~big].sum()[None]])

    expected = torch.cat([probs[big], probs[~big].sum()[None]]) * n
    df = int(big.sum())
    crit = df + 3.1 * math.sqrt(2 * df) + 10  # above the p = 0.001 quantile for these df (Wilson-Hilferty)
    for name, sample in (("fast", fast), ("reference", ref)):
        chi2 = float(((cells(sample).double() - expected) ** 2 / expected).sum())
        assert chi2 < crit, (name, chi2, crit)
    a, b = cells(fast).double(), cells(ref).double()
    two_sample = float(((a - b) ** 2 / (a + b).clamp_min(1)).sum())
    assert two_sample < crit, (two_sample, crit)


def test_constraint_tables_broadcast_mask_equals_the_full_mask():
    """Rows that pin nothing and have one class each get a [R, 1, C] mask: the same tokens as the [R, L, C]
    gather; one pinned position anywhere in the group falls back to the full mask."""
    from model.sampling.sampler import ConstraintTables

    table = torch.rand(4, 50) < 0.5
    table[0] = True
    classes = torch.tensor([[2] * 6, [3] * 6, [0] * 6])
    pins = torch.full((3, 6), -1)
    full = table[:, 10:30][classes]  # [R, L, C]
    tables = ConstraintTables(pins, classes, table)
    mask = tables.allowed(10, 30)
    assert mask.shape == (3, 1, 20)
    assert torch.equal(mask.expand(3, 6, 20), full)
    pins[1, 4] = 17
    pinned = ConstraintTables(pins, classes, table).allowed(10, 30)
    assert pinned.shape == (3, 6, 20)
    assert pinned[1, 4].nonzero()[:, 0].tolist() == [7] and torch.equal(pinned[0], full[0])


@pytest.mark.parametrize("excluded", [0.02, 0.6], ids=["few-excluded-columns", "many-excluded"])
def test_constraint_tables_mask_in_place_equals_the_masked_fill(excluded):
    """`mask_` writes -inf exactly where `allowed` says no, whether it takes the column writes (few excluded
    tokens per row) or the full masked fill (many), with one class per row and with a pinned position."""
    from model.sampling.sampler import SPARSE_MASK_SHARE, ConstraintTables

    g = torch.Generator().manual_seed(3)
    table = torch.rand(4, 400, generator=g) >= excluded
    table[0] = True
    classes = torch.tensor([[2] * 6, [3] * 6, [0] * 6])
    few = int((~table[classes[:, 0], 100:300]).sum()) * SPARSE_MASK_SHARE <= 3 * 200
    assert few == (excluded < 0.1)  # the case names the branch it takes
    for pin in (False, True):
        pins = torch.full((3, 6), -1)
        if pin:
            pins[1, 4] = 117
        tables = ConstraintTables(pins, classes, table)
        logits = torch.randn(3, 6, 200, generator=g)
        want = logits.masked_fill(~tables.allowed(100, 300), float("-inf"))
        tables.mask_(logits, 100, 300)
        assert torch.equal(logits, want)
