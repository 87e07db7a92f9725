"""Joint constraints: what ties canvas positions together, applied inside the sampler's step.

Two kinds, each a per-request run shared by its canvases and a per-canvas handle in
`CanvasConstraint.joint`:
- `RegularRun` / `RegularCanvas(run, index)`: a regular language over the whole output (a JSON
  Schema compiled by `schema_regular.py`, lifted by `automaton.py`); the automaton state each
  canvas ended in carries over to the next.
- `SlotRun` / `SlotCanvas(run, index)`: template slots that must hold at least `min_tokens`
  non-filler tokens; the filler is a choice weighed against the best content token, not a default.

During one denoising step the sampler walks the vocabulary in chunks; for every constrained row
`JointStep.chunk` keeps (regular languages), per position and atom, the best temperature-scaled logit and the best
Gumbel-perturbed key with their token ids. `RegularStep.finish` then runs the DP twice: on the
logits (the argmax canvas: the most probable canvas inside the language, which is what gets
committed) and on the keys (the sampled canvas, a perturb-and-MAP draw inside the language).
Both start in the state the previous canvas was committed in and must end in a state from which
the remaining canvases can still complete the document, so the state carries across canvas
boundaries and the last canvas ends the document (then fillers).

Shape legend: R rows, L canvas, C vocabulary chunk, A atoms, V vocabulary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from model.structured.automaton import TokenAutomaton
from model.structured.dp import best_atoms, goal_states
from model.structured.regex import DEAD

# index_reduce_ (used for per-atom maxima) is stable in behaviour since torch 1.13 but still labelled beta
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")


@dataclass(eq=False)
class RegularRun:
    """One request's walk through a token automaton, canvas after canvas."""

    automaton: TokenAutomaton
    num_canvases: int
    canvas_length: int
    end_states: list[int] = field(default_factory=list)  # state after each committed canvas (latest draft)

    def start_state(self, index: int) -> int:
        return 0 if index == 0 else self.end_states[index - 1]

    def goal(self, index: int) -> np.ndarray:
        return goal_states(self.automaton, (self.num_canvases - index - 1) * self.canvas_length)

    def record(self, index: int, state: int) -> None:
        while len(self.end_states) <= index:
            self.end_states.append(DEAD)
        self.end_states[index] = state


@dataclass(eq=False)
class RegularCanvas:
    run: RegularRun
    index: int

    def accumulator(self, L: int) -> _RowAccumulator:
        return _RowAccumulator(self, L)


class _RowAccumulator:
    """Per-position, per-atom best logit / key and their token ids, merged chunk by chunk.

    Kept atom-major ([A + 1, L], row A: tokens outside every atom) on the scores' device: a chunk is
    transposed once to [C, L] so each per-atom maximum is an `index_reduce_` over contiguous rows of L
    (a scatter along the vocabulary axis of [L, C] is several times slower on CPU). Token ids travel as
    negated float32 (exact below 2^24), so the first (smallest) id of a tie wins with one more `amax`."""

    def __init__(self, canvas: RegularCanvas, L: int):
        self.canvas = canvas
        self.L = L
        self.atom_of: torch.Tensor | None = None  # [V] on the scores' device, made on the first chunk
        self.best: list[torch.Tensor] = []  # logits, keys: [A + 1, L]
        self.arg: list[torch.Tensor] = []  # [A + 1, L] token ids

    def _start(self, device: torch.device) -> None:
        ta = self.canvas.run.automaton
        A = ta.num_atoms
        atom_of = torch.from_numpy(ta.atom_of)
        self.atom_of = torch.where(atom_of < 0, A, atom_of).to(device)
        self.best = [torch.full((A + 1, self.L), float("-inf"), device=device) for _ in range(2)]
        self.arg = [torch.zeros(A + 1, self.L, dtype=torch.long, device=device) for _ in range(2)]

    def chunk(self, which: int, scores: torch.Tensor, start: int) -> None:
        L, C = scores.shape
        if self.atom_of is None:
            self._start(scores.device)
        atoms = self.atom_of[start : start + C]  # [C]
        rows = self.best[which].shape[0]
        by_token = scores.T.contiguous()  # [C, L]
        top = torch.full((rows, L), float("-inf"), device=scores.device).index_reduce_(
            0, atoms, by_token, "amax"
        )  # [A + 1, L]
        neg_ids = -torch.arange(start, start + C, device=scores.device, dtype=torch.float32)[:, None]
        ids = torch.where(by_token == top[atoms], neg_ids, float("-inf"))  # [C, L]
        first = torch.full((rows, L), float("-inf"), device=scores.device).index_reduce_(
            0, atoms, ids, "amax"
        )
        better = top > self.best[which]  # earlier chunks win ties, as in the unconstrained argmax
        self.best[which] = torch.where(better, top, self.best[which])
        self.arg[which] = torch.where(better, (-first).long(), self.arg[which])

    def solve(self, which: int, current: torch.Tensor) -> torch.Tensor:
        run, index = self.canvas.run, self.canvas.index
        scores = self.best[which][:-1].T.double().cpu().numpy()  # [L, A]: the DP runs on the host
        path = best_atoms(run.automaton, scores, run.start_state(index), run.goal(index))
        if path is None:  # cannot happen when the previous canvas ended in a goal state
            raise RuntimeError("regular constraint: no valid canvas from the carried-over state")
        atoms, states = path
        if which == 0:  # the argmax canvas is what gets committed: the next canvas starts where it ends
            run.record(index, int(states[-1]))
        arg = self.arg[which]
        return arg[torch.from_numpy(atoms).to(arg.device), torch.arange(len(atoms), device=arg.device)].cpu()


@dataclass(eq=False)
class SlotRun:
    """Slots that must hold at least `minimum` non-filler tokens: (start, end, minimum) in layout positions."""

    spans: list[tuple[int, int, int]]
    canvas_length: int
    pad_id: int
    counts: dict[tuple[int, int], int] = field(default_factory=dict)  # (canvas, slot) -> non-filler tokens

    def needs(self, index: int) -> list[tuple[int, int, int, int]]:
        """(slot, lo, hi, need) per slot overlapping canvas `index`: canvas positions [lo, hi) must hold
        `need` non-filler tokens, given what earlier canvases committed and what later ones can still hold."""
        L = self.canvas_length
        out = []
        for k, (start, end, minimum) in enumerate(self.spans):
            lo, hi = max(start, index * L), min(end, (index + 1) * L)
            if lo >= hi:
                continue
            before = sum(self.counts.get((i, k), 0) for i in range(index))
            later = max(0, end - (index + 1) * L)
            out.append((k, lo - index * L, hi - index * L, max(0, minimum - before - later)))
        return out


@dataclass(eq=False)
class SlotCanvas:
    run: SlotRun
    index: int

    def accumulator(self, L: int) -> _SlotAccumulator:
        return _SlotAccumulator(self, L)


class _SlotAccumulator:
    """Per position: the filler's score and the best other allowed token (id and score), chunk by chunk."""

    def __init__(self, canvas: SlotCanvas, L: int):
        self.canvas = canvas
        self.pad = [torch.full((L,), float("-inf")) for _ in range(2)]
        self.best = [torch.full((L,), float("-inf")) for _ in range(2)]
        self.arg = [torch.zeros(L, dtype=torch.long) for _ in range(2)]

    def chunk(self, which: int, scores: torch.Tensor, start: int) -> None:
        pad = self.canvas.run.pad_id
        if start <= pad < start + scores.shape[1]:
            self.pad[which] = scores[:, pad - start].clone()
            scores = scores.clone()
            scores[:, pad - start] = float("-inf")
        top, idx = scores.max(-1)
        better = top > self.best[which]
        self.best[which] = torch.where(better, top, self.best[which])
        self.arg[which] = torch.where(better, idx + start, self.arg[which])

    def solve(self, which: int, current: torch.Tensor) -> torch.Tensor:
        """The best canvas with each slot's minimum: start from the unconstrained choice (filler where it
        scores higher), then turn the cheapest filler positions into content until the minimum holds."""
        run = self.canvas.run
        tokens = current.clone()
        for k, lo, hi, need in run.needs(self.canvas.index):
            span = slice(lo, hi)
            content = tokens[span] != run.pad_id
            missing = need - int(content.sum())
            if missing > 0:
                loss = torch.where(content, float("inf"), self.pad[which][span] - self.best[which][span])
                loss = torch.where(torch.isfinite(self.best[which][span]), loss, float("inf"))
                flip = torch.argsort(loss, stable=True)[:missing]
                flip = flip[torch.isfinite(loss[flip])]
                tokens[lo + flip] = self.arg[which][lo + flip]
            if which == 0:
                run.counts[(self.canvas.index, k)] = int((tokens[span] != run.pad_id).sum())
        return tokens


class JointStep:
    """The joint-constraint part of one sampler step over a group of rows (regular languages, slot minimums)."""

    def __init__(self, rows: list, L: int):
        self.rows = {
            r: row.constraint.joint.accumulator(L)
            for r, row in enumerate(rows)
            if row.constraint is not None and row.constraint.joint is not None
        }

    @classmethod
    def begin(cls, rows: list, L: int) -> JointStep | None:
        """None when no row carries a joint constraint (the sampler then skips every hook)."""
        step = cls(rows, L)
        return step if step.rows else None

    def chunk(self, logits: torch.Tensor, keys: torch.Tensor, start: int) -> None:
        """logits, keys [R, L, C] of vocabulary slice [start, start + C), already masked."""
        # the per-atom maxima stay on the sampler's device; only [A, L] per row reaches the host's DP
        for r, acc in self.rows.items():
            acc.chunk(0, logits[r], start)
            acc.chunk(1, keys[r], start)

    def finish(self, argmax: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace constrained rows' argmax / sampled canvases [R, L] by the constrained optimum."""
        argmax, sampled = argmax.clone(), sampled.clone()
        for r, acc in self.rows.items():
            argmax[r] = acc.solve(0, argmax[r].cpu()).to(argmax.device)
            sampled[r] = acc.solve(1, sampled[r].cpu()).to(sampled.device)
        return argmax, sampled
