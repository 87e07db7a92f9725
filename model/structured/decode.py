"""Joint constraints: what ties canvas positions together, applied inside the sampler's step.

Two kinds, each a per-request run shared by its canvases and a per-canvas handle in
`CanvasConstraint.joint`:
- `RegularRun` / `RegularCanvas(run, index)`: a regular language over the whole output (a JSON
  Schema compiled by `schema_regular.py`, lifted by `automaton.py`); the automaton state each
  canvas ended in carries over to the next.
- `SlotRun` / `SlotCanvas(run, index)`: template slots that must hold at least `min_tokens`
  non-filler tokens; the filler is a choice weighed against the best content token, not a default.

During one denoising step the sampler walks the vocabulary in chunks; for every regular row
`JointStep.chunk` keeps, per vocabulary block, position and atom, the best temperature-scaled logit, its
first token and the probability mass (from the sampler's exp values; no per-token noise).
`JointStep.finish` then runs two DPs (model/structured/dp.py): a max-sum DP on the per-atom best logits
gives the argmax canvas (the most probable canvas inside the language, which is what gets committed; its
tokens are the kept first-best tokens); a sum-product DP on the per-atom log-masses draws the sampled
canvas's atoms from the exact distribution of the step's per-position product restricted to the
language, and one token per sampled position is then drawn from the softmax restricted to its atom (the
sampler's own draw where it lies in that atom, else from one vocabulary block of logits, recomputed or
kept). Both start in the state the previous canvas was committed in and must end in a state from which
the remaining canvases can still complete the document, so the state carries across canvas boundaries
and the last canvas ends the document (then fillers).

Noise is keyed like the sampler's (a pure function of seed, canvas, step, position and atom / block),
so a row's draw does not depend on its batch-mates; like the sampler's, it depends on the vocabulary chunk
size (a constant), which sets the blocks.

Shape legend: R rows, L canvas, C vocabulary chunk, A atoms, V vocabulary, N vocabulary blocks, P positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.sampling import noise
from model.sampling.categorical import pick_from_cdf
from model.structured.atom_stats import AtomOrder, atom_index, chunk_stats, chunk_stats_torch
from model.structured.automaton import TokenAutomaton
from model.structured.dp import best_atoms, goal_states, sample_atoms
from model.structured.regex import DEAD

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

    def atom_order(self, B: int) -> AtomOrder:
        """The allowed tokens sorted by (block of B tokens, atom): built once per automaton, not every step."""
        return AtomOrder.of(self.automaton, B)

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


def _host(t: torch.Tensor) -> np.ndarray:
    """A contiguous host view (a copy only when the tensor is elsewhere or strided)."""
    return t.detach().cpu().contiguous().numpy()


class _RowAccumulator:
    """Per vocabulary block, position and atom: the best logit, its first token and the probability mass.

    Kept host-side as [N, L, A] (N vocabulary blocks of B tokens, one block per sampler chunk), filled by the
    compiled `chunk_stats` from each chunk's logits and the sampler's exp values e = exp(logit - r), r the
    sampler's running maximum at that chunk (kept per block in `ref`): nothing is transposed, scattered or
    exponentiated again. Logits on an accelerator stay there: `chunk_stats_torch` fills the same arrays on
    their device, and they reach the host once per step, when `solve` starts (`_to_host`); the choice depends
    only on the device (`device_stats` forces it, for tests). The sampler zeroes e more than ~87 nats under
    r, so such an atom may have zero mass in every block; `_statistics` then stands its best logit in for its
    log-mass (see there).

    `solve` needs no per-token noise: the DPs run on the per-atom maxima (argmax) and log-masses (sample).
    The argmax canvas's tokens are the kept first-best tokens. A sampled position whose unconstrained draw
    lies outside its chosen atom draws a block by the atom's per-block masses, then a token of the atom in
    that block from logits recomputed for it (`logits_of`), one call per block that some position needs. A
    small row (L * V up to `KEPT_ELEMENTS`) keeps its logits instead, and nothing is recomputed."""

    device_stats: bool | None = None  # torch statistics where the logits are; None: off the CPU only

    def __init__(self, canvas: RegularCanvas, L: int, keys: torch.Tensor):
        self.canvas = canvas
        self.L = L
        self.keys = keys  # [L] int64: this row's keys of the joint-constraint stream at this step
        ta = canvas.run.automaton
        self.A = ta.num_atoms
        self.V = len(ta.atom_of)
        self.order: AtomOrder | None = None
        self.atoms: torch.Tensor | None = None  # [V] the torch path's atom of each token, until `_to_host`

    def _start(self, C: int, device: torch.device) -> None:
        A, L = self.A, self.L
        keep = L * self.V <= KEPT_ELEMENTS
        self.B = C  # one block per chunk: few recomputation calls (their cost is mostly per call on CPU)
        self.N = -(-self.V // self.B)
        self.order = self.canvas.run.atom_order(self.B)
        self.device = device  # the logits' device: `logits_of` takes its indices there
        on_device = device.type != "cpu" if self.device_stats is None else self.device_stats
        # the torch path's tables and statistics on the logits' device; None: the compiled host pass
        self.atoms = atom_index(self.canvas.run.automaton, device) if on_device else None
        if on_device:
            self.kept = torch.empty((L, self.V), device=device) if keep else None
            self.best = torch.empty((self.N, L, A), device=device)
            self.arg = torch.empty((self.N, L, A), dtype=torch.long, device=device)
            self.mass = torch.empty((self.N, L, A), device=device)
            self.ref = torch.zeros((self.N, L), device=device)
            return
        self.kept = np.empty((L, self.V), np.float32) if keep else None
        self.best = np.empty((self.N, L, A), np.float32)
        self.arg = np.empty((self.N, L, A), np.int64)
        self.mass = np.empty((self.N, L, A), np.float32)  # sums of e, at most C each
        self.ref = np.zeros((self.N, L))

    def chunk(self, scores: torch.Tensor, start: int, e: torch.Tensor, ref: torch.Tensor) -> None:
        """scores [L, C]: temperature-scaled, masked logits of vocabulary slice [start, start + C); e [L, C]:
        exp(scores - ref) (0 where masked or far below), ref [L] finite (the sampler's running maximum)."""
        L, C = scores.shape
        if self.order is None:
            self._start(C, scores.device)
        if start % self.B:
            raise ValueError(f"vocabulary chunks must start on a multiple of {self.B}")
        b = start // self.B
        if self.atoms is not None:  # on the logits' device: no copy to the host here
            if self.kept is not None:
                self.kept[:, start : start + C] = scores
            stats = chunk_stats_torch(scores, e, self.atoms[start : start + C], self.A, start)
            self.best[b], self.arg[b], self.mass[b] = stats
            self.ref[b] = ref
            return
        x = _host(scores)
        if self.kept is not None:
            self.kept[:, start : start + C] = x
        o = self.order
        chunk_stats(x, _host(e), o.offsets, o.bounds, b, start, self.best[b], self.arg[b], self.mass[b])
        self.ref[b] = _host(ref)

    def _to_host(self) -> None:
        """The torch path's statistics (and kept logits) as the host arrays the DPs read: one copy each per
        step, of [N, L, A] (and [N, L]; [L, V] only for a small row), not of the [L, V] logits."""
        self.keys = self.keys.cpu()  # [L]: the draws' keyed noise is made on the host, as the DPs run there
        if self.atoms is None:
            return
        self.atoms = None
        self.best, self.arg, self.mass = (_host(t) for t in (self.best, self.arg, self.mass))
        self.ref = _host(self.ref).astype(np.float64)
        self.kept = None if self.kept is None else _host(self.kept)

    def _statistics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(best [L, A] float64, its first block [L, A], log-mass [L, A], per-block mass scale [N, L])."""
        if self.N == 1:  # a small vocabulary: nothing to merge
            block = np.zeros((self.L, self.A), np.int64)
            best = self.best[0].astype(np.float64)
        else:
            block = self.best.argmax(0)  # [L, A] the first block on ties
            best = np.take_along_axis(self.best, block[None], 0)[0].astype(np.float64)
        # each atom's mass over all blocks, relative to the position's best logit
        top = best.max(1)  # [L] -inf: no allowed token at all
        safe = np.where(np.isinf(top), 0.0, top)
        # a block with mass has a token above ref - 87, so ref - safe < 87 there; the cap keeps the others finite
        scale = np.exp(np.minimum(self.ref - safe, 700.0))  # [N, L]
        if self.N == 1:
            total = self.mass[0] * scale[0][:, None]  # [L, A]
        else:
            total = np.einsum("nla,nl->la", self.mass, scale)
        with np.errstate(divide="ignore"):
            log_mass = np.log(total) + safe[:, None]
        # an atom with no allowed token has no mass; one far below the running maximum may underflow to zero
        # mass: its best token's logit is then its log-mass (short by at most log(atom size)), so the DP still
        # sees the path
        log_mass = np.where(np.isfinite(best), log_mass, -np.inf)
        under = np.isinf(log_mass) & np.isfinite(best)
        return best, block, np.where(under, best, log_mass), scale

    def solve(
        self, argmax: torch.Tensor, sampled: torch.Tensor, logits_of
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The constrained argmax canvas and a constrained draw ([L] token ids each). argmax / sampled [L]:
        the sampler's unconstrained argmax and draw at this step. `logits_of(positions, tokens)`: this
        row's masked, temperature-scaled logits [P, K] at `positions` [P] of token ids `tokens` [K]."""
        run, index = self.canvas.run, self.canvas.index
        ta, start_state, goal = run.automaton, run.start_state(index), run.goal(index)
        self._to_host()
        if self.kept is not None:
            kept = self.kept

            def logits_of(pos, tokens):
                return torch.from_numpy(kept[np.ix_(pos.cpu().numpy(), tokens.cpu().numpy())])

        best, block, log_mass, scale = self._statistics()
        path = best_atoms(ta, best, start_state, goal)
        gumbel = noise.gumbel(noise.combine(self.keys, _ATOM)[None], 0, self.A)[0]  # [L, A]
        drawn = sample_atoms(ta, log_mass, start_state, goal, gumbel.double().numpy())
        if path is None or drawn is None:  # cannot happen when the previous canvas ended in a goal state
            raise RuntimeError("regular constraint: no valid canvas from the carried-over state")
        run.record(index, int(path[1][-1]))  # the argmax canvas is committed: the next canvas starts there
        pos = np.arange(self.L)
        top_atoms, draw_atoms = path[0], drawn[0]
        top = self.arg[block[pos, top_atoms], pos, top_atoms]  # the atom's first best token
        return torch.from_numpy(top), self._draw(draw_atoms, scale, _host(sampled), logits_of)

    def _draw(self, atoms: np.ndarray, scale: np.ndarray, free: np.ndarray, logits_of) -> torch.Tensor:
        """[L] one token of atom atoms[p] at each position p, drawn from the softmax restricted to it: free[p]
        (the sampler's unconstrained draw) where it lies in that atom — a draw from the atom's softmax given it
        landed there — else a block by the atom's per-block masses, then a token of the atom in that block,
        with independent keyed uniforms, so the mixture is exact."""
        out = free.astype(np.int64)
        todo = np.nonzero(self.canvas.run.automaton.atom_of[free] != atoms)[0]
        if len(todo) == 0:
            return torch.from_numpy(out)
        wanted = atoms[todo]
        blocks = np.zeros(len(todo), np.int64)
        keys = self.keys[torch.from_numpy(todo)]
        if self.N > 1:  # the block of each drawn token, by the blocks' masses of its atom
            blocks = self.best[:, todo, wanted].argmax(0)  # the atom's first best block (where all underflow)
            masses = (self.mass[:, todo, wanted] * scale[:, todo]).T  # [P, N]
            u = noise.uniform(noise.mix(noise.combine(keys, _BLOCK)))  # [P]
            has = np.nonzero(masses.sum(1) > 0)[0]  # the others underflowed: their best block
            with np.errstate(divide="ignore"):
                picked = _inverse_cdf(torch.from_numpy(np.log(masses[has])), u[torch.from_numpy(has)])
            blocks[has] = picked.numpy()
        u = noise.uniform(noise.mix(noise.combine(keys, _TOKEN)))  # [P]
        # one call per vocabulary block that some position needs, over that block's tokens of the atoms
        # wanted there; each position draws from its own atom's run of them
        for b in np.unique(blocks).tolist():
            here = np.nonzero(blocks == b)[0]
            kinds, which = np.unique(wanted[here], return_inverse=True)
            runs = [self.order.run(b, int(a)) for a in kinds]
            ends = np.cumsum([len(r) for r in runs])
            tokens = np.concatenate(runs)
            lo, hi = (ends - [len(r) for r in runs])[which], ends[which]
            pos, ids = (torch.from_numpy(a).to(self.device) for a in (todo[here], tokens))
            scores = logits_of(pos, ids).float().cpu()  # [P, K] on the host, with the masks and uniforms
            col = torch.arange(len(tokens))[None, :]
            outside = (col < torch.from_numpy(lo)[:, None]) | (col >= torch.from_numpy(hi)[:, None])
            at = _inverse_cdf(scores.masked_fill_(outside, float("-inf")), u[torch.from_numpy(here)])
            out[todo[here]] = tokens[at.numpy()]
        return torch.from_numpy(out)


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
        dev = keys.device  # the logits' device: the chunks are reduced there, `solve` runs on the host
        self.pad = [torch.full((L,), float("-inf"), device=dev) for _ in range(2)]
        self.best = [torch.full((L,), float("-inf"), device=dev) for _ in range(2)]
        self.arg = [torch.zeros(L, dtype=torch.long, device=dev) for _ in range(2)]

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
        tokens = current.cpu().clone()
        pad, best, arg = self.pad[which].cpu(), self.best[which].cpu(), self.arg[which].cpu()
        for k, lo, hi, need in run.needs(self.canvas.index):
            span = slice(lo, hi)
            content = tokens[span] != run.pad_id
            missing = need - int(content.sum())
            if missing > 0:
                loss = torch.where(content, float("inf"), pad[span] - best[span])
                loss = torch.where(torch.isfinite(best[span]), loss, float("inf"))
                flip = torch.argsort(loss, stable=True)[:missing]
                flip = flip[torch.isfinite(loss[flip])]
                tokens[lo + flip] = arg[lo + flip]
            if which == 0:
                run.counts[(self.canvas.index, k)] = int((tokens[span] != run.pad_id).sum())
        return tokens


class JointStep:
    """The joint-constraint part of one sampler step over a group of rows (regular languages, slot minimums).

    The sampler calls `begin` with the group's rows and their Gumbel position keys, `chunk` with every
    vocabulary chunk's masked, temperature-scaled logits and its exp values, and `finish` with its argmax
    and sampled canvases and a way to recompute logits of a few positions over one vocabulary block.
    Regular rows need no per-token noise (see `_RowAccumulator`); slot rows draw theirs here."""

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

    def chunk(self, logits: torch.Tensor, start: int, e: torch.Tensor, ref: torch.Tensor) -> None:
        """logits [R, L, C] of vocabulary slice [start, start + C), temperature-scaled and masked; e [R, L, C]:
        the sampler's exp(logits - ref) (0 where masked, and on CPU more than ~87 nats under ref), ref [R, L]
        finite: its running maximum (0 where nothing is allowed yet)."""
        for r, acc in self.rows.items():
            if isinstance(acc, _RowAccumulator):
                acc.chunk(logits[r], start, e[r], ref[r])
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
