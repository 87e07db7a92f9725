"""The per-iteration token budget: a long prompt cannot starve running streams, prompts share fairly (no model)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.scheduler import share_encoder_tokens


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
