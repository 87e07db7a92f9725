"""The Scheduler's bookkeeping with no model: plans checked, results fabricated by hand.

tests/deployments/test_engine_core.py runs the same Scheduler with the real ModelRunner against the plain loop.
"""

from __future__ import annotations

import pytest

from deployments.scheduler import (
    CanvasEvent,
    DraftEvent,
    EngineRequest,
    ErrorEvent,
    FinalEvent,
    QueueFull,
    RequestTooLarge,
    Scheduler,
    SchedulerLimits,
    StepPlan,
    StepResult,
)
from model.config import from_name
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint

CFG = from_name("tiny-test")  # canvas 16, EOS id 1
L = CFG.canvas_length
EOS = CFG.eos_token_ids[0]


def canvas(*head: int, fill: int = 7) -> list[int]:
    return list(head) + [fill] * (L - len(head))


def step(sched: Scheduler, ends: dict[str, list[int]] | None = None) -> tuple[StepPlan, int]:
    """One iteration with a fabricated runner: the rows of the requests in `ends` finish with those canvases,
    every other row keeps denoising; drafts are the row's slot number repeated."""
    plan = sched.schedule()
    ends = {sched.active[rid].slot: c for rid, c in (ends or {}).items() if rid in sched.active}
    result = StepResult(
        finished=[s in ends for s in plan.denoise],
        accepted=[3] * len(plan.denoise),
        drafts={s: [s] * L for s in plan.drafts},
        committed={s: ends[s] for s in plan.denoise if s in ends},
    )
    return plan, sched.update(plan, result)


def req(rid: str, prompt: int = 3, **params) -> EngineRequest:
    return EngineRequest(rid, list(range(3, 3 + prompt)), SamplingParams(**params), seed=1)


def collect(sched: Scheduler, *requests: EngineRequest) -> dict[str, list]:
    events = {r.request_id: [] for r in requests}
    for r in requests:
        sched.submit(r, events[r.request_id].append)
    return events


def test_admission_waits_for_kv_budget_and_frees_it_at_the_end():
    probe = Scheduler(CFG, SchedulerLimits())
    need = probe.kv_bytes_needed(req("p", max_new_tokens=32))
    assert need == (3 + 2 * L) * CFG.kv_bytes_per_token(4) + CFG.sliding_kv_bytes(4)
    sched = Scheduler(CFG, SchedulerLimits(max_rows=8, kv_cache_bytes=int(need * 2.5)))
    events = collect(sched, *(req(f"r{i}", max_new_tokens=32) for i in range(4)))
    plan, _ = step(sched)
    assert [a.slot for a in plan.admit] == [0, 1]  # memory, not rows, is the limit
    assert all(a.kv_tokens == 3 + 2 * L for a in plan.admit)
    assert [e.slot for e in plan.encode] == [0, 1] and plan.denoise == [0, 1]  # prefill, then the first step
    assert len(sched.waiting) == 2 and sched.reserved == 2 * need
    plan, finished = step(sched, {"r0": canvas(9, EOS)})  # r0 ends at EOS: its slot and memory come back
    assert finished == 1 and isinstance(events["r0"][-1], FinalEvent) and sched.reserved == need
    assert not plan.admit  # the slot is released by the next plan
    plan, _ = step(sched)
    assert plan.release == [0] and [a.slot for a in plan.admit] == [0]  # the freed slot goes to r2
    assert sched.active["r2"].slot == 0 and len(sched.waiting) == 1


def test_an_idle_engine_admits_a_request_larger_than_what_is_left():
    sched = Scheduler(
        CFG, SchedulerLimits(kv_cache_bytes=Scheduler(CFG, SchedulerLimits()).kv_bytes_needed(req("x")))
    )
    collect(sched, req("a"), req("b"))
    plan, _ = step(sched)
    assert [a.slot for a in plan.admit] == [0] and len(sched.waiting) == 1


def test_queue_bound_oversized_and_duplicate_requests():
    sched = Scheduler(CFG, SchedulerLimits(max_rows=1, max_queue=1, kv_cache_bytes=1 << 20))
    sched.submit(req("a"), lambda e: None)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(req("b"), lambda e: None)
    with pytest.raises(RequestTooLarge, match="KV cache"):
        sched.submit(req("c", prompt=100, max_new_tokens=100_000), lambda e: None)
    with pytest.raises(ValueError, match="already in flight"):
        sched.submit(req("a"), lambda e: None)
    step(sched)  # "a" admitted: the queue has room again, and a running id is still a duplicate
    sched.submit(req("b"), lambda e: None)
    with pytest.raises(ValueError, match="already in flight"):
        sched.submit(req("a"), lambda e: None)


def test_cancelling_a_waiting_and_an_active_request():
    sched = Scheduler(CFG, SchedulerLimits(max_rows=1))
    events = collect(sched, req("run"), req("wait"))
    step(sched)
    assert sched.active["run"].slot == 0 and len(sched.waiting) == 1
    sched.cancel("wait")
    plan, _ = step(sched)
    assert not sched.waiting and plan.denoise == [0]  # the waiting one is gone, the running one runs on
    sched.cancel("run")
    plan, _ = step(sched)
    assert plan.release == [0] and not plan.denoise and not sched.has_work and sched.reserved == 0
    assert events == {"run": [], "wait": []}  # the Engine tells the caller; the scheduler only frees


def test_max_new_tokens_trims_the_last_canvas_and_commits_are_encoded_whole():
    sched = Scheduler(CFG, SchedulerLimits())
    events = collect(sched, req("a", max_new_tokens=L + 5))
    step(sched)
    plan, _ = step(sched, {"a": canvas(4, 5)})
    assert events["a"][-1] == CanvasEvent(0, canvas(4, 5), 2, False, events["a"][-1].started_s)
    plan, _ = step(sched)
    assert [e.tokens for e in plan.encode] == [canvas(4, 5)]  # the commit, whole
    assert plan.start and plan.start[0].canvas_index == 1 and plan.denoise == [0]
    assert not plan.self_conditioning  # a fresh canvas has no previous step
    plan, _ = step(sched, {"a": canvas(6, 8, 8, 8, 8, 8, EOS)})  # EOS past the limit: "length", trimmed to 5
    assert plan.self_conditioning
    canvases = [e for e in events["a"] if isinstance(e, CanvasEvent)]
    assert canvases[-1].token_ids == [6, 8, 8, 8, 8] and canvases[-1].last and canvases[-1].steps == 2
    final = events["a"][-1]
    assert final.finish_reason == "length" and final.completion_tokens == L + 5
    assert final.steps_per_canvas == [2, 2]


def test_eos_ends_plain_generation_but_not_a_template():
    sched = Scheduler(CFG, SchedulerLimits())
    free = CanvasConstraint.__new__(CanvasConstraint)  # the scheduler only counts and forwards constraints
    tpl = EngineRequest("t", [3], SamplingParams(), seed=2, constraints=[free, free])
    events = collect(sched, req("p", max_new_tokens=100), tpl)
    step(sched)
    step(sched, {"p": canvas(5, EOS, 6), "t": canvas(EOS, 9)})
    assert events["p"][-1].finish_reason == "eos" and events["p"][-2].token_ids == [5]
    assert not any(isinstance(e, FinalEvent) for e in events["t"])  # EOS does not stop a template
    plan, _ = step(sched)
    assert plan.start[0].constraint is free and plan.start[0].canvas_index == 1
    step(sched, {"t": canvas(8)})
    assert events["t"][-1].finish_reason == "template"
    assert [e.token_ids for e in events["t"] if isinstance(e, CanvasEvent)] == [canvas(EOS, 9), canvas(8)]


def test_drafts_only_for_rows_that_ask():
    sched = Scheduler(CFG, SchedulerLimits())
    a = EngineRequest("a", [3], SamplingParams(max_new_tokens=L), seed=1, stream_drafts=True)
    events = collect(sched, a, req("b", max_new_tokens=L))
    plan, _ = step(sched)
    plan, _ = step(sched)
    assert plan.drafts == [0] and plan.denoise == [0, 1]
    drafts = [e for e in events["a"] if isinstance(e, DraftEvent)]
    assert [(d.step, d.accepted, d.token_ids) for d in drafts] == [(1, 3, [0] * L), (2, 3, [0] * L)]
    assert not events["b"]


def test_the_token_budget_splits_prefill_while_a_stream_keeps_denoising():
    sched = Scheduler(CFG, SchedulerLimits(prefill_chunk=8, token_budget=24))
    collect(sched, req("a"))
    step(sched)
    collect(sched, req("b", prompt=60))
    pieces = []
    while True:
        plan, _ = step(sched)
        assert 0 in plan.denoise  # "a" is stepped in every iteration of the long prefill
        pieces += [len(e.tokens) for e in plan.encode if e.slot == 1]
        if 1 in plan.denoise:
            break
    # budget 24 - one running canvas of 16 = 8, raised to half the budget (12), capped by the chunk (8)
    assert pieces == [8] * 7 + [4]


def test_prompt_prefill_keeps_to_its_time_share_while_a_stream_denoises():
    sched = Scheduler(CFG, SchedulerLimits(prefill_chunk=8, prefill_time_share=0.5))
    collect(sched, req("a", max_new_tokens=1000))
    plan, _ = step(sched)
    sched.record_iteration(plan, 0.125)  # "a" alone: its prefill and first step
    for _ in range(3):
        plan, _ = step(sched)
        sched.record_iteration(plan, 0.125)  # denoise-only iterations (times exact in binary)
    collect(sched, req("b", prompt=200))
    timeline = []
    for _ in range(40):
        plan, _ = step(sched)
        assert 0 in plan.denoise  # "a" steps in every iteration
        pieces = [len(e.tokens) for e in plan.encode if e.slot == 1]
        assert pieces in ([], [8])  # a held prompt waits; its pieces never change size
        timeline.append(bool(pieces))
        # a piece deep into a long prompt costs 0.5 s more than the 0.125 s step
        sched.record_iteration(plan, 0.625 if pieces else 0.125)
    # each 0.5 s of prefill is paid back by 0.5 s of denoise-only iterations: 4 of them after each piece
    assert timeline[:11] == [True] + [False] * 4 + [True] + [False] * 4 + [True]
    prefill_s = 0.5 * sum(timeline)
    # prefill's extra time equals the denoise-only time (share 0.5); the pieces' own iterations step "a" too
    assert 0.4 <= prefill_s / (prefill_s + 0.125 * len(timeline)) <= 0.5


def test_prompts_are_never_held_when_no_stream_is_waiting_or_the_rule_is_off():
    for share, running in ((0.5, False), (1.0, True)):
        sched = Scheduler(CFG, SchedulerLimits(prefill_chunk=8, prefill_time_share=share))
        if running:
            collect(sched, req("a", max_new_tokens=1000))
            plan, _ = step(sched)
        collect(sched, req("b", prompt=64))
        slot = 1 if running else 0
        while sched.active.get("b") is None or sched.active["b"].pending_encode:
            plan, _ = step(sched)
            assert [len(e.tokens) for e in plan.encode if e.slot == slot] == [8]  # a piece every iteration
            sched.record_iteration(plan, 5.0)


def test_fail_all_tells_everyone_and_resets_slots():
    sched = Scheduler(CFG, SchedulerLimits(max_rows=1))
    events = collect(sched, req("a"), req("b"))
    step(sched)
    sched.fail_all("boom", code="UNAVAILABLE")
    assert all(ev == [ErrorEvent("boom", "UNAVAILABLE")] for ev in events.values())
    assert not sched.has_work and sched.reserved == 0
    collect(sched, req("c"))
    plan, _ = step(sched)
    assert [a.slot for a in plan.admit] == [0] and not plan.release


def test_a_model_supplied_reservation_replaces_the_cache_formula():
    sched = Scheduler(CFG, SchedulerLimits(kv_cache_bytes=1000), kv_reservation=lambda tokens: 10 * tokens)
    assert sched.kv_bytes_needed(req("a", prompt=4, max_new_tokens=L)) == 10 * (4 + L)
    with pytest.raises(RequestTooLarge):
        sched.submit(req("b", prompt=4, max_new_tokens=100 * L), lambda e: None)
