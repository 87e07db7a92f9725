"""The one rule for what a committed canvas delivers and whether the request ends there.

Used by the plain reference loop (model/sampling/generate.py) and the engine's scheduler, so the two cannot
drift apart. Plain generation delivers exactly `max_new_tokens` tokens (the last canvas trimmed) unless an EOS
token comes first: it stops there and the EOS is not delivered. Template generation (one constraint per canvas)
delivers every canvas whole and ends after the last one; EOS does not stop it.
"""

from __future__ import annotations

from dataclasses import dataclass


def first_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> int | None:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return i
    return None


@dataclass(frozen=True)
class CanvasOutcome:
    delivered: list[int]  # tokens this canvas adds to the request's output
    finish_reason: str | None  # "eos" | "length" | "template", or None: another canvas follows


def canvas_outcome(
    committed: list[int],
    *,
    delivered_so_far: int,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    template_canvases: int | None = None,
    canvas_index: int = 0,
) -> CanvasOutcome:
    """What committed canvas number `canvas_index` delivers, given `delivered_so_far` tokens before it.
    `template_canvases`: the number of canvases of a template request (None for plain generation)."""
    if template_canvases is not None:
        return CanvasOutcome(committed, "template" if canvas_index + 1 >= template_canvases else None)
    eos = first_eos(committed, eos_ids)
    room = max_new_tokens - delivered_so_far
    delivered = committed[: min(room, eos if eos is not None else len(committed))]
    if eos is not None and eos <= room:
        return CanvasOutcome(delivered, "eos")
    if delivered_so_far + len(delivered) >= max_new_tokens:
        return CanvasOutcome(delivered, "length")
    return CanvasOutcome(delivered, None)
