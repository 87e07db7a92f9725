"""Per-atom statistics of one vocabulary chunk's logits: the compiled inner loop of the joint hook.

For every position and every atom of a token automaton, over the atom's tokens in one vocabulary
block: the best logit, the first token reaching it, and the summed probability mass (the sampler's own
exp values, so nothing is exponentiated twice). Reading the [L, C] logits row by row through a
per-request token order sorted by (block, atom) (`AtomOrder`) needs neither a transposed copy of the
chunk nor a scatter: each (position, atom) is one contiguous run of the order, reduced in registers.

Shape legend: L positions, C vocabulary chunk (one block), N blocks, A atoms, V vocabulary.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from numba import njit

_ORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # automaton -> {block size: AtomOrder}


@dataclass(frozen=True)
class AtomOrder:
    """The allowed tokens of a vocabulary sorted by (block, atom), ascending inside each run.

    tokens[bounds[b * A + a] : bounds[b * A + a + 1]] are the token ids of atom a in block b (tokens
    [b * B, (b + 1) * B)); tokens outside every atom are left out (they are never allowed)."""

    tokens: np.ndarray  # [K] int64 token ids, K allowed tokens
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
        return cls(ids[order].astype(np.int64), bounds.astype(np.int64), block, num_atoms)

    def run(self, b: int, a: int) -> np.ndarray:
        """Token ids of atom a in block b."""
        k = b * self.num_atoms + a
        return self.tokens[self.bounds[k] : self.bounds[k + 1]]


@njit(cache=True, nogil=True)
def chunk_stats(x, e, tokens, bounds, b, start, best, arg, mass):  # pragma: no cover - compiled
    """Fill best / arg / mass [L, A] for block b from logits x and exp values e [L, C] of tokens
    [start, start + C): per (position, atom) the best logit (-inf: no token), its first token id (-1: none)
    and the sum of e. tokens / bounds: an `AtomOrder`'s arrays."""
    L = x.shape[0]
    for p in range(0, L - L % _LANES, _LANES):
        _four_positions(x, e, tokens, bounds, b, start, best, arg, mass, p)
    for p in range(L - L % _LANES, L):
        _one_position(x, e, tokens, bounds, b, start, best, arg, mass, p)


_LANES = 4  # positions reduced together: independent chains, and one token-id load serves four of them


@njit(cache=True, nogil=True, inline="always")
def _one_position(x, e, tokens, bounds, b, start, best, arg, mass, p):  # pragma: no cover - compiled
    A = best.shape[1]
    for a in range(A):
        top, at, total = -np.inf, -1, np.float32(0.0)
        for k in range(bounds[b * A + a], bounds[b * A + a + 1]):
            t = tokens[k] - start
            v = x[p, t]
            if v > top:  # strictly: the first best token of the run (ascending ids) is kept
                top, at = v, tokens[k]
            total += e[p, t]
        best[p, a], arg[p, a], mass[p, a] = top, at, total


@njit(cache=True, nogil=True, inline="always")
def _four_positions(x, e, tokens, bounds, b, start, best, arg, mass, p):  # pragma: no cover - compiled
    A = best.shape[1]
    for a in range(A):
        top0 = top1 = top2 = top3 = -np.inf
        at0 = at1 = at2 = at3 = -1
        m0 = m1 = m2 = m3 = np.float32(0.0)  # float32 sums, as the sampler's own
        for k in range(bounds[b * A + a], bounds[b * A + a + 1]):
            t = tokens[k] - start
            v = x[p, t]
            if v > top0:
                top0, at0 = v, tokens[k]
            v = x[p + 1, t]
            if v > top1:
                top1, at1 = v, tokens[k]
            v = x[p + 2, t]
            if v > top2:
                top2, at2 = v, tokens[k]
            v = x[p + 3, t]
            if v > top3:
                top3, at3 = v, tokens[k]
            m0 += e[p, t]
            m1 += e[p + 1, t]
            m2 += e[p + 2, t]
            m3 += e[p + 3, t]
        best[p, a], arg[p, a], mass[p, a] = top0, at0, m0
        best[p + 1, a], arg[p + 1, a], mass[p + 1, a] = top1, at1, m1
        best[p + 2, a], arg[p + 2, a], mass[p + 2, a] = top2, at2, m2
        best[p + 3, a], arg[p + 3, a], mass[p + 3, a] = top3, at3, m3
