"""The entropy-bound block-diffusion sampler, as functions over per-row state.

Shape legend: R rows, L canvas, C vocabulary chunk, V vocab, D hidden.

One denoising step of a row (transformers' `DiffusionGemmaGenerationMixin._denoising_step`, after Block
Diffusion / EB-sampler, arXiv 2505.24857):
  1. logits of every canvas position, soft-capped, divided by the row's temperature (linear t_max -> t_min);
  2. a sample and the argmax at every position, and each position's entropy;
  3. accept the lowest-entropy positions while (cumulative entropy - the largest accepted) <= entropy_bound;
     re-noise every other position with a uniformly random token;
  4. stop once the argmax canvas is unchanged for `stability_threshold` steps and the mean entropy is under
     `confidence_threshold`, or after `max_denoising_steps`; the argmax canvas is what gets committed;
  5. softmax(scaled logits) @ embeddings feeds the next step as self-conditioning.

Rows are independent: each carries its own step, temperature, stopping history and `torch.Generator`, so a
batch may hold rows at different steps and a row's tokens do not depend on its batch-mates.

Two ways to draw the random numbers:
- `fast` (serving): steps 1, 2 and 5 run through the vocabulary in fixed chunks of `VOCAB_CHUNK` with an online
  softmax, so a step never holds more than [rows, L, C] logits — never [rows, L, V] — and sampling is Gumbel-max
  (argmax of logits - log(-log U)) with the row's generator.
- `reference` (tests, batch of one): the exact calls, shapes and order of the transformers loop after
  `torch.manual_seed(seed)` — `torch.randint` for canvases, `torch.multinomial` over full [L, V] probabilities —
  so both produce the same tokens. It materialises the full logits, which is why it is not the serving path.

Constraints (infill / JSON): a row's canvas may pin positions (never re-noised; the only allowed token is the pin,
so its entropy is 0 and it is always accepted) and restrict others to an allowed-token class, applied before
sampling, argmax and entropy. Unconstrained rows skip all of it, so plain generation is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.sampling.params import SamplingParams

VOCAB_CHUNK = 8192
ELEMENT_BUDGET = 1 << 22  # max logits elements alive per chunk: [rows, L, C] (16 MB in fp32)


@dataclass
class CanvasConstraint:
    """Per-position constraints of one canvas."""

    pin_ids: torch.Tensor  # [L] long, -1 where free
    class_ids: torch.Tensor  # [L] long, 0 = any token
    class_masks: torch.Tensor | None = None  # [n_classes, V] bool; row 0 unused

    @property
    def pinned(self) -> torch.Tensor:
        return self.pin_ids >= 0

    def allowed(self, start: int, stop: int) -> torch.Tensor:
        """[L, C] bool: which tokens of vocab slice [start, stop) each position may take."""
        vocab = torch.arange(start, stop)
        if self.class_masks is not None:
            table = self.class_masks[:, start:stop].clone()
            table[0] = True
            allowed = table[self.class_ids]
        else:
            allowed = torch.ones(len(self.pin_ids), stop - start, dtype=torch.bool)
        return torch.where(self.pinned[:, None], vocab[None, :] == self.pin_ids[:, None], allowed)


@dataclass
class RowState:
    """One canvas of one request, being denoised."""

    params: SamplingParams
    generator: torch.Generator | None  # None: draw from torch's global RNG (reference mode)
    canvas: torch.Tensor  # [L] current (noisy) canvas
    argmax: torch.Tensor  # [L] latest argmax canvas (what gets committed)
    history: torch.Tensor  # [S, L] previous argmax canvases for the stability test
    soft: torch.Tensor | None = None  # [L, D] self-conditioning input for the next step
    steps: int = 0
    finished: bool = False
    constraint: CanvasConstraint | None = None
    accepted: int = 0  # positions accepted in the latest step

    @classmethod
    def start(
        cls,
        params: SamplingParams,
        vocab_size: int,
        canvas_length: int,
        generator: torch.Generator | None,
        constraint: CanvasConstraint | None = None,
    ) -> RowState:
        canvas = _randint(vocab_size, canvas_length, generator)
        if constraint is not None:
            canvas = torch.where(constraint.pinned, constraint.pin_ids, canvas)
        history = torch.full((params.stability_threshold, canvas_length), -1, dtype=torch.long)
        return cls(params, generator, canvas, canvas.clone(), history, constraint=constraint)


def _randint(vocab_size: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:  # the reference draws [batch=1, L] from the global RNG
        return torch.randint(low=0, high=vocab_size, size=(1, length))[0]
    return torch.randint(0, vocab_size, (length,), generator=generator)


@dataclass
class StepDraws:
    """What one step produced for R rows."""

    sampled: torch.Tensor  # [R, L]
    argmax: torch.Tensor  # [R, L]
    entropy: torch.Tensor  # [R, L] entropy of the temperature-scaled distribution
    soft: torch.Tensor  # [R, L, D] soft embeddings for self-conditioning (already embed-scaled)


def draw_fast(model, hidden: torch.Tensor, rows: list[RowState]) -> StepDraws:
    """Chunked online softmax + Gumbel-max over the vocabulary. hidden [R, L, D]."""
    R, L, D = hidden.shape
    group = max(1, ELEMENT_BUDGET // (L * VOCAB_CHUNK))
    parts = [_draw_group(model, hidden[i : i + group], rows[i : i + group]) for i in range(0, R, group)]
    return StepDraws(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("sampled", "argmax", "entropy", "soft"))
    )


def _draw_group(model, hidden: torch.Tensor, rows: list[RowState]) -> StepDraws:
    R, L, D = hidden.shape
    weight = model.embed_tokens.weight  # [V, D] (tied LM head)
    V = weight.shape[0]
    cap = model.config.final_logit_softcapping
    inv_t = torch.tensor([1.0 / r.params.temperature(r.steps) for r in rows])[:, None, None]  # [R, 1, 1]
    m = torch.full((R, L), float("-inf"))
    s0, s1 = torch.zeros(R, L), torch.zeros(R, L)
    soft = torch.zeros(R, L, D)
    best_val, best_idx = torch.full((R, L), float("-inf")), torch.zeros(R, L, dtype=torch.long)
    key_val, key_idx = torch.full((R, L), float("-inf")), torch.zeros(R, L, dtype=torch.long)
    for start in range(0, V, VOCAB_CHUNK):
        stop = min(V, start + VOCAB_CHUNK)
        w = weight[start:stop]  # [C, D]
        logits = (hidden @ w.T).float()  # [R, L, C]
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logits = logits * inv_t
        for r, row in enumerate(rows):
            if row.constraint is not None:
                logits[r].masked_fill_(~row.constraint.allowed(start, stop), float("-inf"))
        # argmax (first maximum wins, as torch.argmax over the full vocabulary)
        cval, cidx = logits.max(-1)
        better = cval > best_val
        best_val, best_idx = torch.where(better, cval, best_val), torch.where(better, cidx + start, best_idx)
        # Gumbel-max sample with each row's own generator, drawn in a fixed chunk order
        # (-log U is an Exp(1) draw; torch.rand + log is ~4x cheaper than exponential_ on CPU)
        uniform = torch.stack([torch.rand(L, stop - start, generator=row.generator) for row in rows])
        kval, kidx = (logits - torch.log(-torch.log(uniform))).max(-1)
        better = kval > key_val
        key_val, key_idx = torch.where(better, kval, key_val), torch.where(better, kidx + start, key_idx)
        # online softmax statistics: normaliser s0, E[logit - max] (s1) for the entropy, E[embedding] for
        # self-conditioning; s1 is kept centred on the running max so entropy = log s0 - s1/s0 does not cancel
        new_m = torch.maximum(m, cval)
        safe_m = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
        alpha = torch.exp(m - safe_m)
        e = torch.exp(logits - safe_m[..., None])  # [R, L, C]
        shift = torch.where(s0 > 0, (m - safe_m) * s0, torch.zeros_like(s0))
        centred = torch.where(e > 0, e * (logits - safe_m[..., None]), torch.zeros_like(e))
        s1 = (s1 + shift) * alpha + centred.sum(-1)
        s0 = s0 * alpha + e.sum(-1)
        soft = soft * alpha[..., None] + e @ w.float()
        m = new_m
    entropy = (torch.log(s0) - s1 / s0).clamp_min(0.0)
    soft = (soft / s0[..., None]).to(weight.dtype) * model.embed_scale()
    return StepDraws(key_idx, best_idx, entropy, soft)


def draw_reference(model, hidden: torch.Tensor, rows: list[RowState]) -> StepDraws:
    """The transformers loop's exact calls, for one row drawing from the global RNG."""
    if len(rows) != 1 or rows[0].generator is not None or rows[0].constraint is not None:
        raise ValueError("reference draws take exactly one unconstrained row using the global RNG")
    row = rows[0]
    R, L, _ = hidden.shape
    processed = model.logits(hidden) / row.params.temperature(row.steps)  # [1, L, V]
    V = processed.shape[-1]
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, V), num_samples=1).squeeze(-1).view(R, L)
    argmax = torch.argmax(processed, dim=-1)
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    soft = model.soft_embeddings(torch.softmax(processed.to(model.dtype), dim=-1, dtype=torch.float32))
    return StepDraws(sampled, argmax, entropy, soft)


def accept_mask(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Lowest-entropy positions while sum(entropy) - max(entropy) <= bound. entropy [L] -> bool [L]."""
    sorted_e, order = torch.sort(entropy, dim=-1, descending=False)
    keep = torch.cumsum(sorted_e, dim=-1) - sorted_e <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def advance(rows: list[RowState], draws: StepDraws, vocab_size: int) -> None:
    """Apply acceptance, re-noising and the stopping test to every row, in place."""
    for r, row in enumerate(rows):
        entropy = draws.entropy[r]
        if row.constraint is not None:
            entropy = torch.where(row.constraint.pinned, torch.zeros_like(entropy), entropy)
        accepted = accept_mask(entropy, row.params.entropy_bound)
        canvas = torch.where(accepted, draws.sampled[r], row.canvas)
        noise = _randint(vocab_size, canvas.shape[0], row.generator)
        canvas = torch.where(accepted, canvas, noise)
        if row.constraint is not None:
            canvas = torch.where(row.constraint.pinned, row.constraint.pin_ids, canvas)
        argmax = draws.argmax[r]
        if row.params.stability_threshold == 0:
            stable = True
        else:
            stable = bool((row.history == argmax[None]).all())
            row.history = torch.cat([row.history[1:], argmax[None]])
        confident = bool(entropy.mean() < row.params.confidence_threshold)
        row.canvas, row.argmax, row.soft = canvas, argmax, draws.soft[r]
        row.steps += 1
        row.accepted = int(accepted.sum())
        row.finished = (stable and confident) or row.steps >= row.params.max_denoising_steps


def step(model, hidden: torch.Tensor, rows: list[RowState], rng: str = "fast") -> None:
    """Sample and advance R rows from their decoder output hidden [R, L, D]."""
    draws = draw_reference(model, hidden, rows) if rng == "reference" else draw_fast(model, hidden, rows)
    advance(rows, draws, model.config.vocab_size)
