"""Per-atom statistics of one vocabulary chunk's logits: the compiled inner loop of the joint hook.

For every position and every atom of a token automaton, over the atom's tokens in one vocabulary
block: the best logit, the first token reaching it, and the summed probability mass (the sampler's own
exp values, so nothing is exponentiated twice). Reading the [L, C] logits row by row through a
per-request token order sorted by (block, atom) (`AtomOrder`) needs neither a transposed copy of the
chunk nor a scatter: each (position, atom) is one contiguous run of the order, reduced in registers.
That pass runs on the host; for logits on an accelerator `chunk_stats_torch` computes the same statistics
with torch ops where the logits are (no per-chunk copy to the host), from a device table of each token's
atom (`atom_index`).

Shape legend: L positions, C vocabulary chunk (one block), N blocks, A atoms, V vocabulary.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from model.structured.compiled import njit

_ORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # automaton -> {block size: AtomOrder}
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # automaton -> {device: [V] atoms}


@dataclass(frozen=True)
class AtomOrder:
    """The allowed tokens of a vocabulary sorted by (block, atom), ascending inside each run.

    tokens[bounds[b * A + a] : bounds[b * A + a + 1]] are the token ids of atom a in block b (tokens
    [b * B, (b + 1) * B)); tokens outside every atom are left out (they are never allowed)."""

    tokens: np.ndarray  # [K] int64 token ids, K allowed tokens
    offsets: np.ndarray  # [K] uint32: each token's offset in its block (token - b * B)
    bounds: np.ndarray  # [N * A + 1] int64
    block: int  # B, tokens per block
    num_atoms: int

    @classmethod
    def of(cls, automaton, block: int) -> AtomOrder:
        """The order of a `TokenAutomaton`'s tokens, cached per (automaton, block size): the automaton is
        cached per (schema, tokenizer), so requests with one schema share it (~30 ms at vocabulary 262,144)."""
        orders = _ORDERS.setdefault(automaton, {})
        if block not in orders:
            orders[block] = cls.build(automaton.atom_of, block, automaton.num_atoms)
        return orders[block]

    @classmethod
    def build(cls, atom_of: np.ndarray, block: int, num_atoms: int) -> AtomOrder:
        """atom_of [V]: each token's atom (-1: none)."""
        V = len(atom_of)
        N = -(-V // block)
        ids = np.nonzero(atom_of >= 0)[0]
        keys = ids // block * num_atoms + atom_of[ids]
        order = np.argsort(keys, kind="stable")
        bounds = np.searchsorted(keys[order], np.arange(N * num_atoms + 1))
        tokens = ids[order].astype(np.int64)
        return cls(tokens, (tokens % block).astype(np.uint32), bounds.astype(np.int64), block, num_atoms)

    def run(self, b: int, a: int) -> np.ndarray:
        """Token ids of atom a in block b."""
        k = b * self.num_atoms + a
        return self.tokens[self.bounds[k] : self.bounds[k + 1]]


def atom_index(automaton, device: torch.device) -> torch.Tensor:
    """[V] int64 on `device`: each token's atom, A (one past the last atom) where it has none. Cached per
    (automaton, device), like `AtomOrder`: built once, not per request or step."""
    tables = _INDEXES.setdefault(automaton, {})
    key = str(device)
    if key not in tables:
        atom_of = torch.from_numpy(automaton.atom_of).long()
        tables[key] = torch.where(atom_of < 0, automaton.num_atoms, atom_of).to(device)
    return tables[key]


# the largest [C, A + 1] one-hot the device path builds for a chunk's mass (32 MiB in float32): 8,192-token
# chunks of automata with up to 1,023 atoms (bench/schema_coverage.py's 122 accepted schemas have at most 275 on
# the tiny model's vocabulary, three of them 178-230 at 262,144); chosen by the automaton alone, never the batch
ONE_HOT_ELEMENTS = 1 << 23


def chunk_stats_torch(
    x: torch.Tensor, e: torch.Tensor, atoms: torch.Tensor, num_atoms: int, start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunk_stats` as torch ops on x's device: (best [L, A], arg [L, A] int64, mass [L, A]) of logits x and
    exp values e [L, C] of tokens [start, start + C); atoms [C]: their `atom_index` entries. Same meaning:
    best -inf and arg -1 where an atom has no finite logit, arg the FIRST token reaching the best (vocabulary
    order), mass the sum of e (float32, summed in another order: equal up to rounding, and the same on every run)."""
    L, C = x.shape
    A1 = num_atoms + 1  # column A collects the tokens outside every atom, then is dropped
    best = torch.full((L, A1), float("-inf"), dtype=x.dtype, device=x.device)
    best.index_reduce_(1, atoms, x, "amax")
    # the first token reaching the best: the least in-chunk offset among the tokens equal to it (offsets up
    # to 2^24 are exact in float32, which every device's index_reduce supports)
    hit = (x == best[:, atoms]) & (x > float("-inf"))
    offset = torch.arange(C, dtype=torch.float32, device=x.device).expand(L, C)
    first = torch.full((L, A1), float(C), dtype=torch.float32, device=x.device)
    first.index_reduce_(1, atoms, torch.where(hit, offset, float(C)), "amin")
    arg = torch.where(first < C, first.long() + start, -1)
    if C * A1 <= ONE_HOT_ELEMENTS:
        # the mass as a GEMM with the chunk's token -> atom one-hot: a fixed summation order on every device
        # (index_add_ is a scatter of atomic adds on CUDA, whose last bits vary run to run and could flip a draw)
        mass = e @ torch.nn.functional.one_hot(atoms, A1).to(e.dtype)
    else:  # an automaton with very many atoms: the scatter-sum (order not fixed on CUDA)
        mass = torch.zeros((L, A1), dtype=e.dtype, device=e.device).index_add_(1, atoms, e)
    return best[:, :num_atoms], arg[:, :num_atoms], mass[:, :num_atoms]


@njit(cache=True, nogil=True)
def chunk_stats(x, e, offsets, bounds, b, start, best, arg, mass):  # pragma: no cover - compiled
    """Fill best / arg / mass [L, A] for block b from logits x and exp values e [L, C] of tokens
    [start, start + C): per (position, atom) the best logit (-inf: no token), its first token id (-1: none)
    and the sum of e. offsets / bounds: an `AtomOrder`'s arrays."""
    L = x.shape[0]
    for p in range(0, L - L % _LANES, _LANES):
        _four_positions(x, e, offsets, bounds, b, start, best, arg, mass, p)
    for p in range(L - L % _LANES, L):
        _one_position(x, e, offsets, bounds, b, start, best, arg, mass, p)


_LANES = 4  # positions reduced together: independent chains, and one offset load serves four of them


@njit(cache=True, nogil=True, inline="always")
def _one_position(x, e, offsets, bounds, b, start, best, arg, mass, p):  # pragma: no cover - compiled
    A = best.shape[1]
    xr, er = x[p], e[p]
    for a in range(A):
        top, at, total = np.float32(-np.inf), -1, np.float32(0.0)
        for k in range(bounds[b * A + a], bounds[b * A + a + 1]):
            t = offsets[k]  # unsigned: no negative-index wraparound in the loop
            v = xr[t]
            if v > top:  # strictly: the first best token of the run (ascending ids) is kept
                top, at = v, np.int64(t)
            total += er[t]
        best[p, a], arg[p, a], mass[p, a] = top, at + start if at >= 0 else -1, total


@njit(cache=True, nogil=True, inline="always")
def _four_positions(x, e, offsets, bounds, b, start, best, arg, mass, p):  # pragma: no cover - compiled
    A = best.shape[1]
    x0, x1, x2, x3 = x[p], x[p + 1], x[p + 2], x[p + 3]
    e0, e1, e2, e3 = e[p], e[p + 1], e[p + 2], e[p + 3]
    for a in range(A):
        top0 = top1 = top2 = top3 = np.float32(-np.inf)
        at0 = at1 = at2 = at3 = -1
        m0 = m1 = m2 = m3 = np.float32(0.0)  # float32 sums, as the sampler's own
        for k in range(bounds[b * A + a], bounds[b * A + a + 1]):
            t = offsets[k]
            v = x0[t]
            if v > top0:
                top0, at0 = v, np.int64(t)
            v = x1[t]
            if v > top1:
                top1, at1 = v, np.int64(t)
            v = x2[t]
            if v > top2:
                top2, at2 = v, np.int64(t)
            v = x3[t]
            if v > top3:
                top3, at3 = v, np.int64(t)
            m0 += e0[t]
            m1 += e1[t]
            m2 += e2[t]
            m3 += e3[t]
        for j, top, at, m in ((0, top0, at0, m0), (1, top1, at1, m1), (2, top2, at2, m2), (3, top3, at3, m3)):
            best[p + j, a], arg[p + j, a], mass[p + j, a] = top, at + start if at >= 0 else -1, m
