"""Joint constraints: what ties canvas positions together, applied inside the sampler's step.

Two kinds, each a per-request run shared by its canvases and a per-canvas handle in
`CanvasConstraint.joint`:
- `RegularRun` / `RegularCanvas(run, index)`: a regular language over the whole output (a JSON
  Schema compiled by `schema_regular.py`, lifted by `automaton.py`); the automaton state each
  canvas ended in carries over to the next.
- `SlotRun` / `SlotCanvas(run, index)`: template slots that must hold at least `min_tokens`
  non-filler tokens; the filler is a choice weighed against the best content token, not a default.

During one denoising step the sampler walks the vocabulary in chunks; for every regular row
`JointStep.chunk` keeps, per vocabulary block, atom and position, the best temperature-scaled logit and
the probability mass (no per-token noise). `JointStep.finish` then runs two DPs (model/structured/dp.py):
a max-sum DP on the per-atom best logits gives the argmax canvas (the most probable canvas inside the
language, which is what gets committed); a sum-product DP on the per-atom log-masses draws the sampled
canvas's atoms from the exact distribution of the step's per-position product restricted to the
language, and one token per position is then drawn from the softmax restricted to its atom (the
sampler's own draw where it lies in that atom, else from one vocabulary block of logits, recomputed or
kept). Both start in the state the previous canvas was committed in and
must end in a state from which the remaining canvases can still complete the document, so the state
carries across canvas boundaries and the last canvas ends the document (then fillers).

Noise is keyed like the sampler's (a pure function of seed, canvas, step, position and atom / block),
so a row's draw does not depend on its batch-mates; like the sampler's, it depends on the vocabulary chunk
size (a constant), which sets the blocks.

Shape legend: R rows, L canvas, C vocabulary chunk, A atoms, V vocabulary, N vocabulary blocks, P positions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from model.sampling import noise
from model.sampling.categorical import EXP_FLOOR, pick_from_cdf
from model.structured.automaton import TokenAutomaton
from model.structured.dp import best_atoms, goal_states, sample_atoms
from model.structured.regex import DEAD

# index_reduce_ (used for per-atom maxima) is stable in behaviour since torch 1.13 but still labelled beta
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")

# a regular row with at most this many [L, V] logits keeps them instead of recomputing blocks
KEPT_ELEMENTS = 1 << 20
# Sub-streams of a row's keyed noise for joint constraints: tags combined into the sampler's position keys
# (model/sampling/noise.py), so these numbers never coincide with the sampler's own.
_JOINT = 0x4A01
_ATOM, _BLOCK, _TOKEN = 1, 2, 3  # Gumbel per (position, atom); uniform per position: block; token in block


@dataclass(eq=False)
class RegularRun:
    """One request's walk through a token automaton, canvas after canvas."""

    automaton: TokenAutomaton
    num_canvases: int
    canvas_length: int
    end_states: list[int] = field(default_factory=list)  # state after each committed canvas (latest draft)
    _tables: dict = field(default_factory=dict, repr=False)  # (block size, device) -> `token_tables`

    def token_tables(self, B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([V] atom of each token, A where it has none; [V] its row block * (A + 1) + atom in the statistics),
        on `device`: built once per request (block size and device), not at every step."""
        key = (B, str(device))
        if key not in self._tables:
            A = self.automaton.num_atoms
            atom_of = torch.from_numpy(self.automaton.atom_of)
            atom_of = torch.where(atom_of < 0, A, atom_of)
            index = torch.arange(len(atom_of)) // B * (A + 1) + atom_of
            self._tables[key] = (atom_of.to(device), index.to(device))
        return self._tables[key]

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

    def accumulator(self, L: int, keys: torch.Tensor) -> _RowAccumulator:
        return _RowAccumulator(self, L, keys)


class _RowAccumulator:
    """Per vocabulary block, atom and position: the best logit and the probability mass, chunk by chunk.

    Kept block-and-atom-major ([N * (A + 1), L], N vocabulary blocks of B tokens; row a of a block: its
    tokens of atom a, row A: tokens outside every atom) on the scores' device. A chunk is transposed once
    to [C, L], so both statistics are one `index_reduce_` (maximum) and one `index_add_` (mass) over
    contiguous rows of L (a scatter along the vocabulary axis of [L, C] is several times slower on CPU).
    Masses are exp(logit - r) with r the chunk's per-position maximum, kept per block, so a mass never
    overflows; an atom more than ~87 nats below its chunk's best token underflows to zero (see `solve`).

    `solve` needs no per-token noise: the DPs run on the per-atom maxima (argmax) and log-masses (sample),
    then one token per position is found or drawn inside the chosen atom by recomputing the logits of the
    one block that holds it (`logits_of`), only that block's tokens of the atoms wanted there. A block is one
    sampler chunk: on CPU a recomputation costs mostly per call, so fewer, larger blocks are cheaper, and the
    statistics are then smallest ([V / C * (A + 1), L]). A small row (L * V up to `KEPT_ELEMENTS`) keeps its
    logits instead, and nothing is recomputed."""

    def __init__(self, canvas: RegularCanvas, L: int, keys: torch.Tensor):
        self.canvas = canvas
        self.L = L
        self.keys = keys  # [L] int64: this row's keys of the joint-constraint stream at this step
        ta = canvas.run.automaton
        self.A = ta.num_atoms
        self.V = len(ta.atom_of)
        self.index: torch.Tensor | None = None  # [V] block * (A + 1) + atom, on the scores' device

    def _start(self, C: int, device: torch.device) -> None:
        A1, L = self.A + 1, self.L
        # a small row keeps its logits (no recomputation at all)
        self.kept = torch.empty(L, self.V, device=device) if L * self.V <= KEPT_ELEMENTS else None
        self.B = C  # one block per chunk: few recomputation calls (their cost is mostly per call on CPU)
        self.N = -(-self.V // self.B)
        self.atom_of, self.index = self.canvas.run.token_tables(self.B, device)
        self.best = torch.full((self.N * A1, L), float("-inf"), device=device)
        self.mass = torch.zeros(self.N * A1, L, device=device)
        self.ref = torch.zeros(self.N, L, device=device)  # [N, L] reference r of each block's masses
        self.buffer = torch.empty(C, L, device=device)

    def chunk(self, scores: torch.Tensor, start: int) -> None:
        """scores [L, C]: temperature-scaled, masked logits of vocabulary slice [start, start + C)."""
        L, C = scores.shape
        if self.index is None:
            self._start(C, scores.device)
        if start % self.B:
            raise ValueError(f"vocabulary chunks must start on a multiple of {self.B}")
        if self.kept is not None:
            self.kept[:, start : start + C] = scores
        by_token = self.buffer[:C].copy_(scores.T)  # [C, L]
        index = self.index[start : start + C]
        self.best.index_reduce_(0, index, by_token, "amax")  # earlier maxima were -inf: a plain maximum
        lo, hi = start // self.B, -(-(start + C) // self.B)
        rows = slice(lo * (self.A + 1), hi * (self.A + 1))
        best = self.best[rows].view(hi - lo, self.A + 1, L).amax((0, 1))  # [L] the chunk's best logit
        r = torch.where(torch.isinf(best), torch.zeros_like(best), best)  # 0: no allowed token here
        self.ref[lo:hi] = r
        # exp of x below ~-87 leaves the vectorised CPU kernel (20-50x slower per element) and most of a peaked
        # distribution is there: clamped, such a token adds e^-87 of its chunk's best token to its atom
        # (at most V * e^-87 ~ 4e-33 in all), where the exact sum would add less
        self.mass.index_add_(0, index, by_token.sub_(r).clamp_(min=EXP_FLOOR).exp_())

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(best [A, L], its first block [A, L], log-mass [A, L])."""
        shape = (self.N, self.A + 1, self.L)
        stats = self.best.view(shape)
        best, block = stats[:, : self.A].max(0)  # the first block on ties
        # each atom's mass over all blocks, relative to the position's best logit (once here, not per chunk)
        block_best = stats.amax(1)  # [N, L] -inf: a block without an allowed token (and without mass)
        top = block_best.amax(0)  # [L]
        safe = torch.where(torch.isinf(top), 0.0, top)
        scale = torch.where(torch.isinf(block_best), 0.0, torch.exp(self.ref - safe))  # [N, L]
        total = (self.mass.view(shape)[:, : self.A] * scale[:, None, :]).sum(0)  # [A, L]
        log_mass = total.log() + safe
        # an atom with no allowed token has no mass; one far below its chunks' best tokens may underflow to
        # zero mass: its best token's logit is then its log-mass (short by at most log(atom size)), so the
        # DP still sees the path
        log_mass = torch.where(torch.isfinite(best), log_mass, float("-inf"))
        under = torch.isinf(log_mass) & torch.isfinite(best)
        return best, block, torch.where(under, best, log_mass)

    def _block_log_mass(self, atoms: torch.Tensor) -> torch.Tensor:
        """[L, N] log-mass of atom atoms[p] in each vocabulary block at each position p."""
        pos = torch.arange(self.L, device=atoms.device)
        mass = self.mass.view(self.N, self.A + 1, self.L)[:, atoms, pos]  # [N, L]
        return (mass.log() + self.ref).T

    def solve(
        self, argmax: torch.Tensor, sampled: torch.Tensor, logits_of
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The constrained argmax canvas and a constrained draw ([L] token ids each). argmax / sampled [L]:
        the sampler's unconstrained argmax and draw at this step. `logits_of(positions, tokens)`: this
        row's masked, temperature-scaled logits [P, K] at `positions` [P] of token ids `tokens` [K]."""
        run, index = self.canvas.run, self.canvas.index
        ta, start_state, goal = run.automaton, run.start_state(index), run.goal(index)
        if self.kept is not None:
            logits_of = lambda pos, tokens: self.kept[pos][:, tokens]  # noqa: E731
        best, block, log_mass = self._statistics()
        path = best_atoms(ta, best.T.double().cpu().numpy(), start_state, goal)
        gumbel = noise.gumbel(noise.combine(self.keys, _ATOM)[None], 0, self.A)[0]  # [L, A]
        drawn = sample_atoms(
            ta, log_mass.T.double().cpu().numpy(), start_state, goal, gumbel.double().cpu().numpy()
        )
        if path is None or drawn is None:  # cannot happen when the previous canvas ended in a goal state
            raise RuntimeError("regular constraint: no valid canvas from the carried-over state")
        run.record(index, int(path[1][-1]))  # the argmax canvas is committed: the next canvas starts there
        dev = self.best.device
        pos = torch.arange(self.L, device=dev)
        # Where the unconstrained argmax lies in the chosen atom it is that atom's first best token; where
        # the unconstrained draw X lies in the chosen atom it is a draw from the atom's softmax (X given
        # X in the atom), and the recomputed draw elsewhere uses independent noise, so the mixture is exact.
        top_atoms, draw_atoms = torch.from_numpy(path[0]).to(dev), torch.from_numpy(drawn[0]).to(dev)
        picked = torch.zeros_like(draw_atoms)
        if self.N > 1:  # the block of each drawn token, by the blocks' masses of its atom
            masses = self._block_log_mass(draw_atoms)  # [L, N]
            u = noise.uniform(noise.mix(noise.combine(self.keys, _BLOCK)))  # [L]
            picked = _inverse_cdf(masses, u)
            picked = torch.where(torch.isfinite(masses).any(1), picked, block[draw_atoms, pos])  # underflowed
        return self._tokens(
            (top_atoms, block[top_atoms, pos], argmax.to(dev), None),
            (draw_atoms, picked, sampled.to(dev), noise.uniform(noise.mix(noise.combine(self.keys, _TOKEN)))),
            logits_of=logits_of,
        )

    def _tokens(self, *picks, logits_of) -> tuple[torch.Tensor, ...]:
        """Per pick (atoms, blocks, free, u), [L] one token of atom atoms[p] at each position p: free[p] where
        it lies in that atom, else one of the atom's tokens inside vocabulary block blocks[p]: the first best
        (u None) or drawn from the softmax restricted to the atom with uniforms u [L]. `logits_of(positions,
        tokens)`: logits [P, K] at `positions` [P] of token ids `tokens` [K]."""
        todo = [self.atom_of[free] != atoms for atoms, _, free, _ in picks]
        outs = [free.clone() for _, _, free, _ in picks]
        # One call per vocabulary block that some position needs (at most N; the positions of all
        # picks that need a block share it), over only that block's tokens of the atoms wanted there.
        needed = torch.cat([blocks[t] for (_, blocks, _, _), t in zip(picks, todo, strict=True)])
        for b in torch.unique(needed).tolist():
            lo, hi = b * self.B, min(self.V, (b + 1) * self.B)
            here = [t & (blocks == b) for (_, blocks, _, _), t in zip(picks, todo, strict=True)]
            where = torch.nonzero(torch.stack(here).any(0))[:, 0]
            wanted = torch.cat([atoms[mine] for (atoms, _, _, _), mine in zip(picks, here, strict=True)])
            tokens = torch.nonzero(torch.isin(self.atom_of[lo:hi], wanted))[:, 0] + lo  # ascending
            logits = logits_of(where, tokens)  # [P, K]
            for (atoms, _, _, u), out, mine in zip(picks, outs, here, strict=True):
                rows = torch.nonzero(mine[where])[:, 0]
                if len(rows) == 0:
                    continue
                p = where[rows]
                scores = logits[rows].masked_fill_(
                    self.atom_of[tokens][None, :] != atoms[p, None], float("-inf")
                )
                at = scores.argmax(-1) if u is None else _inverse_cdf(scores, u[p])  # argmax: the first best
                out[p] = tokens[at]
        return tuple(outs)


def _inverse_cdf(log_weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[P] index drawn from each row of log_weights [P, K] (-inf: excluded; each row has a finite entry) with
    uniforms u [P] in (0, 1). The index's probability is its weight's share up to the rounding of the
    cumulative sum in the weights' dtype (float32: ~1e-7 of the row's mass, as fine as 24-bit uniforms)."""
    top = log_weights.amax(-1, keepdim=True)
    cum = torch.cumsum(torch.exp(log_weights - top), -1)  # exp(-inf) = 0: an excluded entry owns no interval
    return pick_from_cdf(cum, u.to(cum.dtype)[:, None] * cum[:, -1:])[:, 0]


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

    def accumulator(self, L: int, keys: torch.Tensor) -> _SlotAccumulator:
        return _SlotAccumulator(self, L, keys)


class _SlotAccumulator:
    """Per position: the filler's score and the best other allowed token (id and score), chunk by chunk,
    for the logits (0) and for the logits plus keyed Gumbel noise (1): the sampled side is a perturb-and-MAP
    draw, and its per-token noise (the sampler's own Gumbel stream) is computed here, for slot rows only."""

    def __init__(self, canvas: SlotCanvas, L: int, keys: torch.Tensor):
        self.canvas = canvas
        self.keys = keys[None]  # [1, L] the sampler's Gumbel position keys of this row
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

    def observe(self, logits: torch.Tensor, start: int) -> None:
        """logits [L, C] of vocabulary slice [start, start + C)."""
        self.chunk(0, logits, start)
        self.chunk(1, noise.gumbel(self.keys, start, start + logits.shape[1])[0].add_(logits), start)

    def gumbel_max(self) -> torch.Tensor:
        """[L] the unconstrained per-token Gumbel-max draw of the keys seen (the filler or the best other)."""
        pad = torch.full_like(self.arg[1], self.canvas.run.pad_id)
        return torch.where(self.pad[1] > self.best[1], pad, self.arg[1])

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
    """The joint-constraint part of one sampler step over a group of rows (regular languages, slot minimums).

    The sampler calls `begin` with the group's rows and their Gumbel position keys, `chunk` with every
    vocabulary chunk's masked, temperature-scaled logits, and `finish` with its argmax and sampled canvases
    and a way to recompute logits of a few positions over one vocabulary block. Regular rows need no
    per-token noise (see `_RowAccumulator`); slot rows draw theirs here."""

    def __init__(self, rows: list, L: int, keys: torch.Tensor):
        joint_keys = noise.combine(keys, _JOINT)  # [R, L]
        self.rows = {}
        for r, row in enumerate(rows):
            joint = row.constraint.joint if row.constraint is not None else None
            if isinstance(joint, RegularCanvas):
                self.rows[r] = joint.accumulator(L, joint_keys[r])
            elif joint is not None:
                self.rows[r] = joint.accumulator(L, keys[r])

    @classmethod
    def begin(cls, rows: list, L: int, keys: torch.Tensor) -> JointStep | None:
        """None when no row carries a joint constraint (the sampler then skips every hook). keys [R, L]: the
        rows' Gumbel position keys at this step (a pure function of seed, canvas, step, position)."""
        if all(row.constraint is None or row.constraint.joint is None for row in rows):
            return None
        return cls(rows, L, keys)

    def chunk(self, logits: torch.Tensor, start: int) -> None:
        """logits [R, L, C] of vocabulary slice [start, start + C), temperature-scaled and masked."""
        # statistics stay on the sampler's device; only [A, L]-sized ones reach the host's DPs
        for r, acc in self.rows.items():
            if isinstance(acc, _RowAccumulator):
                acc.chunk(logits[r], start)
            else:
                acc.observe(logits[r], start)

    def finish(
        self, argmax: torch.Tensor, sampled: torch.Tensor, logits_of
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace constrained rows' argmax / sampled canvases [R, L] by constrained ones. `logits_of(row,
        positions, tokens)`: the logits `chunk` saw, recomputed for a few positions and tokens of one row."""
        argmax, sampled = argmax.clone(), sampled.clone()
        for r, acc in self.rows.items():
            if isinstance(acc, _RowAccumulator):
                top, draw = acc.solve(
                    argmax[r], sampled[r], lambda pos, tokens, r=r: logits_of(r, pos, tokens)
                )
                argmax[r], sampled[r] = top.to(argmax.device), draw.to(sampled.device)
            else:
                argmax[r] = acc.solve(0, argmax[r].cpu()).to(argmax.device)
                sampled[r] = acc.solve(1, acc.gumbel_max()).to(sampled.device)
        return argmax, sampled
