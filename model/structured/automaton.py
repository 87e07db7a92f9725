"""A byte-level DFA lifted to a token-level automaton over a model's vocabulary.

A token reads its bytes (`TokenClasses.token_bytes`, the project's one token-bytes function; the
pad id reads the FILLER symbol, other special tokens read nothing and are never allowed). Tokens
that move every DFA state to the same place are interchangeable for the constraint: they form one
*atom*. The decoder only needs, per canvas position, the best score inside each atom, and the DP
runs over (state, atom) edges, so its cost depends on the automaton, not on the vocabulary.

Build (once per (schema, tokenizer), cached by the caller): a trie of all token spellings (once
per tokenizer) is walked from every DFA state in blocks of states, dead subtrees pruned; each
token's destination vector is hashed (64-bit random linear hash) into its atom; the atoms'
transition table is then recomputed exactly from one representative each.

Shape legend: S states, A atoms, E live (state, atom) edges, V vocabulary (logit width).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from model.structured.regex import DEAD, FILLER, SYMBOLS, AutomatonTooLarge, Dfa

_BLOCK = 32  # DFA states walked together (memory: _BLOCK x V int64 at a time)


@dataclass(frozen=True)
class _Trie:
    """Spellings of a vocabulary as a trie, level by level (level j holds prefixes of j + 1 symbols)."""

    parents: list[np.ndarray]  # per level: [n_j] index into level j - 1 (0 at level 0: the root)
    symbols: list[np.ndarray]  # per level: [n_j] symbol of the edge into the node
    end_level: np.ndarray  # [V] level where the token's spelling ends (-1: empty spelling)
    end_node: np.ndarray  # [V] node index in that level
    spellings: list  # [V] what each token reads


def token_symbols(token_bytes: list[bytes], pad_id: int) -> list[bytes | tuple[int, ...]]:
    out: list[Any] = list(token_bytes)
    out[pad_id] = (FILLER,)
    return out


def _build_trie(spellings: list) -> _Trie:
    V = len(spellings)
    lengths = np.array([len(s) for s in spellings], dtype=np.int64)
    flat = np.array([b for s in spellings for b in s], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if V else np.zeros(0, dtype=np.int64)
    node = np.zeros(V, dtype=np.int64)
    end_level, end_node = np.full(V, -1, dtype=np.int64), np.zeros(V, dtype=np.int64)
    parents, symbols = [], []
    for j in range(int(lengths.max()) if V else 0):
        active = np.nonzero(lengths > j)[0]
        key = node[active] * SYMBOLS + flat[offsets[active] + j]
        uniq, inverse = np.unique(key, return_inverse=True)
        parents.append(uniq // SYMBOLS)
        symbols.append(uniq % SYMBOLS)
        node[active] = inverse.reshape(-1)
        ends = active[lengths[active] == j + 1]
        end_level[ends], end_node[ends] = j, node[ends]
    return _Trie(parents, symbols, end_level, end_node, spellings)


_TRIES: weakref.WeakKeyDictionary[Any, _Trie] = weakref.WeakKeyDictionary()


def trie_for(classes: Any) -> _Trie:
    """The spelling trie of a `TokenClasses` (cached per object)."""
    if classes not in _TRIES:
        raw = [classes.token_bytes(i) for i in range(classes.vocab_size)]
        _TRIES[classes] = _build_trie(token_symbols(raw, classes.pad_id))
    return _TRIES[classes]


def _destinations(trans: np.ndarray, trie: _Trie, states: np.ndarray) -> np.ndarray:
    """[B, V] destination of every token from each of `states`; the sink row is trans.shape[0] - 1."""
    sink = trans.shape[0] - 1
    V = len(trie.end_level)
    dest = np.full((len(states), V), sink, dtype=np.int64)
    cur = states[:, None]  # [B, 1]: the root
    keep = np.zeros(1, dtype=np.int64)  # previous level's node -> column of `cur` (-1: pruned)
    for level, (parents, symbols) in enumerate(zip(trie.parents, trie.symbols, strict=True)):
        col = keep[parents]
        idx = np.nonzero(col >= 0)[0]
        nxt = trans[cur[:, col[idx]], symbols[idx]]  # [B, n_live]
        ending = np.nonzero(trie.end_level == level)[0]
        if len(ending):
            where = np.full(len(parents), -1, dtype=np.int64)
            where[idx] = np.arange(len(idx))
            pos = where[trie.end_node[ending]]
            ok = pos >= 0
            dest[:, ending[ok]] = nxt[:, pos[ok]]
        alive = (nxt != sink).any(0)
        keep = np.full(len(parents), -1, dtype=np.int64)
        keep[idx[alive]] = np.arange(int(alive.sum()))
        cur = nxt[:, alive]
        if cur.shape[1] == 0:
            break
    return dest


@dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """A DFA over tokens, grouped into atoms. State 0 is the start.

    atom_of[v] is the atom of token v (-1: never allowed). Edges (src, atom, dst) are sorted by src;
    `src_starts` are the offsets of each source state's run (for np.maximum.reduceat), `has_edges`
    marks states with at least one edge. `distance[s]` is the fewest tokens from s to an accepting
    state (a large number where none).
    """

    num_states: int
    accept: np.ndarray  # [S] bool
    atom_of: np.ndarray  # [V] int64
    num_atoms: int
    edge_src: np.ndarray  # [E]
    edge_atom: np.ndarray  # [E]
    edge_dst: np.ndarray  # [E]
    src_starts: np.ndarray  # [S'] offsets of each present source in the edge arrays
    src_ids: np.ndarray  # [S'] which state each run belongs to
    distance: np.ndarray  # [S] int64
    allowed: np.ndarray  # [V] bool: tokens in some atom (the union of what any position may hold)

    def step(self, state: int, token: int) -> int:
        atom = int(self.atom_of[token]) if 0 <= token < len(self.atom_of) else -1
        if atom < 0 or state < 0:
            return DEAD
        lo, hi = np.searchsorted(self.edge_src, [state, state + 1])
        hit = np.nonzero(self.edge_atom[lo:hi] == atom)[0]
        return int(self.edge_dst[lo + hit[0]]) if len(hit) else DEAD

    def run(self, tokens, state: int = 0) -> int:
        for t in tokens:
            state = self.step(state, int(t))
            if state == DEAD:
                return DEAD
        return state

    @cached_property
    def src_bounds(self) -> np.ndarray:
        """[S + 1] int64 offsets: the edges of state s are [src_bounds[s], src_bounds[s + 1])."""
        return np.searchsorted(self.edge_src, np.arange(self.num_states + 1)).astype(np.int64)

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes for a in (self.atom_of, self.edge_src, self.edge_atom, self.edge_dst, self.allowed)
        )


def lift(
    dfa: Dfa, classes: Any, max_atoms: int = 65536, max_edges: int = 4_000_000, deadline: float | None = None
) -> TokenAutomaton:
    """Lift `dfa` to the tokens of `classes` (a TokenClasses); raises AutomatonTooLarge past the bounds
    (atoms, edges, or `deadline` on time.monotonic())."""
    S = dfa.num_states
    trie = trie_for(classes)
    V = len(trie.end_level)
    trans = np.concatenate([dfa.trans, np.full((1, SYMBOLS), DEAD, dtype=np.int32)]).astype(np.int64)
    trans[trans == DEAD] = S  # the sink
    rng = np.random.default_rng(0x5EED)
    weights = rng.integers(1, 2**63, size=S, dtype=np.int64).astype(np.uint64) | np.uint64(1)
    key = np.zeros(V, dtype=np.uint64)
    live = np.zeros(V, dtype=bool)
    for start in range(0, S, _BLOCK):
        states = np.arange(start, min(S, start + _BLOCK))
        if deadline is not None and time.monotonic() > deadline:
            raise AutomatonTooLarge(
                f"building the token automaton ({S} states) took too long; simplify the schema or lower its bounds"
            )
        dest = _destinations(trans, trie, states)  # [B, V]
        live |= (dest != S).any(0)
        key += ((dest + 1).astype(np.uint64) * weights[states][:, None]).sum(0, dtype=np.uint64)
    atom_of = np.full(V, -1, dtype=np.int64)
    if live.any():
        uniq, first, inverse = np.unique(key[live], return_index=True, return_inverse=True)
        atom_of[live] = inverse.reshape(-1)
        reps = np.nonzero(live)[0][first]
    else:
        reps = np.zeros(0, dtype=np.int64)
    if len(reps) > max_atoms:
        raise AutomatonTooLarge(
            f"the constraint splits the vocabulary into {len(reps)} token groups (limit {max_atoms})"
        )
    table = _rep_table(trans, trie, reps, S)  # [S, A]
    src, atom = np.nonzero(table != S)
    if len(src) > max_edges:
        raise AutomatonTooLarge(f"the constraint needs {len(src)} token transitions (limit {max_edges})")
    dst = table[src, atom]
    starts = (
        np.concatenate([[0], np.nonzero(np.diff(src))[0] + 1]) if len(src) else np.zeros(0, dtype=np.int64)
    )
    return TokenAutomaton(
        num_states=S,
        accept=dfa.accept.copy(),
        atom_of=atom_of,
        num_atoms=len(reps),
        edge_src=src.astype(np.int64),
        edge_atom=atom.astype(np.int64),
        edge_dst=dst.astype(np.int64),
        src_starts=starts.astype(np.int64),
        src_ids=src[starts].astype(np.int64) if len(src) else np.zeros(0, dtype=np.int64),
        distance=_distance(S, dfa.accept, src, dst),
        allowed=live,
    )


def _rep_table(trans: np.ndarray, trie: _Trie, reps: np.ndarray, S: int) -> np.ndarray:
    """[S, A] exact destination of each atom's representative from every state (S = dead)."""
    small = _build_trie([trie.spellings[r] for r in reps.tolist()])
    out = np.full((S, len(reps)), S, dtype=np.int64)
    for start in range(0, S, _BLOCK):
        states = np.arange(start, min(S, start + _BLOCK))
        out[states] = _destinations(trans, small, states)
    return out


def _distance(S: int, accept: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    far = np.int64(1 << 40)
    dist = np.where(accept, 0, far).astype(np.int64)
    while True:
        via = np.full(S, far, dtype=np.int64)
        np.minimum.at(via, src, dist[dst] + 1)
        new = np.minimum(dist, via)
        if (new == dist).all():
            return dist
        dist = new
