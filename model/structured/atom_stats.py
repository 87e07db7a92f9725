"""Per-atom statistics of one vocabulary chunk's logits: the compiled inner loop of the joint hook.

For every position and every atom of a token automaton, over the atom's tokens in one vocabulary
block: the best logit, the first token reaching it, and the summed probability mass (the sampler's own
exp values, so nothing is exponentiated twice). Reading the [L, C] logits row by row through a
per-request token order sorted by (block, atom) (`AtomOrder`) needs neither a transposed copy of the
chunk nor a scatter: each (position, atom) is one contiguous run of the order, reduced in registers.

Shape legend: L positions, C vocabulary chunk (one block), N blocks, A atoms, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit


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
    A = best.shape[1]
    base = b * A
    for p in range(L):
        xr, er = x[p], e[p]
        for a in range(A):
            top, at, total = -np.inf, -1, 0.0
            for k in range(bounds[base + a], bounds[base + a + 1]):
                t = tokens[k] - start
                v = xr[t]
                if v > top:
                    top, at = v, tokens[k]
                total += er[t]
            best[p, a], arg[p, a], mass[p, a] = top, at, total
