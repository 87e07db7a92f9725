"""Entry point of schema-constrained decoding: (schema, token classes, limits) -> a compiled constraint,
and the per-request layout that the sampler and the result assembly use.

    compile_json_schema(schema, classes, limits) -> CompiledSchema   (cached per (schema, vocabulary, limits))
    RegularLayout(compiled, canvas_length, num_canvases)             (one per request: canvases, fill())

Compilation is CPU work (DFA construction, then a walk of the vocabulary trie per automaton state);
servers run it off their event loop. Bounds (`RegularLimits`) make a too-large schema fail with
`AutomatonTooLarge` (a `ValueError` whose message says what to shrink) instead of eating memory.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.structured.automaton import TokenAutomaton, lift
from model.structured.decode import RegularCanvas, RegularRun
from model.structured.regex import DEAD, AutomatonTooLarge
from model.structured.schema_regular import RegularLimits, schema_dfa
from model.structured.templates import FilledTemplate, SlotResult

_CACHE_SIZE = 64
_cache: OrderedDict[tuple, CompiledSchema] = OrderedDict()
_lock = threading.Lock()


@dataclass(frozen=True, eq=False)
class CompiledSchema:
    """A schema's token automaton for one vocabulary, with what building it cost."""

    automaton: TokenAutomaton
    dfa_states: int
    seconds: float

    @property
    def min_tokens(self) -> int:
        """Fewest tokens of any document (the canvas must offer at least this many positions)."""
        return int(self.automaton.distance[0])


def compile_json_schema(schema: Any, classes: Any, limits: RegularLimits | None = None) -> CompiledSchema:
    """Compile (or fetch from the cache) the constraint of `schema` over the vocabulary of `classes`.

    Raises UnsupportedSchemaError / InvalidSchemaError / AutomatonTooLarge (all ValueErrors)."""
    limits = limits or RegularLimits()
    key = (json.dumps(schema, sort_keys=True), id(classes), classes.vocab_size, limits)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    begin = time.perf_counter()
    dfa = schema_dfa(schema, limits)
    automaton = lift(dfa, classes, deadline=time.monotonic() + limits.max_build_seconds)
    if not np.isfinite(automaton.distance[0]) or automaton.distance[0] >= 1 << 40:
        raise AutomatonTooLarge("no document of this schema can be spelled with this tokenizer's tokens")
    compiled = CompiledSchema(automaton, dfa.num_states, time.perf_counter() - begin)
    with _lock:
        _cache[key] = compiled
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


@dataclass(frozen=True, eq=False)
class RegularLayout:
    """The positions of one constrained request: `num_canvases` canvases of `canvas_length`."""

    compiled: CompiledSchema
    canvas_length: int
    num_canvases: int
    pad_id: int
    regular = True  # marks this layout for `templates.fill`

    @property
    def num_positions(self) -> int:
        return self.canvas_length * self.num_canvases

    @property
    def pin_ids(self) -> torch.Tensor:
        """[P] all -1: no position is pinned (same meaning as `Layout.pin_ids`)."""
        return torch.full((self.num_positions,), -1, dtype=torch.int64)

    def canvases(self) -> list[RegularCanvas]:
        run = RegularRun(self.compiled.automaton, self.num_canvases, self.canvas_length)
        return [RegularCanvas(run, i) for i in range(self.num_canvases)]

    def fill(self, generated_ids, token_bytes) -> FilledTemplate:
        """The document spelled by the ids (fillers dropped); refuses ids outside the language."""
        ids = [int(i) for i in generated_ids]
        state = self.compiled.automaton.run(ids)
        if state == DEAD or not self.compiled.automaton.accept[state]:
            raise ValueError("the generated ids do not spell a complete document of the schema")
        kept = [t for t in ids if t != self.pad_id]
        text = b"".join(token_bytes(t) for t in kept).decode("utf-8")
        return FilledTemplate(text=text, slots={"#": SlotResult(text=text, token_ids=kept)})
