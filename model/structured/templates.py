"""Templates for structured generation: fixed text + typed slots -> per-position canvas constraints.

Block diffusion denoises a canvas of L positions in parallel, so structure can be fixed in place
and the model fills the gaps with context from both sides (infill; schema-guaranteed JSON via
`model/structured/json_schema.py`). This module is the pure layer around the sampler:

    Template --layout()--> Layout: per position a PINNED id or an ALLOWED-TOKEN class
    generated ids --fill()--> FilledTemplate: the text plus each slot's content

Rules (docs/STRUCTURED.md has the full write-up):
- Each `Fixed` part is tokenized on its own, so its pinned ids spell exactly its UTF-8 bytes
  (checked; a tokenizer that does not round-trip is refused) and the result reproduces it exactly.
- A slot of `max_tokens` positions may use fewer: the pad id is the filler, allowed at every slot
  position (anywhere, not only at the end) and dropped from the result.
- Each slot's remaining tokens are turned into bytes (`token_bytes`) and decoded on their own as
  UTF-8 with U+FFFD replacement, then normalised by kind (see `SLOT_KINDS`).
- Positions are padded with pinned pad ids up to a multiple of the canvas length; a slot may
  straddle a canvas boundary.

Shape legend: P positions of the whole layout (a multiple of L), L canvas length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from model.structured.token_classes import TokenClass, TokenClasses, token_classes_for

# kind -> what a position allows (besides the filler) and how the slot's text is normalised.
SLOT_KINDS = {
    "free": "any token that spells bytes (no special tokens); text as generated",
    "json_string_body": "tokens without '\"', '\\\\' or control bytes; with max_chars, the decoded text "
    "has at most max_chars code points",
    "json_minus": "one position: a token spelling '-'; text is '-' or ''",
    "json_int_digits": "ASCII-digit tokens; leading zeros stripped, empty -> '0'",
    "json_frac_digits": "ASCII-digit tokens; empty -> '0'",
    "choice": "spellings of `options`; text is the option sharing the longest token prefix with the "
    "generated tokens (exact match first, ties -> earliest option)",
}


class TemplateError(ValueError):
    """A template that cannot be laid out; the message says what to change."""


class Tokenizer(Protocol):
    """What structured generation needs from `model/tokenizer.py`."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class Fixed:
    """Text laid out as pinned tokens and returned byte-exact."""

    text: str


@dataclass(frozen=True)
class Slot:
    """A gap of up to `max_tokens` generated tokens, constrained by `kind` (see SLOT_KINDS)."""

    name: str
    max_tokens: int
    kind: str = "free"
    max_chars: int | None = None  # json_string_body only: bound on the decoded code points
    options: tuple[str, ...] = ()  # choice only: the literal texts the slot resolves to
    min_tokens: int = 0  # fewest non-filler tokens (free / json_string_body slots)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        _check_slot(self)


def _check_slot(slot: Slot) -> None:
    where = f"slot {slot.name!r}"
    if not isinstance(slot.name, str) or not slot.name:
        raise TemplateError(f"slot names must be non-empty strings, got {slot.name!r}")
    if slot.kind not in SLOT_KINDS:
        raise TemplateError(f"{where} has unknown kind {slot.kind!r}; use one of {sorted(SLOT_KINDS)}")
    if isinstance(slot.max_tokens, bool) or not isinstance(slot.max_tokens, int) or slot.max_tokens < 1:
        raise TemplateError(
            f"{where} has max_tokens {slot.max_tokens!r}; give an integer >= 1 or drop the slot"
        )
    if (
        isinstance(slot.min_tokens, bool)
        or not isinstance(slot.min_tokens, int)
        or not (0 <= slot.min_tokens <= slot.max_tokens)
    ):
        raise TemplateError(
            f"{where} has min_tokens {slot.min_tokens!r}; give an integer in [0, max_tokens={slot.max_tokens}]"
        )
    if slot.min_tokens and slot.kind not in ("free", "json_string_body"):
        raise TemplateError(f"{where}: min_tokens only applies to kinds free and json_string_body")
    if slot.kind == "json_minus" and slot.max_tokens != 1:
        raise TemplateError(
            f"{where}: kind json_minus takes exactly 1 position, got max_tokens {slot.max_tokens}"
        )
    if slot.max_chars is not None and (slot.kind != "json_string_body" or slot.max_chars < 0):
        raise TemplateError(f"{where}: max_chars is a bound >= 0 and only applies to kind json_string_body")
    if slot.kind == "choice":
        if not slot.options or len(set(slot.options)) != len(slot.options):
            raise TemplateError(f"{where}: a choice needs at least one option and no duplicates")
        if not all(isinstance(o, str) and o for o in slot.options):
            raise TemplateError(f"{where}: choice options must be non-empty strings")
    elif slot.options:
        raise TemplateError(f"{where}: options only apply to kind choice")


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds a request's template must respect (the server's knobs)."""

    max_slot_tokens: int = 4096
    max_positions: int = 65536  # fixed tokens + slot positions, before padding to canvases


@dataclass(frozen=True)
class Template:
    """Ordered `Fixed` / `Slot` parts. Structure is checked on construction."""

    parts: tuple[Fixed | Slot, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise TemplateError("empty template: give at least one fixed text or slot")
        names: set[str] = set()
        for index, part in enumerate(self.parts):
            if isinstance(part, Fixed):
                if not isinstance(part.text, str) or not part.text:
                    raise TemplateError(f"part {index} is an empty fixed text; drop it")
            elif isinstance(part, Slot):
                if part.name in names:
                    raise TemplateError(f"slot name {part.name!r} is used twice; slot names must be unique")
                names.add(part.name)
            else:
                raise TemplateError(f"part {index} is a {type(part).__name__}; parts must be Fixed or Slot")

    @property
    def slots(self) -> list[Slot]:
        return [p for p in self.parts if isinstance(p, Slot)]

    def check(self, limits: TemplateLimits) -> None:
        for slot in self.slots:
            if slot.max_tokens > limits.max_slot_tokens:
                raise TemplateError(
                    f"slot {slot.name!r} asks for {slot.max_tokens} tokens; the limit is {limits.max_slot_tokens}"
                )


@dataclass(frozen=True)
class _Segment:
    part: Fixed | Slot
    start: int
    end: int
    option_ids: tuple[tuple[int, ...], ...] = ()  # choice: each option's pinned-style spelling


@dataclass(frozen=True, eq=False)
class Layout:
    """Per-position constraints of a template over `num_canvases` canvases of `canvas_length`.

    pin_ids[p] >= 0 pins position p to that id (-1: generated). class_ids[p] > 0 indexes
    class_masks, the allowed ids of a generated position; 0 = unconstrained (pinned positions).
    Every class mask allows the pad id (the slot filler).
    """

    canvas_length: int
    pin_ids: torch.Tensor  # [P] int64
    class_ids: torch.Tensor  # [P] int64
    class_masks: list[torch.Tensor | None]  # [0] is None; others [V] bool
    slot_spans: dict[str, tuple[int, int]]  # name -> [start, end) positions
    num_content_positions: int  # before the pinned pad padding
    pad_id: int
    vocab_size: int  # V of every class mask (TokenClasses.vocab_size)
    segments: tuple[_Segment, ...] = field(repr=False)

    @property
    def num_positions(self) -> int:
        return int(self.pin_ids.shape[0])

    @property
    def slot_minimums(self) -> list[tuple[int, int, int]]:
        """(start, end, min_tokens) of every slot that must hold content."""
        return [
            (s.start, s.end, s.part.min_tokens)
            for s in self.segments
            if isinstance(s.part, Slot) and s.part.min_tokens > 0
        ]

    @property
    def num_canvases(self) -> int:
        return self.num_positions // self.canvas_length

    def canvas(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pin_ids [L], class_ids [L]) of canvas `index`."""
        if not 0 <= index < self.num_canvases:
            raise IndexError(f"canvas {index} out of range; the layout has {self.num_canvases} canvases")
        window = slice(index * self.canvas_length, (index + 1) * self.canvas_length)
        return self.pin_ids[window].clone(), self.class_ids[window].clone()

    def mask_table(self) -> torch.Tensor:
        """[C, V] bool: row c is class_masks[c], row 0 all True, for `table[class_ids]` gathers."""
        return torch.stack([torch.ones(self.vocab_size, dtype=torch.bool), *self.class_masks[1:]])

    def allowed(self, position: int) -> torch.Tensor | None:
        """[V] bool allowed ids at a generated position; None at pinned positions."""
        return self.class_masks[int(self.class_ids[position])]


def _fixed_ids(text: str, tokenizer: Tokenizer, classes: TokenClasses, what: str) -> list[int]:
    try:
        expected = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TemplateError(
            f"{what} {text!r} is not valid Unicode ({exc.reason}); remove lone surrogates"
        ) from exc
    ids = list(tokenizer.encode(text))
    special = [i for i in ids if not classes.token_bytes(i)]
    if special:  # e.g. "<eos>" written in the text, or an encode() that adds <bos>
        raise TemplateError(
            f"{what} {text!r} tokenizes to special token ids {special}; remove special-token text from it"
        )
    spelled = b"".join(classes.token_bytes(i) for i in ids)
    if not ids or spelled != expected:
        raise TemplateError(
            f"{what} {text!r} does not round-trip through the tokenizer (tokens spell {spelled!r}); "
            "structured generation needs a tokenizer whose encode() keeps the exact bytes"
        )
    return ids


def _string_caps(slot: Slot) -> list[int | None]:
    """Per-position char caps summing to max_chars, spread evenly (earlier positions +1)."""
    if slot.max_chars is None:
        return [None] * slot.max_tokens
    base, extra = divmod(slot.max_chars, slot.max_tokens)
    return [base + 1 if i < extra else base for i in range(slot.max_tokens)]


def _slot_keys(slot: Slot, option_ids: Sequence[Sequence[int]]) -> list[TokenClass]:
    if slot.kind == "free":
        return [TokenClass("free")] * slot.max_tokens
    if slot.kind == "json_string_body":
        return [TokenClass("json_string", max_chars=cap) for cap in _string_caps(slot)]
    if slot.kind == "json_minus":
        return [TokenClass("exact", raw=b"-")]
    if slot.kind in ("json_int_digits", "json_frac_digits"):
        return [TokenClass("digits")] * slot.max_tokens
    # choice: position j allows the j-th token of every option long enough (positions past the
    # longest option allow only the filler)
    return [
        TokenClass("ids", ids=tuple(sorted({o[j] for o in option_ids if len(o) > j})))
        for j in range(slot.max_tokens)
    ]


def _lay_part(
    part: Fixed | Slot, tokenizer: Tokenizer, classes: TokenClasses
) -> tuple[list[int], list[TokenClass | None], tuple[tuple[int, ...], ...]]:
    """(pins, class keys, choice option spellings) of one part's positions."""
    if isinstance(part, Fixed):
        ids = _fixed_ids(part.text, tokenizer, classes, "fixed text")
        return ids, [None] * len(ids), ()
    option_ids: tuple[tuple[int, ...], ...] = ()
    if part.kind == "choice":
        option_ids = tuple(tuple(_fixed_ids(o, tokenizer, classes, "choice option")) for o in part.options)
        longest = max(len(o) for o in option_ids)
        if longest > part.max_tokens:
            raise TemplateError(
                f"slot {part.name!r}: an option needs {longest} tokens; raise max_tokens to {longest}"
            )
    return [-1] * part.max_tokens, list(_slot_keys(part, option_ids)), option_ids


def layout(
    template: Template,
    tokenizer: Tokenizer,
    canvas_length: int,
    limits: TemplateLimits | None = None,
    classes: TokenClasses | None = None,
) -> Layout:
    """Lay a template out over canvases of `canvas_length` positions (see module docstring)."""
    limits = limits or TemplateLimits()
    if canvas_length < 1:
        raise TemplateError(f"canvas_length must be >= 1, got {canvas_length}")
    template.check(limits)
    classes = classes or token_classes_for(tokenizer)
    pins: list[int] = []
    keys: list[TokenClass | None] = []
    segments: list[_Segment] = []
    for part in template.parts:
        part_pins, part_keys, option_ids = _lay_part(part, tokenizer, classes)
        segments.append(_Segment(part, len(pins), len(pins) + len(part_pins), option_ids))
        pins += part_pins
        keys += part_keys
    content = len(pins)
    if content > limits.max_positions:
        raise TemplateError(
            f"template needs {content} positions (fixed tokens + slot sizes) but the limit is "
            f"{limits.max_positions}; shorten fixed text or lower slot sizes"
        )
    padded = -(-content // canvas_length) * canvas_length
    pins += [tokenizer.pad_id] * (padded - content)
    keys += [None] * (padded - content)
    index: dict[TokenClass, int] = {}
    for key in keys:
        if key is not None and key not in index:
            index[key] = len(index) + 1
    class_masks: list[torch.Tensor | None] = [None] + [classes.mask(k) for k in index]
    return Layout(
        canvas_length=canvas_length,
        pin_ids=torch.tensor(pins, dtype=torch.int64),
        class_ids=torch.tensor([0 if k is None else index[k] for k in keys], dtype=torch.int64),
        class_masks=class_masks,
        slot_spans={s.part.name: (s.start, s.end) for s in segments if isinstance(s.part, Slot)},
        num_content_positions=content,
        pad_id=tokenizer.pad_id,
        vocab_size=classes.vocab_size,
        segments=tuple(segments),
    )


@dataclass(frozen=True)
class SlotResult:
    """A slot's returned text (after filler removal and normalisation) and its non-filler ids."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class FilledTemplate:
    text: str
    slots: dict[str, SlotResult]


def resolve_choice(option_ids: Sequence[Sequence[int]], generated: Sequence[int]) -> int:
    """Index of the option a choice slot resolves to: an exact spelling wins, else the longest
    common token prefix with the generated (filler-free) tokens, ties to the earliest option."""

    def score(option: Sequence[int]) -> tuple[bool, int]:
        common = 0
        while common < min(len(option), len(generated)) and option[common] == generated[common]:
            common += 1
        return (list(option) == list(generated), common)

    scores = [score(o) for o in option_ids]
    best = max(scores)
    return scores.index(best)


def _slot_text(segment: _Segment, ids: list[int], spelled: bytes) -> str:
    slot = segment.part
    assert isinstance(slot, Slot)
    if slot.kind == "choice":
        return slot.options[resolve_choice(segment.option_ids, ids)]
    text = spelled.decode("utf-8", errors="replace")
    if slot.kind == "json_int_digits":
        return text.lstrip("0") or "0"
    if slot.kind == "json_frac_digits":
        return text or "0"
    return text


def _check_generated(layout: Layout, ids: list[int]) -> None:
    if not layout.num_content_positions <= len(ids) <= layout.num_positions:
        raise ValueError(
            f"got {len(ids)} generated ids; the layout has {layout.num_content_positions} content positions "
            f"({layout.num_positions} with padding)"
        )
    pins = layout.pin_ids.tolist()
    class_ids = layout.class_ids.tolist()
    for position, token in enumerate(ids):
        if pins[position] >= 0 and token != pins[position]:
            raise ValueError(
                f"position {position} is pinned to id {pins[position]} but the sampler produced {token}"
            )
        mask = layout.class_masks[class_ids[position]]
        if mask is not None and not (0 <= token < mask.shape[0] and bool(mask[token])):
            raise ValueError(f"position {position} produced id {token}, outside its allowed set")


def fill(layout: Layout, generated_ids: Sequence[int] | torch.Tensor, tokenizer: Tokenizer) -> FilledTemplate:
    """Assemble the result of a laid-out template from the sampler's ids (all positions, in order).

    Refuses ids that break a pin or an allowed set: the guarantees rest on the sampler keeping them.
    A `constraint.RegularLayout` (schema-constrained output) assembles its own document.
    """
    if getattr(layout, "regular", False):
        return layout.fill(generated_ids, tokenizer.token_bytes)
    ids = (
        generated_ids.tolist() if isinstance(generated_ids, torch.Tensor) else [int(i) for i in generated_ids]
    )
    _check_generated(layout, ids)
    pieces: list[str] = []
    slots: dict[str, SlotResult] = {}
    for segment in layout.segments:
        if isinstance(segment.part, Fixed):
            pieces.append(segment.part.text)
            continue
        kept = [t for t in ids[segment.start : segment.end] if t != layout.pad_id]
        spelled = b"".join(tokenizer.token_bytes(t) for t in kept)
        text = _slot_text(segment, kept, spelled)
        slots[segment.part.name] = SlotResult(text=text, token_ids=kept)
        pieces.append(text)
    return FilledTemplate(text="".join(pieces), slots=slots)
