"""The most probable canvas inside a regular language: a max-sum DP over positions x automaton states.

Given per-position scores of every token (log-probabilities, or logits: a per-position constant
does not change the winner, since every assignment picks exactly one token per position), the
best valid assignment of L positions starting in state `start` and ending in a `goal` state is

    value[L][s] = 0 if goal[s] else -inf
    value[p][s] = max over edges (s, atom, d) of best[p][atom] + value[p + 1][d]

then read forwards from `start`, where best[p][atom] is the top score of the atom's tokens at p
(tokens of one atom are interchangeable for the automaton, so the top one is the only candidate).
This is exact (DINGO, 2025, for masked diffusion).

Sampling (`sample_atoms`) is the same recursion with log-sum-exp in place of max, over per-position
log-masses of each atom (the log of the summed probabilities of its tokens): value[p][s] is then the
log-probability mass of all valid completions from s at p, and walking forwards, choosing each edge
with probability exp(mass[p][atom] + value[p + 1][d] - value[p][s]) (Gumbel-max with one Gumbel per
position and atom; the edges out of one state have distinct atoms), draws an atom sequence from the
exact distribution of the per-position product restricted to the language (forward filtering,
backward sampling). A token inside each chosen atom, drawn from its softmax restricted to the atom,
completes an exact draw of the canvas.

The recursions run once per canvas and denoising step, O(L x E) each, so they are compiled loops
(numba): as numpy calls, one per position and operation, they were most of a small model's hook.

Shape legend: L positions, S states, A atoms, E edges, V vocabulary.
"""

from __future__ import annotations

import numpy as np

from model.structured.automaton import TokenAutomaton
from model.structured.compiled import njit

# Rescaled sums lose states below ~1e-308 of their position's best; a sampled walk that passed within
# ~1e-278 of that (one of its edges may have been lost) is redone in log space.
_SCALED_FLOOR = 1e-278


def goal_states(automaton: TokenAutomaton, remaining: int) -> np.ndarray:
    """[S] bool: states from which `remaining` more positions can still complete a document."""
    return automaton.distance <= remaining


def best_atoms(
    automaton: TokenAutomaton, scores: np.ndarray, start: int, goal: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(atoms [L], states [L + 1]) of the best path, or None when no path exists. scores [L, A]."""
    if len(automaton.edge_atom) == 0:
        return None
    values = _max_values(_bounds(automaton), automaton.edge_atom, automaton.edge_dst, _f64(scores), goal)
    if not np.isfinite(values[0, start]):
        return None
    return _walk(_bounds(automaton), automaton.edge_atom, automaton.edge_dst, _f64(scores), values, start)


def sample_atoms(
    automaton: TokenAutomaton, log_mass: np.ndarray, start: int, goal: np.ndarray, gumbel: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(atoms [L], states [L + 1]) drawn with probability proportional to the product of the atoms' masses
    over valid paths, or None when no path exists. log_mass, gumbel [L, A] (gumbel: standard Gumbel noise)."""
    if len(automaton.edge_atom) == 0:
        return None
    bounds, atom, dst = _bounds(automaton), automaton.edge_atom, automaton.edge_dst
    log_mass = _f64(log_mass)
    noisy = log_mass + gumbel  # [L, A]
    values, ok = _sum_values_scaled(bounds, atom, dst, log_mass, goal)
    if ok and np.isfinite(values[0, start]):
        drawn = _walk(bounds, atom, dst, noisy, values, start)
        near = values[np.arange(len(values)), drawn[1]] - values.max(1)
        if (near > np.log(_SCALED_FLOOR)).all():
            return drawn
    values = _sum_values_log(bounds, atom, dst, log_mass, goal)
    if not np.isfinite(values[0, start]):
        return None
    return _walk(bounds, atom, dst, noisy, values, start)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _bounds(automaton: TokenAutomaton) -> np.ndarray:
    """[S + 1] int64: the edges of state s are [bounds[s], bounds[s + 1]) (edges are sorted by source)."""
    return automaton.src_bounds


@njit(cache=True, nogil=True)
def _max_values(bounds, atom, dst, scores, goal):  # pragma: no cover - compiled
    """values [L + 1, S] of the max-sum recursion over scores [L, A]."""
    L = scores.shape[0]
    values = _goal_values(L, goal)
    for p in range(L - 1, -1, -1):
        for s in range(len(goal)):
            values[p, s] = _edge_max(bounds, atom, dst, scores[p], values[p + 1], s)
    return values


@njit(cache=True, nogil=True, inline="always")
def _goal_values(L, goal):  # pragma: no cover - compiled
    """[L + 1, S] all -inf but the goal states of the last row (0)."""
    values = np.full((L + 1, len(goal)), -np.inf)
    for s in range(len(goal)):
        if goal[s]:
            values[L, s] = 0.0
    return values


@njit(cache=True, nogil=True, inline="always")
def _edge_max(bounds, atom, dst, row, nxt, s):  # pragma: no cover - compiled
    """max over the edges (s, atom, d) of row[atom] + nxt[d] (-inf: none)."""
    best = -np.inf
    for k in range(bounds[s], bounds[s + 1]):
        v = row[atom[k]] + nxt[dst[k]]
        if v > best:
            best = v
    return best


@njit(cache=True, nogil=True)
def _sum_values_scaled(bounds, atom, dst, log_mass, goal):  # pragma: no cover - compiled
    """(values [L + 1, S] as `_sum_values_log`, ok): by sums of probabilities rescaled at every position
    (one exp per position and atom, not per edge); a state below ~1e-308 of its position's best state gets
    -inf, and ok is False when a whole position fell out of range (the caller then redoes it in log space)."""
    L, A = log_mass.shape
    S = len(bounds) - 1
    values = np.full((L + 1, S), -np.inf)
    scaled = np.zeros((L + 1, S))
    for s in range(S):
        if goal[s]:
            scaled[L, s] = 1.0
    scale = np.zeros(L + 1)
    weights = np.empty(A)
    for p in range(L - 1, -1, -1):
        shift = log_mass[p].max()
        if not np.isfinite(shift):  # a position where no atom has mass: no path
            return values, True
        for a in range(A):
            weights[a] = np.exp(log_mass[p, a] - shift)
        nxt, cur = scaled[p + 1], scaled[p]
        top = 0.0
        for s in range(S):
            total = 0.0
            for k in range(bounds[s], bounds[s + 1]):
                total += weights[atom[k]] * nxt[dst[k]]
            cur[s] = total
            if total > top:
                top = total
        if top == 0.0:
            return values, False
        for s in range(S):
            cur[s] /= top
        scale[p] = scale[p + 1] + shift + np.log(top)
    for p in range(L + 1):
        for s in range(S):
            if scaled[p, s] > 0.0:
                values[p, s] = np.log(scaled[p, s]) + scale[p]
    return values, True


@njit(cache=True, nogil=True)
def _sum_values_log(bounds, atom, dst, log_mass, goal):  # pragma: no cover - compiled
    """values [L + 1, S]: the log of the summed mass of all completions from each state (log space: exact
    at any range of masses; one exp per edge, so only where the rescaled sums fell out of range)."""
    L = log_mass.shape[0]
    values = _goal_values(L, goal)
    for p in range(L - 1, -1, -1):
        nxt, row = values[p + 1], log_mass[p]
        for s in range(len(goal)):
            top = _edge_max(bounds, atom, dst, row, nxt, s)
            if top == -np.inf:
                continue
            total = 0.0
            for k in range(bounds[s], bounds[s + 1]):
                total += np.exp(row[atom[k]] + nxt[dst[k]] - top)
            values[p, s] = top + np.log(total)
    return values


@njit(cache=True, nogil=True)
def _walk(bounds, atom, dst, scores, values, start):  # pragma: no cover - compiled
    """(atoms [L], states [L + 1]): from `start`, at each position the edge of the current state with the
    highest scores[p, atom] + values[p + 1, dst] (the first on ties, in edge order)."""
    L = scores.shape[0]
    atoms = np.empty(L, dtype=np.int64)
    states = np.empty(L + 1, dtype=np.int64)
    state = start
    for p in range(L):
        states[p] = state
        best, pick = -np.inf, bounds[state]
        for k in range(bounds[state], bounds[state + 1]):
            v = scores[p, atom[k]] + values[p + 1, dst[k]]
            if v > best:
                best, pick = v, k
        atoms[p], state = atom[pick], dst[pick]
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
