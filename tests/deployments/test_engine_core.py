"""The batched engine core (Scheduler + ModelRunner) against the plain single-request loop (model.sampling.generate)."""

from __future__ import annotations

import pytest
import torch

from deployments.engine_core import EngineCore
from deployments.scheduler import (
    CanvasEvent,
    DraftEvent,
    EngineRequest,
    FinalEvent,
    SchedulerLimits,
)
from model.config import from_name
from model.sampling.generate import generate
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint
from model.transformer import DiffusionGemma
from model.weights import init_random


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return init_random(DiffusionGemma(from_name("tiny-test")), seed=5).eval()


def run(scheduler: EngineCore, requests: list[EngineRequest]) -> dict[str, list]:
    events = {r.request_id: [] for r in requests}
    for r in requests:
        scheduler.submit(r, events[r.request_id].append)
    for _ in range(10_000):
        if not scheduler.has_work:
            break
        scheduler.iterate()
    assert not scheduler.has_work
    return events


def tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, CanvasEvent) for t in e.token_ids]


REQUESTS = [  # (prompt length, max_new_tokens, steps, confidence threshold)
    (4, 20, 5, 0.005),
    (21, 40, 7, 10.0),  # confident at once: canvases stop early at different steps
    (9, 16, 3, 0.005),
    (2, 50, 6, 10.0),
    (13, 5, 4, 0.005),
]


@pytest.mark.parametrize("max_rows", [1, 2, 5])
def test_batched_requests_match_the_plain_loop(model, max_rows):
    reqs = [
        EngineRequest(
            f"r{i}",
            list(range(3, 3 + n)),
            SamplingParams(max_new_tokens=mn, max_denoising_steps=st, confidence_threshold=ct),
            seed=100 + i,
        )
        for i, (n, mn, st, ct) in enumerate(REQUESTS)
    ]
    sched = EngineCore(model, SchedulerLimits(max_rows=max_rows))
    events = run(sched, reqs)
    for r in reqs:
        ref = generate(model, r.prompt_ids, r.params, seed=r.seed)
        final = events[r.request_id][-1]
        assert isinstance(final, FinalEvent)
        assert tokens(events[r.request_id]) == ref.token_ids
        assert final.steps_per_canvas == ref.steps_per_canvas
        assert final.finish_reason == ref.finish_reason
        assert final.completion_tokens == len(ref.token_ids)
    assert sched.max_rows_seen == min(max_rows, len(reqs))
    assert sched.reserved == 0 and not sched.active


def test_chunked_prefill_gives_the_same_tokens(model):
    p = SamplingParams(max_new_tokens=20, max_denoising_steps=4)
    reqs = [EngineRequest(f"c{i}", list(range(3, 3 + n)), p, seed=i) for i, n in enumerate((37, 5, 21))]
    sched = EngineCore(model, SchedulerLimits(prefill_chunk=3))  # 37 prompt tokens take several iterations
    events = run(sched, reqs)
    for r in reqs:
        assert tokens(events[r.request_id]) == generate(model, r.prompt_ids, p, seed=r.seed).token_ids


def test_drafts_only_for_rows_that_ask(model):
    p = SamplingParams(max_new_tokens=16, max_denoising_steps=3)
    a = EngineRequest("a", [5, 6], p, seed=1, stream_drafts=True)
    b = EngineRequest("b", [5, 6], p, seed=1, stream_drafts=False)
    events = run(EngineCore(model, SchedulerLimits()), [a, b])
    drafts = [e for e in events["a"] if isinstance(e, DraftEvent)]
    assert [d.step for d in drafts] == [1, 2, 3]
    assert not any(isinstance(e, DraftEvent) for e in events["b"])
    assert drafts[-1].token_ids == [t for e in events["a"] if isinstance(e, CanvasEvent) for t in e.token_ids]


def test_cancel_frees_row_and_reservation(model):
    sched = EngineCore(model, SchedulerLimits(max_rows=2))
    p = SamplingParams(max_new_tokens=160, max_denoising_steps=8)
    got = []
    sched.submit(EngineRequest("x", [3, 4], p, seed=1), got.append)
    sched.submit(EngineRequest("y", [3, 4], p, seed=2), got.append)
    sched.iterate()
    assert len(sched.active) == 2 and sched.reserved > 0 and len(sched.runner.caches) == 2
    sched.cancel("x")
    sched.cancel("y")
    sched.iterate()
    assert not sched.active and sched.reserved == 0 and not sched.has_work and not sched.runner.caches


def test_template_constraints_pin_tokens_in_every_canvas(model):
    L = model.config.canvas_length
    pins = torch.full((L,), -1)
    pins[:4] = torch.tensor([7, 8, 9, 10])
    cons = [CanvasConstraint(pins.clone(), torch.zeros(L, dtype=torch.long)) for _ in range(2)]
    req = EngineRequest("t", [3, 4, 5], SamplingParams(max_denoising_steps=3), seed=9, constraints=cons)
    events = run(EngineCore(model, SchedulerLimits()), [req])
    canvases = [e.token_ids for e in events["t"] if isinstance(e, CanvasEvent)]
    assert len(canvases) == 2 and all(c[:4] == [7, 8, 9, 10] for c in canvases)
    assert events["t"][-1].finish_reason == "template"
    ref = generate(model, [3, 4, 5], SamplingParams(max_denoising_steps=3), seed=9, constraints=cons)
    assert ref.canvases == canvases


def test_a_long_prompt_is_prefilled_in_budgeted_pieces_while_a_stream_keeps_denoising(model):
    p = SamplingParams(max_new_tokens=48, max_denoising_steps=5)
    # the time-share rule is off: this is about the token budget (timing would make the pieces' schedule vary)
    sched = EngineCore(model, SchedulerLimits(prefill_chunk=8, token_budget=24, prefill_time_share=1.0))
    got = {"a": [], "b": []}
    a = EngineRequest("a", [3, 4, 5], p, seed=1)
    b = EngineRequest("b", list(range(3, 63)), p, seed=2)  # 60 prompt tokens
    sched.submit(a, got["a"].append)
    sched.iterate()
    sched.submit(b, got["b"].append)
    encoded = []
    while "b" not in sched.active or sched.active["b"].pending_encode:
        stats = sched.iterate()
        assert stats.rows >= 1  # the running stream is stepped in every iteration of the long prefill
        encoded.append(stats.encoded_tokens)
    # budget 24 - one canvas of 16 = 8, raised to half the budget (12), capped by the prefill chunk (8)
    assert len(encoded) >= 60 // 8 and max(encoded) <= 8 + 16  # a prompt piece, plus at most one commit
    while sched.has_work:
        sched.iterate()
    for r in (a, b):
        assert tokens(got[r.request_id]) == generate(model, r.prompt_ids, p, seed=r.seed).token_ids


def _constraint(kind: int, V: int) -> list[CanvasConstraint] | None:
    """None, or two canvases of pins (kind 1) or pins plus an allowed-token class (kind 2)."""
    if kind == 0:
        return None
    L = 16
    pins = torch.full((L,), -1)
    pins[1:3] = torch.tensor([11, 12])
    classes, masks = torch.zeros(L, dtype=torch.long), None
    if kind == 2:
        classes[5:9] = 1
        masks = torch.zeros(2, V, dtype=torch.bool)
        masks[1, 100:140] = True
    return [CanvasConstraint(pins.clone(), classes.clone(), masks) for _ in range(2)]


def test_a_request_gets_the_same_tokens_alone_and_in_a_batch_of_16(model):
    V = model.config.vocab_size
    reqs = []
    for i in range(16):
        params = SamplingParams(
            max_new_tokens=(5, 16, 33, 48)[i % 4],
            max_denoising_steps=3 + i % 5,
            entropy_bound=(0.1, 0.5, 2.0)[i % 3],
            t_min=0.3 + 0.05 * (i % 3),
            t_max=0.9,
            stability_threshold=i % 3,
            confidence_threshold=(0.005, 10.0)[i % 2],
        )
        prompt = list(range(3 + i, 3 + i + 1 + 3 * i))  # 1 to 46 tokens
        cons = _constraint(i % 5 if i % 5 < 3 else 0, V)
        reqs.append(
            EngineRequest(f"m{i}", prompt, params, seed=1000 + i, stream_drafts=i % 4 == 1, constraints=cons)
        )
    # no time-share rule: it holds prompts by measured iteration times, so how many rows share a forward would
    # depend on the machine's speed and load (tests/deployments/test_scheduler.py tests the rule itself)
    core = EngineCore(model, SchedulerLimits(max_rows=16, prefill_chunk=12, prefill_time_share=1.0))
    events = run(core, reqs)
    assert core.max_rows_seen >= 12  # they really shared forwards
    for r in reqs:
        ref = generate(model, r.prompt_ids, r.params, seed=r.seed, constraints=r.constraints)
        assert tokens(events[r.request_id]) == ref.token_ids, r.request_id
        assert events[r.request_id][-1].steps_per_canvas == ref.steps_per_canvas


def test_caches_are_sized_by_admission_and_released_when_dropped(model, monkeypatch):
    from model.kv_cache import SequenceCache

    made, released = [], []

    class Releasing(SequenceCache):
        def release(self) -> None:
            released.append(self)
            super().release()

    def new_cache(capacity_tokens: int | None = None):
        made.append(capacity_tokens)
        return Releasing(model.kv_pool, capacity_tokens)

    monkeypatch.setattr(model, "new_cache", new_cache)  # a preallocating cache takes its size at admission
    core = EngineCore(model, SchedulerLimits(max_rows=2))
    p = SamplingParams(max_new_tokens=20, max_denoising_steps=2)
    run(core, [EngineRequest("a", [3, 4, 5], p, seed=1)])
    assert len(released) == 1 and not core.runner.caches  # given back before the engine goes idle
    core.submit(EngineRequest("b", [3, 4], SamplingParams(max_new_tokens=160), seed=2), lambda e: None)
    core.iterate()
    core.cancel("b")
    core.iterate()
    L = model.config.canvas_length
    assert made == [3 + 2 * L, 2 + 10 * L]  # prompt + every canvas the request may commit
    assert (
        len(released) == 2 and not core.runner.caches
    )  # finished and cancelled sequences both give theirs back
