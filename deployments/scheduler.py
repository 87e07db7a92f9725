"""Continuous batching at denoising-step granularity (pure: no Ray, no gRPC, no threads).

Shape legend: R active rows (one canvas each), L canvas, D hidden.

Every `iterate()`:
  1. drop cancelled sequences and free their rows and KV reservations;
  2. admit waiting requests while a row is free and their worst-case KV cache fits the memory budget;
  3. one batched encoder call for all encoder work: prompt prefills of admitted requests and commits of the
     canvases that finished in the previous iteration;
  4. start a fresh canvas for every sequence that needs one;
  5. one batched decoder forward over every active canvas — rows at different steps, with different prefix
     lengths, temperatures and stopping states — then the sampler step (model/sampling/sampler.py);
  6. emit events: a draft per row that asked for them, a committed canvas per finished row, a final event for
     finished requests.

A request's tokens do not depend on its batch-mates: its random numbers are keyed noise of its own seed
(model/sampling/noise.py), and it owns its cache and its row state. The plain loop
`model.sampling.generate.generate` is the reference this scheduler is tested against.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.kv_cache import PrefixBatch, SequenceCache
from model.sampling.finish import canvas_outcome
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint, RowState, StepDraws, advance, draw_fast
from model.transformer import DiffusionGemma, TokenBatch


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
    cache: SequenceCache
    reserved_bytes: int
    submitted: float
    admitted: float = 0.0
    first_canvas: float = 0.0
    canvas_index: int = 0
    canvas_started: float = 0.0
    row: RowState | None = None
    pending_encode: list[int] | None = None  # tokens to encode next iteration (prompt or committed canvas)
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    done: bool = False


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


@dataclass
class IterationStats:
    rows: int
    encoded_rows: int
    encoded_tokens: int
    finished_canvases: int
    seconds: float


def share_encoder_tokens(needs: list[int], whole: list[bool], budget: int, chunk: int) -> list[int]:
    """Encoder tokens granted this iteration to each pending piece of work (0: wait for a later iteration).

    `needs[i]` tokens are pending; `whole[i]` marks a commit (a finished canvas: never split, and granted before
    any prefill because the stream behind it is running); a prompt gets at most `chunk` tokens. Prompts share
    what commits leave by water-filling: equal shares, a prompt that needs less than its share returns the rest
    to the others, so a long prompt cannot take the budget from short ones. At least one piece always runs,
    so nothing waits forever however small the budget."""
    grant = [0] * len(needs)
    left = budget
    for i, n in enumerate(needs):
        if whole[i] and n <= left:
            grant[i], left = n, left - n
    open_ = [i for i in range(len(needs)) if not whole[i]]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            g = min(min(needs[i], chunk) - grant[i], share, left)
            grant[i] += g
            left -= g
            if grant[i] == min(needs[i], chunk):
                open_.remove(i)
    if needs and not any(grant):
        grant[0] = needs[0] if whole[0] else min(needs[0], chunk)
    return grant


class Scheduler:
    def __init__(self, model: DiffusionGemma, limits: SchedulerLimits):
        self.model = model
        self.limits = limits
        self.config = model.config
        self.waiting: deque[Sequence] = deque()
        self.active: dict[str, Sequence] = {}
        self.cancelled: set[str] = set()
        self.reserved = 0
        self._prefix_key: tuple | None = None
        self._prefix: PrefixBatch | None = None
        self._encode_turn = 0
        # running totals for stats / autoscaling
        self.forwards = 0
        self.rows_forwarded = 0
        self.tokens_delivered = 0
        self.max_rows_seen = 0

    # -- admission ---------------------------------------------------------------------------------------
    def kv_bytes_needed(self, request: EngineRequest) -> int:
        cfg = self.config
        canvases = request.num_canvases
        if canvases < 0:
            canvases = math.ceil(request.params.max_new_tokens / cfg.canvas_length)
        tokens = len(request.prompt_ids) + canvases * cfg.canvas_length
        itemsize = torch.empty((), dtype=self.model.dtype).element_size()
        return tokens * cfg.kv_bytes_per_token(itemsize) + cfg.sliding_kv_bytes(itemsize)

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
        seq = Sequence(request, sink, self.model.new_cache(), need, time.monotonic())
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    def _drop_cancelled(self) -> None:
        if not self.cancelled:
            return
        for seq in [s for s in self.waiting if s.request.request_id in self.cancelled]:
            self.waiting.remove(seq)
        for rid in list(self.cancelled):
            seq = self.active.pop(rid, None)
            if seq is not None:
                self.reserved -= seq.reserved_bytes
        self.cancelled.clear()

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.limits.max_rows:
            seq = self.waiting[0]
            if self.reserved + seq.reserved_bytes > self.limits.kv_cache_bytes and self.active:
                break  # wait for memory; an idle engine always admits (submit() checked it fits alone)
            self.waiting.popleft()
            self.reserved += seq.reserved_bytes
            seq.admitted = time.monotonic()
            seq.pending_encode = list(seq.request.prompt_ids)
            self.active[seq.request.request_id] = seq

    # -- one iteration -----------------------------------------------------------------------------------
    @torch.no_grad()
    def iterate(self) -> IterationStats:
        t0 = time.perf_counter()
        self._drop_cancelled()
        self._admit()
        encoded_rows, encoded_tokens = self._encode_pending()
        self._start_canvases()
        rows = [s for s in self.active.values() if s.row is not None and not s.row.finished]
        finished = 0
        if rows:
            draws = self._denoise(rows)
            advance([s.row for s in rows], draws, self.config.vocab_size)
            finished = self._emit(rows)
        return IterationStats(len(rows), encoded_rows, encoded_tokens, finished, time.perf_counter() - t0)

    def _encode_pending(self) -> tuple[int, int]:
        todo = [s for s in self.active.values() if s.pending_encode]
        if not todo:
            return 0, 0
        # rotate who is served first, so a small budget still reaches every sequence in turn
        shift = self._encode_turn % len(todo)
        todo = todo[shift:] + todo[:shift]
        self._encode_turn += 1
        L = self.config.canvas_length
        denoising = sum(1 for s in self.active.values() if s.row is not None and not s.row.finished)
        budget = max(self.limits.token_budget - denoising * L, self.limits.token_budget // 2)
        grant = share_encoder_tokens(
            [len(s.pending_encode) for s in todo],
            [s.canvas_index > 0 for s in todo],  # after the prompt, pending tokens are a committed canvas
            budget,
            self.limits.prefill_chunk,
        )
        todo, grant = [s for s, g in zip(todo, grant, strict=True) if g], [g for g in grant if g]
        pieces = [s.pending_encode[:g] for s, g in zip(todo, grant, strict=True)]
        starts = [s.cache.length for s in todo]
        batch = TokenBatch.from_lists(pieces, starts, self.config.pad_token_id, self.model.device)
        self.model.encode(batch, [s.cache for s in todo])
        for s, piece in zip(todo, pieces, strict=True):
            s.pending_encode = s.pending_encode[len(piece) :] or None
        return len(todo), sum(len(p) for p in pieces)

    def _start_canvases(self) -> None:
        cfg = self.config
        for s in self.active.values():
            if s.row is None and not s.done and not s.pending_encode:
                cons = s.request.constraints[s.canvas_index] if s.request.constraints else None
                s.row = RowState.start(
                    s.request.params,
                    cfg.vocab_size,
                    cfg.canvas_length,
                    s.request.seed,
                    cons,
                    canvas_index=s.canvas_index,
                    device=self.model.device,
                )
                s.canvas_started = time.monotonic()

    def _prefix_for(self, rows: list[Sequence]) -> PrefixBatch:
        # the prefix of a row is fixed while its canvas is denoised: rebuild only when the batch changes
        key = tuple((s.request.request_id, s.cache.length) for s in rows)
        if key != self._prefix_key:
            self._prefix_key, self._prefix = key, PrefixBatch([s.cache for s in rows])
        return self._prefix

    def _denoise(self, rows: list[Sequence]) -> StepDraws:
        canvas = torch.stack([s.row.canvas for s in rows])  # [R, L]
        soft = None
        if any(s.row.soft is not None for s in rows):
            D = self.config.hidden_size
            zeros = torch.zeros(
                self.config.canvas_length, D, dtype=self.model.dtype, device=self.model.device
            )
            soft = torch.stack([s.row.soft if s.row.soft is not None else zeros for s in rows])  # [R, L, D]
        hidden = self.model.denoise(canvas, self._prefix_for(rows), soft)
        self.forwards += 1
        self.rows_forwarded += len(rows)
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        return draw_fast(self.model, hidden, [s.row for s in rows])

    def _emit(self, rows: list[Sequence]) -> int:
        finished = 0
        for s in rows:
            row = s.row
            if s.request.stream_drafts:
                s.sink(DraftEvent(s.canvas_index, row.steps, row.argmax.tolist(), row.accepted))
            if row.finished:
                finished += 1
                self._finish_canvas(s)
        return finished

    def _finish_canvas(self, s: Sequence) -> None:
        cfg = self.config
        req = s.request
        committed = s.row.argmax.tolist()
        s.steps.append(s.row.steps)
        if not s.first_canvas:
            s.first_canvas = time.monotonic()
        outcome = canvas_outcome(
            committed,
            delivered_so_far=len(s.tokens),
            max_new_tokens=req.params.max_new_tokens,
            eos_ids=cfg.eos_token_ids,
            template_canvases=len(req.constraints) if req.constraints else None,
            canvas_index=s.canvas_index,
        )
        delivered, reason = outcome.delivered, outcome.finish_reason
        s.tokens.extend(delivered)
        self.tokens_delivered += len(delivered)
        s.sink(CanvasEvent(s.canvas_index, delivered, s.row.steps, reason is not None, s.canvas_started))
        s.row = None
        s.canvas_index += 1
        if reason is not None:
            self._finish(s, reason)
        else:
            s.pending_encode = committed  # commit: encode the canvas into the cache next iteration

    def _finish(self, s: Sequence, reason: str) -> None:
        now = time.monotonic()
        s.done = True
        self.active.pop(s.request.request_id, None)
        self.reserved -= s.reserved_bytes
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
        """Tell every request in flight that the engine failed (their rows are gone)."""
        for s in list(self.waiting) + list(self.active.values()):
            s.sink(ErrorEvent(message, code))
        self.waiting.clear()
        self.active.clear()
        self.reserved = 0
