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
    if len(automaton.edge_atom) == 0:
        return None
    edge_scores = scores[:, automaton.edge_atom]  # [L, E]
    L, S = scores.shape[0], automaton.num_states
    dst, src_starts, src_ids = automaton.edge_dst, automaton.src_starts, automaton.src_ids
    values = np.full((L + 1, S), -np.inf, dtype=np.float64)
    values[L] = np.where(goal, 0.0, -np.inf)
    through = np.empty((L, len(dst)))  # [L, E] best score of a path through each edge: what the walk needs
    for p in range(L - 1, -1, -1):  # np.take / out=: the same numbers with less per-call overhead
        np.add(edge_scores[p], np.take(values[p + 1], dst), out=through[p])
        values[p, src_ids] = np.maximum.reduceat(through[p], src_starts)
    if not np.isfinite(values[0, start]):
        return None
    return _walk(automaton, through, start)


def sample_atoms(
    automaton: TokenAutomaton, log_mass: np.ndarray, start: int, goal: np.ndarray, gumbel: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(atoms [L], states [L + 1]) drawn with probability proportional to the product of the atoms' masses
    over valid paths, or None when no path exists. log_mass, gumbel [L, A] (gumbel: standard Gumbel noise)."""
    if len(automaton.edge_atom) == 0:
        return None
    edge_mass = log_mass[:, automaton.edge_atom]  # [L, E]
    noisy = log_mass + gumbel  # [L, A]
    values = _sum_values_scaled(automaton, edge_mass, goal)
    if np.isfinite(values[0, start]):
        drawn = _walk(automaton, _through(automaton, noisy, values), start)
        # rescaled sums lose states below ~1e-308 of their position's best; a walk that passed within
        # ~1e-278 of that (one of its edges may have been lost) is redone in log space
        if (values[np.arange(len(values)), drawn[1]] - values.max(1) > _SCALED_FLOOR).all():
            return drawn
    values = _sum_values_log(automaton, edge_mass, goal)
    if not np.isfinite(values[0, start]):
        return None
    return _walk(automaton, _through(automaton, noisy, values), start)


_SCALED_FLOOR = -640.0  # log(1e-278)


def _sum_values_scaled(automaton: TokenAutomaton, edge_mass: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """values [L + 1, S] as `_sum_values_log`, by sums of probabilities rescaled at every position (several
    times faster on large automata; a state below ~1e-308 of its position's best state gets -inf)."""
    L, S = edge_mass.shape[0], automaton.num_states
    dst, src_starts, src_ids = automaton.edge_dst, automaton.src_starts, automaton.src_ids
    shift = edge_mass.max(1)  # [L]
    values = np.full((L + 1, S), -np.inf, dtype=np.float64)
    if not np.isfinite(shift).all():  # a position where no atom has mass: no path
        return values
    weights = np.exp(edge_mass - shift[:, None])  # [L, E], at most 1
    scaled = np.zeros((L + 1, S), dtype=np.float64)  # values[p] = log(scaled[p]) + scale[p]
    scaled[L] = goal
    scale = np.zeros(L + 1)
    product = np.empty(len(dst))
    for p in range(L - 1, -1, -1):
        np.multiply(weights[p], np.take(scaled[p + 1], dst), out=product)
        row = scaled[p]
        row[src_ids] = np.add.reduceat(product, src_starts)
        top = float(row.max())
        if top == 0:  # nothing left in range: the caller redoes it in log space
            return values
        row /= top
        scale[p] = scale[p + 1] + shift[p] + np.log(top)
    with np.errstate(divide="ignore"):
        return np.log(scaled) + scale[:, None]


def _sum_values_log(automaton: TokenAutomaton, edge_mass: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """values [L + 1, S]: the log of the summed mass of all completions from each state (log space: exact
    at any range of masses)."""
    L, S = edge_mass.shape[0], automaton.num_states
    dst, src_starts, src_ids = automaton.edge_dst, automaton.src_starts, automaton.src_ids
    values = np.full((L + 1, S), -np.inf, dtype=np.float64)
    values[L] = np.where(goal, 0.0, -np.inf)
    with np.errstate(invalid="ignore"):  # logaddexp(-inf, -inf) is -inf, with a warning on some builds
        for p in range(L - 1, -1, -1):
            values[p, src_ids] = np.logaddexp.reduceat(edge_mass[p] + values[p + 1, dst], src_starts)
    return values


def _through(automaton: TokenAutomaton, scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[L, E] score of each edge's atom at each position (scores [L, A]) + the value of its destination one
    position later (values [L + 1, S]): all positions at once, so the walk only compares."""
    return scores[:, automaton.edge_atom] + values[1:, automaton.edge_dst]


def _walk(automaton: TokenAutomaton, through: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """(atoms [L], states [L + 1]): from `start`, at each position the edge of the current state with the
    highest `through` [L, E] (the first on ties, in edge order)."""
    L = through.shape[0]
    atom, dst = automaton.edge_atom, automaton.edge_dst
    bounds = automaton.src_bounds
    atoms = np.empty(L, dtype=np.int64)
    states = np.empty(L + 1, dtype=np.int64)
    state = start
    for p in range(L):
        states[p] = state
        lo, hi = bounds[state], bounds[state + 1]
        k = lo + int(through[p, lo:hi].argmax())
        atoms[p], state = atom[k], int(dst[k])
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
