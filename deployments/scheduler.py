"""Continuous batching at denoising-step granularity: the host bookkeeping (no model, no device tensors).

Shape legend: R rows (one canvas each), L canvas.

The engine's iteration is split in three (deployments/engine_core.py drives it):
  1. `Scheduler.schedule()` decides, on the host, what this iteration does and returns a `StepPlan`: which row
     slots to release (cancelled or finished sequences), which waiting requests to admit into which free slot
     (while a slot is free and their worst-case KV cache fits the memory budget), which encoder work runs under
     the per-iteration token budget (prompt prefill in chunks, commits of finished canvases), which slots start
     a fresh canvas, and which slots are denoised;
  2. `ModelRunner.execute(plan)` (deployments/model_runner.py) does it on the device and reads back one packed
     status per row (`StepResult`);
  3. `Scheduler.update(plan, result)` applies the finish rules (model/sampling/finish.py `canvas_outcome`) and
     emits events to each request's sink: a draft per row that asked for them, a committed canvas per finished
     row, a final event for finished requests.

A sequence keeps one row slot from admission to its end: the runner's per-row device buffers and its KV cache
are indexed by that slot. A request's tokens do not depend on its batch-mates: its random numbers are keyed
noise of its own seed (model/sampling/noise.py), and it owns its cache and its slot. The plain loop
`model.sampling.generate.generate` is the reference the scheduler + runner pair is tested against.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from model.config import ModelConfig
from model.sampling.finish import canvas_outcome
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should answer RESOURCE_EXHAUSTED."""


class RequestTooLarge(ValueError):
    """A request whose KV cache could never fit the engine's budget."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stream_drafts: bool = False
    constraints: list[CanvasConstraint] | None = None  # one per canvas (templates); None = plain generation

    @property
    def num_canvases(self) -> int:
        return len(self.constraints) if self.constraints else -1


@dataclass
class DraftEvent:
    canvas_index: int
    step: int
    token_ids: list[int]
    accepted: int


@dataclass
class CanvasEvent:
    canvas_index: int
    token_ids: list[int]  # committed tokens delivered to the client (trimmed at EOS / max_new_tokens)
    steps: int
    last: bool = False  # no canvas follows: the request's final event comes next
    started_s: float = 0.0  # time.monotonic() when the canvas's first denoising step began (for tracing)


@dataclass
class FinalEvent:
    finish_reason: str  # "length" | "eos" | "template" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    steps_per_canvas: list[int]
    tokens_per_forward: float
    time_to_first_canvas_s: float
    total_time_s: float
    queue_time_s: float


@dataclass
class ErrorEvent:
    message: str
    code: str = "INTERNAL"  # a grpc.StatusCode name: RESOURCE_EXHAUSTED, INVALID_ARGUMENT, INTERNAL


Event = DraftEvent | CanvasEvent | FinalEvent | ErrorEvent
Sink = Callable[[Event], None]


@dataclass
class Sequence:
    request: EngineRequest
    sink: Sink
    reserved_bytes: int
    kv_tokens: int  # worst-case tokens of its KV cache (prompt + every canvas): the runner's capacity hint
    submitted: float
    slot: int = -1  # row slot while admitted
    admitted: float = 0.0
    first_canvas: float = 0.0
    canvas_index: int = 0
    canvas_started: float = 0.0
    denoising: bool = False  # a canvas is being denoised in its slot
    steps_done: int = 0  # denoising steps of the current canvas
    pending_encode: list[int] | None = None  # tokens to encode next iteration (prompt or committed canvas)
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class Admit:
    slot: int
    kv_tokens: int  # worst-case cache size (tokens) admission reserved for it


@dataclass(frozen=True)
class Encode:
    slot: int
    tokens: list[int]  # appended to the slot's cache (a prompt piece or a committed canvas)


@dataclass(frozen=True)
class StartCanvas:
    slot: int
    params: SamplingParams
    seed: int
    canvas_index: int
    constraint: CanvasConstraint | None


@dataclass
class StepPlan:
    """What one iteration does, in this order: release, admit, encode, start canvases, denoise."""

    release: list[int] = field(default_factory=list)  # slots whose sequence ended: drop their caches
    admit: list[Admit] = field(default_factory=list)
    encode: list[Encode] = field(default_factory=list)
    start: list[StartCanvas] = field(default_factory=list)
    denoise: list[int] = field(default_factory=list)  # slots denoised by one batched forward
    drafts: list[int] = field(default_factory=list)  # the subset of `denoise` whose argmax canvas is streamed
    self_conditioning: bool = False  # some denoised row has a previous step (else the soft input is all zero)
    prefilling: bool = False  # some encode piece is a prompt's (not a committed canvas)

    @property
    def encoded_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.encode)


@dataclass
class StepResult:
    """What the runner read back for the plan's denoised rows (in `plan.denoise` order)."""

    finished: list[bool]
    accepted: list[int]  # positions accepted in this step
    drafts: dict[int, list[int]] = field(default_factory=dict)  # slot -> argmax canvas (for plan.drafts)
    committed: dict[int, list[int]] = field(default_factory=dict)  # slot -> argmax canvas of a finished row


@dataclass
class SchedulerLimits:
    max_rows: int = 64
    max_queue: int = 256
    kv_cache_bytes: int = 2 << 30
    # Long prompts are prefilled at most this many tokens per iteration (chunked prefill), so one long prompt
    # neither builds a [T, T] attention mask nor stalls every other row's denoising step for its whole length.
    prefill_chunk: int = 512
    # Tokens one iteration may process (see `share_encoder_tokens`): running canvases' denoising first, encoder
    # work (commits, then prefill shared fairly between prompts) gets the rest but never less than half.
    token_budget: int = 8192
    # While streams are denoising, prompt prefill may take at most this share of the engine's time (measured per
    # iteration, see `Scheduler.record_iteration`): after an iteration whose prompt pieces ran long, prompts wait
    # (denoise-only iterations) until the running streams have had their share back. A piece of a long prompt
    # deep into its context costs far more than its token count says, so a token budget alone cannot bound it.
    # Pieces keep their size (a prompt's chunking, and so its cache, does not depend on its batch-mates);
    # 1.0 turns the rule off.
    prefill_time_share: float = 0.5
    # A prompt piece after c of its tokens are cached gets at most n tokens with n * (c + n) <= this many
    # query-key pairs (`prompt_piece`; never below MIN_PROMPT_PIECE): a piece's attention cost grows with the
    # context it reads, so a long prompt's pieces shrink as its prefill goes deeper and each costs about what a
    # full `prefill_chunk` piece costs early on. It depends only on the prompt's own progress, so its chunking
    # still does not depend on load or batch-mates. 0 turns it off.
    prefill_piece_work: int = 512 * 4096


@dataclass
class IterationStats:
    rows: int
    encoded_rows: int
    encoded_tokens: int
    finished_canvases: int
    seconds: float


# The smallest prompt piece `prompt_piece` cuts: below it an iteration's fixed costs dominate the piece's.
MIN_PROMPT_PIECE = 16


def prompt_piece(cached: int, chunk: int, work: int) -> int:
    """Tokens of a prompt's next piece when `cached` of its tokens are in the cache: the largest n <= chunk with
    n * (cached + n) <= work (`SchedulerLimits.prefill_piece_work`; 0: always `chunk`), at least
    MIN_PROMPT_PIECE."""
    if not work or chunk * (cached + chunk) <= work:
        return chunk
    n = int((math.sqrt(cached * cached + 4 * work) - cached) / 2)  # the root of n^2 + cached * n = work
    return max(min(n, chunk), min(MIN_PROMPT_PIECE, chunk))


def share_encoder_tokens(
    needs: list[int], whole: list[bool], budget: int, chunk: int | list[int]
) -> list[int]:
    """Encoder tokens granted this iteration to each pending piece of work (0: wait for a later iteration).

    `needs[i]` tokens are pending; `whole[i]` marks a commit (a finished canvas: never split, and granted before
    any prefill because the stream behind it is running); a prompt gets at most `chunk` tokens (or `chunk[i]`). Prompts share
    what commits leave by water-filling: equal shares, a prompt that needs less than its share returns the rest
    to the others, so a long prompt cannot take the budget from short ones. At least one piece always runs,
    so nothing waits forever however small the budget."""
    caps = chunk if isinstance(chunk, list) else [chunk] * len(needs)
    grant = [0] * len(needs)
    left = budget
    for i, n in enumerate(needs):
        if whole[i] and n <= left:
            grant[i], left = n, left - n
    open_ = [i for i in range(len(needs)) if not whole[i]]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            g = min(min(needs[i], caps[i]) - grant[i], share, left)
            grant[i] += g
            left -= g
            if grant[i] == min(needs[i], caps[i]):
                open_.remove(i)
    if needs and not any(grant):
        grant[0] = needs[0] if whole[0] else min(needs[0], caps[0])
    return grant


class Scheduler:
    """Admission, row slots, canvases, finish rules and events of every request in one engine."""

    def __init__(
        self,
        config: ModelConfig,
        limits: SchedulerLimits,
        kv_itemsize: int = 4,
        kv_reservation: Callable[[int], int] | None = None,
    ):
        """`kv_itemsize`: bytes of one cached K or V element (the model dtype's size). `kv_reservation`: bytes a
        sequence of that many tokens holds (the model's own count when it has one), else the cache formula."""
        self.config = config
        self.limits = limits
        self.kv_itemsize = kv_itemsize
        self._kv_reservation = kv_reservation
        self.waiting: deque[Sequence] = deque()
        self.active: dict[str, Sequence] = {}
        self.cancelled: set[str] = set()
        self.reserved = 0
        self._free_slots = list(range(limits.max_rows - 1, -1, -1))  # a stack: the lowest slot is taken first
        self._to_release: list[int] = []
        self._encode_turn = 0
        self._prefill_debt = 0.0  # seconds prompt prefill took beyond its time share (prompts wait while > 0)
        self._denoise_s = 0.0  # running mean of a denoise-only iteration's seconds
        # running totals for stats / autoscaling
        self.forwards = 0
        self.rows_forwarded = 0
        self.tokens_delivered = 0
        self.max_rows_seen = 0

    # -- admission ---------------------------------------------------------------------------------------
    def kv_tokens_needed(self, request: EngineRequest) -> int:
        """Tokens of the request's KV cache at its longest: the prompt and every canvas it may commit."""
        canvases = request.num_canvases
        if canvases < 0:
            canvases = math.ceil(request.params.max_new_tokens / self.config.canvas_length)
        return len(request.prompt_ids) + canvases * self.config.canvas_length

    def kv_bytes_needed(self, request: EngineRequest) -> int:
        tokens = self.kv_tokens_needed(request)
        if self._kv_reservation is not None:
            return self._kv_reservation(tokens)
        cfg, size = self.config, self.kv_itemsize
        return tokens * cfg.kv_bytes_per_token(size) + cfg.sliding_kv_bytes(size)

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        if request.request_id in self.active or any(
            s.request.request_id == request.request_id for s in self.waiting
        ):
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        need = self.kv_bytes_needed(request)
        if need > self.limits.kv_cache_bytes:
            raise RequestTooLarge(
                f"this request needs {need / 2**20:.1f} MiB of KV cache but the engine has "
                f"{self.limits.kv_cache_bytes / 2**20:.1f} MiB; shorten the prompt or max_new_tokens"
            )
        if len(self.waiting) >= self.limits.max_queue:
            raise QueueFull(
                f"the engine queue is full ({self.limits.max_queue} waiting requests); retry later"
            )
        seq = Sequence(request, sink, need, self.kv_tokens_needed(request), time.monotonic())
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        # a slot to release is work too: the runner gives that sequence's cache back in the next iteration
        return bool(self.waiting or self.active or self._to_release)

    def _drop_cancelled(self) -> None:
        if not self.cancelled:
            return
        for seq in [s for s in self.waiting if s.request.request_id in self.cancelled]:
            self.waiting.remove(seq)
        for rid in list(self.cancelled):
            seq = self.active.pop(rid, None)
            if seq is not None:
                self._free(seq)
        self.cancelled.clear()

    def _free(self, seq: Sequence) -> None:
        self.reserved -= seq.reserved_bytes
        self._to_release.append(seq.slot)
        seq.slot = -1

    def _admit(self, plan: StepPlan) -> None:
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            if self.reserved + seq.reserved_bytes > self.limits.kv_cache_bytes and self.active:
                break  # wait for memory; an idle engine always admits (submit() checked it fits alone)
            self.waiting.popleft()
            self.reserved += seq.reserved_bytes
            seq.admitted = time.monotonic()
            seq.slot = self._free_slots.pop()
            seq.pending_encode = list(seq.request.prompt_ids)
            self.active[seq.request.request_id] = seq
            plan.admit.append(Admit(seq.slot, seq.kv_tokens))

    # -- one iteration: plan -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._drop_cancelled()
        plan.release, self._to_release = self._to_release, []
        self._free_slots.extend(plan.release)
        self._free_slots.sort(reverse=True)
        self._admit(plan)
        self._plan_encode(plan)
        self._plan_canvases(plan)
        return plan

    def _plan_encode(self, plan: StepPlan) -> None:
        denoising = sum(1 for s in self.active.values() if s.denoising)
        todo = [s for s in self.active.values() if s.pending_encode]
        if denoising and self._prefill_debt > 0:  # prompts have had more than their time share: commits only
            todo = [s for s in todo if s.canvas_index > 0]
        if not todo:
            return
        # rotate who is served first, so a small budget still reaches every sequence in turn
        shift = self._encode_turn % len(todo)
        todo = todo[shift:] + todo[:shift]
        self._encode_turn += 1
        L = self.config.canvas_length
        budget = max(self.limits.token_budget - denoising * L, self.limits.token_budget // 2)
        chunk, work = self.limits.prefill_chunk, self.limits.prefill_piece_work
        grant = share_encoder_tokens(
            [len(s.pending_encode) for s in todo],
            [s.canvas_index > 0 for s in todo],  # after the prompt, pending tokens are a committed canvas
            budget,
            [
                prompt_piece(len(s.request.prompt_ids) - len(s.pending_encode), chunk, work)
                if s.canvas_index == 0
                else chunk
                for s in todo
            ],
        )
        for s, g in zip(todo, grant, strict=True):
            if g:
                plan.encode.append(Encode(s.slot, s.pending_encode[:g]))
                plan.prefilling |= s.canvas_index == 0
                s.pending_encode = s.pending_encode[g:] or None

    def _plan_canvases(self, plan: StepPlan) -> None:
        for s in self.active.values():
            if (
                not s.denoising and not s.pending_encode
            ):  # prompt (or last commit) fully encoded: a new canvas
                cons = s.request.constraints[s.canvas_index] if s.request.constraints else None
                plan.start.append(StartCanvas(s.slot, s.request.params, s.request.seed, s.canvas_index, cons))
                s.denoising, s.steps_done = True, 0
                s.canvas_started = time.monotonic()
            if s.denoising:
                plan.denoise.append(s.slot)
                plan.self_conditioning |= s.steps_done > 0
                if s.request.stream_drafts:
                    plan.drafts.append(s.slot)

    # -- one iteration: results --------------------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> int:
        """Apply the runner's result to the plan's rows and emit their events. Returns canvases finished."""
        if not plan.denoise:
            return 0
        self.forwards += 1
        self.rows_forwarded += len(plan.denoise)
        self.max_rows_seen = max(self.max_rows_seen, len(plan.denoise))
        by_slot = {s.slot: s for s in self.active.values()}
        finished = 0
        for slot, done, accepted in zip(plan.denoise, result.finished, result.accepted, strict=True):
            s = by_slot.get(slot)
            if s is None:  # failed or cancelled meanwhile: nobody to tell
                continue
            s.steps_done += 1
            if slot in result.drafts:
                s.sink(DraftEvent(s.canvas_index, s.steps_done, result.drafts[slot], accepted))
            if done:
                finished += 1
                self._finish_canvas(s, result.committed[slot])
        return finished

    def record_iteration(self, plan: StepPlan, seconds: float) -> None:
        """The wall time of the iteration that ran `plan`: keeps prompt prefill within
        `limits.prefill_time_share` of the time while streams are denoising (see `_plan_encode`)."""
        share = self.limits.prefill_time_share
        if not plan.denoise or share >= 1.0:
            self._prefill_debt = 0.0  # nobody was waiting for the prefill
        elif plan.prefilling:  # what the prompt pieces added to the running streams' step
            self._prefill_debt += max(0.0, seconds - self._denoise_s)
        else:  # a denoise-only iteration: the streams got this time, prompts earn share / (1 - share) of it
            self._denoise_s = seconds if not self._denoise_s else 0.8 * self._denoise_s + 0.2 * seconds
            self._prefill_debt = max(0.0, self._prefill_debt - seconds * share / (1.0 - share))

    def _finish_canvas(self, s: Sequence, committed: list[int]) -> None:
        req = s.request
        s.steps.append(s.steps_done)
        if not s.first_canvas:
            s.first_canvas = time.monotonic()
        outcome = canvas_outcome(
            committed,
            delivered_so_far=len(s.tokens),
            max_new_tokens=req.params.max_new_tokens,
            eos_ids=self.config.eos_token_ids,
            template_canvases=len(req.constraints) if req.constraints else None,
            canvas_index=s.canvas_index,
        )
        delivered, reason = outcome.delivered, outcome.finish_reason
        s.tokens.extend(delivered)
        self.tokens_delivered += len(delivered)
        s.sink(CanvasEvent(s.canvas_index, delivered, s.steps_done, reason is not None, s.canvas_started))
        s.denoising = False
        s.canvas_index += 1
        if reason is not None:
            self._finish(s, reason)
        else:
            s.pending_encode = committed  # commit: encode the canvas into the cache next iteration

    def _finish(self, s: Sequence, reason: str) -> None:
        now = time.monotonic()
        s.done = True
        self.active.pop(s.request.request_id, None)
        self._free(s)
        s.sink(
            FinalEvent(
                finish_reason=reason,
                prompt_tokens=len(s.request.prompt_ids),
                completion_tokens=len(s.tokens),
                steps_per_canvas=list(s.steps),
                tokens_per_forward=len(s.tokens) / max(1, sum(s.steps)),
                time_to_first_canvas_s=(s.first_canvas or now) - s.submitted,
                total_time_s=now - s.submitted,
                queue_time_s=(s.admitted or now) - s.submitted,
            )
        )

    def fail_all(self, message: str, code: str = "INTERNAL") -> None:
        """Tell every request in flight that the engine failed (their rows are gone; the runner is reset too)."""
        for s in list(self.waiting) + list(self.active.values()):
            s.sink(ErrorEvent(message, code))
        self.waiting.clear()
        self.active.clear()
        self.cancelled.clear()
        self.reserved = 0
        self._to_release = []
        self._free_slots = list(range(self.limits.max_rows - 1, -1, -1))
