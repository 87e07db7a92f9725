"""Single-process generation: prompt -> canvases -> tokens.

The plain loop the CLI and tests use, and the reference the engine's batched scheduler is held to. Per canvas:
start from uniform noise, denoise until the row stops (model/sampling/sampler.py), commit the argmax canvas, encode it
into the KV cache (transformers' `DiffusionGemmaGenerationMixin.generate`, batch of one). It returns exactly
`max_new_tokens` tokens (the last canvas trimmed) unless an EOS token comes first: generation stops there and the
EOS is not part of `token_ids`.

`tokens_per_forward` counts delivered tokens over decoder forwards (the reference counts whole canvases up to
its padding; ours counts what the caller receives).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.kv_cache import PrefixBatch
from model.sampling.finish import canvas_outcome
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint, RowState, step
from model.transformer import DiffusionGemma, TokenBatch


@dataclass
class GenerateResult:
    token_ids: list[int]
    steps_per_canvas: list[int]
    tokens_per_forward: float
    finish_reason: str  # "length" | "eos" | "template"
    canvases: list[list[int]] = field(default_factory=list)  # every committed canvas, untrimmed


def check_prompt(model: DiffusionGemma, prompt_ids: list[int], max_new_tokens: int) -> None:
    cfg = model.config
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    total = len(prompt_ids) + math.ceil(max_new_tokens / cfg.canvas_length) * cfg.canvas_length
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens rounded up to whole canvases "
            f"exceeds the model's context of {cfg.max_position_embeddings} tokens"
        )


@torch.no_grad()
def generate(
    model: DiffusionGemma,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    seed: int,
    rng: str = "fast",
    constraints: list[CanvasConstraint] | None = None,
    on_step: Callable[[int, RowState], None] | None = None,
) -> GenerateResult:
    """Generate after `prompt_ids`. With `constraints` (one per canvas, from a template layout) exactly that
    many canvases are generated and EOS does not stop generation."""
    if rng not in ("fast", "reference"):
        raise ValueError(f"rng must be 'fast' or 'reference' (got {rng!r})")
    params.validate()
    check_prompt(model, prompt_ids, params.max_new_tokens)
    cfg = model.config
    if rng == "reference" and constraints:
        raise ValueError("rng='reference' reproduces plain generation only; use rng='fast' with constraints")
    if rng == "reference":
        torch.manual_seed(seed)
    row_seed = None if rng == "reference" else seed  # None: the global RNG, as transformers draws
    n_canvases = len(constraints) if constraints else math.ceil(params.max_new_tokens / cfg.canvas_length)
    cache = model.new_cache(capacity_tokens=len(prompt_ids) + n_canvases * cfg.canvas_length)
    try:
        return _generate(model, prompt_ids, params, cache, n_canvases, row_seed, rng, constraints, on_step)
    finally:
        cache.release()


def _generate(
    model, prompt_ids, params, cache, n_canvases, row_seed, rng, constraints, on_step
) -> GenerateResult:
    cfg = model.config
    model.encode(TokenBatch.from_lists([prompt_ids], [0], cfg.pad_token_id, model.device), [cache])
    tokens: list[int] = []
    steps: list[int] = []
    canvases: list[list[int]] = []
    finish = "length"
    for c in range(n_canvases):
        constraint = constraints[c] if constraints else None
        row = RowState.start(
            params,
            cfg.vocab_size,
            cfg.canvas_length,
            row_seed,
            constraint,
            canvas_index=c,
            device=model.device,
        )
        prefix = PrefixBatch([cache])
        while not row.finished:
            soft = row.soft[None] if row.soft is not None else None
            hidden = model.denoise(row.canvas[None], prefix, soft)
            step(model, hidden, [row], rng)
            if on_step is not None:
                on_step(c, row)
        committed = row.argmax.tolist()
        canvases.append(committed)
        steps.append(row.steps)
        outcome = canvas_outcome(
            committed,
            delivered_so_far=len(tokens),
            max_new_tokens=params.max_new_tokens,
            eos_ids=cfg.eos_token_ids,
            template_canvases=len(constraints) if constraints else None,
            canvas_index=c,
        )
        tokens.extend(outcome.delivered)
        if outcome.finish_reason is not None:
            finish = outcome.finish_reason
            break
        model.encode(
            TokenBatch.from_lists([committed], [cache.length], cfg.pad_token_id, model.device), [cache]
        )
    return GenerateResult(tokens, steps, len(tokens) / max(1, sum(steps)), finish, canvases)
