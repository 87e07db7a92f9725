"""The most probable canvas inside a regular language: a max-sum DP over positions x automaton states.

Given per-position scores of every token (log-probabilities, or logits: a per-position constant
does not change the winner, since every assignment picks exactly one token per position), the
best valid assignment of L positions starting in state `start` and ending in a `goal` state is

    value[L][s] = 0 if goal[s] else -inf
    value[p][s] = max over edges (s, atom, d) of best[p][atom] + value[p + 1][d]

then read forwards from `start`, where best[p][atom] is the top score of the atom's tokens at p
(tokens of one atom are interchangeable for the automaton, so the top one is the only candidate).
This is exact (DINGO, 2025, for masked diffusion); with Gumbel-perturbed scores it draws a
perturb-and-MAP sample inside the language.

Shape legend: L positions, S states, A atoms, E edges, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from model.structured.automaton import TokenAutomaton


def goal_states(automaton: TokenAutomaton, remaining: int) -> np.ndarray:
    """[S] bool: states from which `remaining` more positions can still complete a document."""
    return automaton.distance <= remaining


def best_atoms(
    automaton: TokenAutomaton, scores: np.ndarray, start: int, goal: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(atoms [L], states [L + 1]) of the best path, or None when no path exists. scores [L, A]."""
    L = scores.shape[0]
    S = automaton.num_states
    src_starts, src_ids = automaton.src_starts, automaton.src_ids
    atom, dst = automaton.edge_atom, automaton.edge_dst
    values = np.full((L + 1, S), -np.inf, dtype=np.float64)
    values[L] = np.where(goal, 0.0, -np.inf)
    if len(atom) == 0:
        return None
    for p in range(L - 1, -1, -1):
        cand = scores[p, atom] + values[p + 1, dst]  # [E]
        values[p, src_ids] = np.maximum.reduceat(cand, src_starts)
    if not np.isfinite(values[0, start]):
        return None
    bounds = np.searchsorted(automaton.edge_src, np.arange(S + 1))
    atoms = np.empty(L, dtype=np.int64)
    states = np.empty(L + 1, dtype=np.int64)
    state = start
    for p in range(L):
        states[p] = state
        lo, hi = bounds[state], bounds[state + 1]
        k = lo + int(np.argmax(scores[p, atom[lo:hi]] + values[p + 1, dst[lo:hi]]))
        atoms[p], state = atom[k], dst[k]
    states[L] = state
    return atoms, states


def atom_best(automaton: TokenAutomaton, token_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best [L, A], argmax token [L, A]) of each atom's tokens; reference for the chunked sampler path."""
    L, V = token_scores.shape
    A = automaton.num_atoms
    best = np.full((L, A), -np.inf)
    arg = np.zeros((L, A), dtype=np.int64)
    of = automaton.atom_of[:V]
    for v in np.nonzero(of >= 0)[0]:
        a = of[v]
        better = token_scores[:, v] > best[:, a]
        best[better, a] = token_scores[better, v]
        arg[better, a] = v
    return best, arg


def best_tokens(automaton: TokenAutomaton, token_scores: np.ndarray, start: int, goal: np.ndarray):
    """The most probable valid token ids [L] under token_scores [L, V], or None (plain reference)."""
    best, arg = atom_best(automaton, token_scores)
    path = best_atoms(automaton, best, start, goal)
    if path is None:
        return None
    atoms, _ = path
    return arg[np.arange(len(atoms)), atoms]
