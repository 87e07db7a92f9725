"""The per-iteration token budget: a long prompt cannot starve running streams, prompts share fairly (no model)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.scheduler import (
    MIN_PROMPT_PIECE,
    EngineRequest,
    Scheduler,
    SchedulerLimits,
    prompt_piece,
    share_encoder_tokens,
)
from model.config import from_name
from model.sampling.params import SamplingParams


def test_commits_come_first_and_are_never_split():
    # a commit of 256 tokens, two prompts; budget 300: the commit runs whole, prompts share the other 44
    assert share_encoder_tokens([1000, 256, 5000], [False, True, False], 300, 512) == [22, 256, 22]
    # a commit that does not fit waits (prompts take the budget) unless nothing else can run
    assert share_encoder_tokens([256, 40], [True, False], 100, 512) == [0, 40]
    assert share_encoder_tokens([256], [True], 100, 512) == [256]


def test_a_long_prompt_does_not_take_a_short_ones_share():
    got = share_encoder_tokens([100_000, 30, 100_000], [False] * 3, 1000, 512)
    assert got[1] == 30  # the short prompt is prefilled at once
    assert got[0] + got[2] == 970 and abs(got[0] - got[2]) <= 1  # the long ones split the rest evenly


def test_chunk_caps_a_prompt_and_something_always_runs():
    assert share_encoder_tokens([5000, 5000], [False, False], 10_000, 512) == [512, 512]
    assert share_encoder_tokens([5000], [False], 0, 512) == [512]  # no budget left: one piece still runs


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.booleans()), min_size=1, max_size=12),
    st.integers(0, 20_000),
    st.integers(1, 1024),
)
def test_grants_respect_needs_caps_and_budget(work, budget, chunk):
    needs, whole = [n for n, _ in work], [w for _, w in work]
    grant = share_encoder_tokens(needs, whole, budget, chunk)
    assert any(grant)
    for n, w, g in zip(needs, whole, grant, strict=True):
        assert g in (0, n) if w else 0 <= g <= min(n, chunk)
    if sum(grant) > budget:  # only the progress rule may exceed the budget, with exactly one piece
        assert sum(1 for g in grant if g) == 1
    # fairness: a prompt granted less than its cap got at least as much as every other prompt
    prompts = [i for i, w in enumerate(whole) if not w]
    for i in prompts:
        if grant[i] < min(needs[i], chunk) and sum(grant) <= budget:
            assert all(grant[j] <= grant[i] + 1 for j in prompts)


def test_prompt_pieces_shrink_with_the_context_they_read():
    """A piece of n tokens after c cached ones reads ~n * (c + n) query-key pairs: pieces keep that within the
    work limit, full-size early in a prompt, shrinking deep into a long one, never below the minimum."""
    work = 512 * 4096
    assert prompt_piece(0, 512, work) == prompt_piece(3000, 512, work) == 512
    sizes = [prompt_piece(c, 512, work) for c in range(0, 300_000, 997)]
    assert sizes == sorted(sizes, reverse=True)
    for c, n in zip(range(0, 300_000, 997), sizes, strict=True):
        assert n * (c + n) <= work and (n + 1) * (c + n + 1) > work or n in (512, MIN_PROMPT_PIECE)
    assert prompt_piece(30_000, 512, work) == 69 and prompt_piece(100_000, 512, work) == 20
    assert prompt_piece(10**7, 512, work) == MIN_PROMPT_PIECE and prompt_piece(10**7, 8, work) == 8
    assert prompt_piece(10**7, 512, 0) == 512  # the rule off


def _long_prompt_pieces(others: bool) -> list[int]:
    sched = Scheduler(
        from_name("tiny-test"),
        SchedulerLimits(prefill_chunk=64, prefill_piece_work=64 * 256, prefill_time_share=1.0),
    )
    if others:  # a running stream and another prompt beside the long one
        sched.submit(EngineRequest("a", [3] * 5, SamplingParams(max_new_tokens=1000), 1), lambda e: None)
        sched.schedule()
    sched.submit(EngineRequest("long", [3] * 1000, SamplingParams(max_new_tokens=1), 1), lambda e: None)
    if others:
        sched.submit(EngineRequest("b", [4] * 300, SamplingParams(max_new_tokens=1), 1), lambda e: None)
    pieces = []
    while sched.active.get("long") is None or sched.active["long"].pending_encode:
        plan = sched.schedule()
        slot = sched.active["long"].slot
        pieces += [len(e.tokens) for e in plan.encode if e.slot == slot]
    return pieces


def test_a_long_prompts_pieces_depend_only_on_its_own_progress():
    alone = _long_prompt_pieces(others=False)
    assert sum(alone) == 1000 and alone[:4] == [64] * 4 and alone[4] == 53  # 64 * (256 + 64) > 64 * 256
    assert alone == sorted(alone, reverse=True) and alone[-2] < 64
    assert _long_prompt_pieces(others=True) == alone
