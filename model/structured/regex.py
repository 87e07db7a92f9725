"""Byte-level regular expressions: an expression tree, Thompson NFA, subset-construction DFA, minimisation.

The one byte-level alphabet of structured generation: symbols 0..255 are bytes, symbol 256 (`FILLER`)
is the canvas filler (the pad token), which may only follow a complete document. Every constraint
(JSON Schema, `pattern`, formats) is built as an expression over this alphabet, compiled once to a
minimal DFA, and lifted to the token level by `model/structured/automaton.py`.

Expressions are plain tuples (cheap to build, hashable):
  ("set", mask)        one symbol from `mask` (a Python int used as a 257-bit set)
  ("seq", (e, ...))    concatenation; ("seq", ()) is the empty string
  ("alt", (e, ...))    alternation;   ("alt", ()) matches nothing
  ("rep", e, lo, hi)   e repeated lo..hi times (hi None: unbounded)
  ("dfa", Dfa)         the language of a compiled DFA (e.g. an intersection), embedded as is

Shape legend: S DFA states, K = 257 symbols.
"""

from __future__ import annotations

import time

import numpy as np

FILLER = 256
SYMBOLS = 257
DEAD = -1

EMPTY = ("seq", ())
NOTHING = ("alt", ())


class AutomatonTooLarge(ValueError):
    """The constraint's automaton exceeds a size bound; the message says which and how to shrink it."""


def byteset(chars: bytes | range | list[int]) -> tuple:
    mask = 0
    for b in chars:
        mask |= 1 << b
    return ("set", mask)


def lit(raw: bytes) -> tuple:
    return seq(*(("set", 1 << b) for b in raw))


def seq(*parts: tuple) -> tuple:
    flat: list[tuple] = []
    for p in parts:
        if p == NOTHING:
            return NOTHING
        flat.extend(p[1] if p[0] == "seq" else (p,))
    return flat[0] if len(flat) == 1 else ("seq", tuple(flat))


def alt(*parts: tuple) -> tuple:
    flat: list[tuple] = []
    for p in parts:
        for q in p[1] if p[0] == "alt" else (p,):
            if q not in flat:
                flat.append(q)
    return flat[0] if len(flat) == 1 else ("alt", tuple(flat))


def rep(e: tuple, lo: int, hi: int | None) -> tuple:
    if hi == 0:
        return EMPTY
    if e == NOTHING:
        return EMPTY if lo == 0 else NOTHING
    return ("rep", e, lo, hi)


def opt(e: tuple) -> tuple:
    return alt(EMPTY, e)


class _Nfa:
    """Thompson NFA: per state epsilon targets and (mask, target) symbol edges."""

    def __init__(self, max_states: int):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []
        self.max_states = max_states

    def state(self) -> int:
        if len(self.eps) >= self.max_states:
            raise AutomatonTooLarge(
                f"the constraint needs more than {self.max_states} automaton states; "
                "lower maxLength/maxItems bounds or simplify the schema"
            )
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, e: tuple) -> tuple[int, int]:
        kind = e[0]
        start, end = self.state(), self.state()
        if kind == "set":
            self.edges[start].append((e[1], end))
        elif kind == "seq":
            cur = start
            for part in e[1]:
                s, t = self.build(part)
                self.eps[cur].append(s)
                cur = t
            self.eps[cur].append(end)
        elif kind == "alt":
            for part in e[1]:
                s, t = self.build(part)
                self.eps[start].append(s)
                self.eps[t].append(end)
        elif kind == "dfa":
            self._embed(e[1], start, end)
        else:
            _, body, lo, hi = e
            cur = start
            for _ in range(lo):
                s, t = self.build(body)
                self.eps[cur].append(s)
                cur = t
            if hi is None:
                s, t = self.build(body)
                self.eps[cur] += [s, end]
                self.eps[t] += [s, end]
            else:
                for _ in range(hi - lo):
                    s, t = self.build(body)
                    self.eps[cur] += [s, end]
                    cur = t
            self.eps[cur].append(end)
        return start, end

    def _embed(self, dfa: Dfa, start: int, end: int) -> None:
        ids = [self.state() for _ in range(dfa.num_states)]
        if ids:
            self.eps[start].append(ids[0])
        for s, row in enumerate(dfa.trans):
            if dfa.accept[s]:
                self.eps[ids[s]].append(end)
            masks: dict[int, int] = {}
            for sym in np.nonzero(row >= 0)[0].tolist():
                masks[int(row[sym])] = masks.get(int(row[sym]), 0) | (1 << sym)
            self.edges[ids[s]] += [(m, ids[t]) for t, m in masks.items()]

    def closure(self, states) -> frozenset[int]:
        seen = set(states)
        todo = list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


def _symbol_classes(masks: set[int]) -> list[list[int]]:
    """Partition of the symbols into classes no mask tells apart."""
    groups: dict[tuple, list[int]] = {}
    ordered = sorted(masks)
    for sym in range(SYMBOLS):
        key = tuple((m >> sym) & 1 for m in ordered)
        groups.setdefault(key, []).append(sym)
    return list(groups.values())


class Dfa:
    """A trimmed, minimal DFA over the 257 symbols. State 0 is the start; `trans[s, sym]` is DEAD or a state."""

    def __init__(self, trans: np.ndarray, accept: np.ndarray):
        self.trans = trans  # [S, K] int32
        self.accept = accept  # [S] bool

    @property
    def num_states(self) -> int:
        return int(self.trans.shape[0])

    def run(self, raw, state: int = 0) -> int:
        for sym in raw:
            if state == DEAD:
                return DEAD
            state = int(self.trans[state, sym])
        return state

    def matches(self, raw: bytes) -> bool:
        state = self.run(raw)
        return state != DEAD and bool(self.accept[state])

    def is_empty(self) -> bool:
        return self.num_states == 0


def compile_dfa(e: tuple, max_states: int = 20000, deadline: float | None = None) -> Dfa:
    """Expression -> trimmed minimal DFA (raises AutomatonTooLarge past `max_states` NFA or DFA states).

    Subset construction over symbol classes; a DFA state is the set of NFA states with symbol edges
    (plus the final state) reachable through epsilons, so sets stay small."""
    nfa = _Nfa(max_states * 8)
    start, final = nfa.build(e)
    masks = {m for edges in nfa.edges for m, _ in edges}
    classes = _symbol_classes(masks)
    reps = [c[0] for c in classes]
    classes_of = {m: [i for i, sym in enumerate(reps) if (m >> sym) & 1] for m in masks}
    closures: dict[int, frozenset[int]] = {}

    def closure(state: int) -> frozenset[int]:
        if state not in closures:
            closures[state] = frozenset(s for s in nfa.closure([state]) if nfa.edges[s] or s == final)
        return closures[state]

    first = closure(start)
    index = {first: 0}
    order = [first]
    rows: list[list[int]] = []
    while len(rows) < len(order):
        _too_slow(deadline)
        buckets: dict[int, set[int]] = {}
        for s in order[len(rows)]:
            for m, t in nfa.edges[s]:
                targets = closure(t)
                for c in classes_of[m]:
                    buckets.setdefault(c, set()).update(targets)
        row = [DEAD] * SYMBOLS
        for c, targets in buckets.items():
            nxt = frozenset(targets)
            if nxt not in index:
                if len(order) >= max_states:
                    raise AutomatonTooLarge(
                        f"the constraint needs more than {max_states} automaton states; "
                        "lower maxLength/maxItems bounds or simplify the schema"
                    )
                index[nxt] = len(order)
                order.append(nxt)
            for sym in classes[c]:
                row[sym] = index[nxt]
        rows.append(row)
    trans = np.array(rows, dtype=np.int32).reshape(len(rows), SYMBOLS)
    accept = np.array([final in s for s in order], dtype=bool)
    return minimise(trim(Dfa(trans, accept)), deadline)


def trim(dfa: Dfa) -> Dfa:
    """Drop states that cannot reach an accepting state (their transitions become DEAD)."""
    S = dfa.num_states
    live = dfa.accept.copy()
    while True:
        succ_live = np.zeros(S, dtype=bool)
        t = dfa.trans
        ok = t >= 0
        succ_live = (ok & live[np.where(ok, t, 0)]).any(1)
        grown = live | succ_live
        if (grown == live).all():
            break
        live = grown
    if S == 0 or not live[0]:
        return Dfa(np.zeros((0, SYMBOLS), dtype=np.int32), np.zeros(0, dtype=bool))
    return _renumber(dfa, live)


def _renumber(dfa: Dfa, keep: np.ndarray) -> Dfa:
    new_id = np.full(dfa.num_states + 1, DEAD, dtype=np.int32)
    new_id[np.nonzero(keep)[0]] = np.arange(int(keep.sum()), dtype=np.int32)
    t = dfa.trans[keep]
    return Dfa(np.where(t >= 0, new_id[t], DEAD).astype(np.int32), dfa.accept[keep])


def _too_slow(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise AutomatonTooLarge(
            "compiling the constraint took too long; simplify the schema or lower its bounds"
        )


def _block_ids(key: np.ndarray) -> np.ndarray:
    """[S] dense ids of the distinct rows of key [S, W] (int64), via a 64-bit random linear hash."""
    weights = np.random.default_rng(0xB10C).integers(1, 2**63, size=key.shape[1], dtype=np.int64)
    h = (key.astype(np.uint64) * (weights.astype(np.uint64) | np.uint64(1))).sum(1, dtype=np.uint64)
    return np.unique(h, return_inverse=True)[1].reshape(-1)


def _distinct_columns(trans: np.ndarray) -> np.ndarray:
    """The distinct columns of trans [S, K] (hashed, then checked exactly; exact sort on a collision)."""
    weights = np.random.default_rng(0xC01).integers(1, 2**63, size=trans.shape[0], dtype=np.int64)
    h = ((trans.astype(np.int64) + 2).T.astype(np.uint64) * weights.astype(np.uint64)).sum(1, dtype=np.uint64)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    if (trans[:, first[inverse.reshape(-1)]] == trans).all():
        return trans[:, first]
    return np.unique(trans, axis=1)


def minimise(dfa: Dfa, deadline: float | None = None) -> Dfa:
    """Moore partition refinement, one vectorised round per level of distinguishability; state 0 stays the start.

    A round hashes each state's (block, successor blocks) row to one integer, so a round costs one gather and
    one 1-D unique instead of a row-wise sort. A hash collision could only merge two states wrongly, so the
    final partition is checked exactly (every block's members agree on acceptance and successor blocks) and
    refined with exact row comparison if it is not a congruence (any congruence that keeps acceptance
    yields an equivalent DFA)."""
    S = dfa.num_states
    if S == 0:
        return dfa
    columns = _distinct_columns(dfa.trans)  # [S, K']: symbols that behave alike are one column
    accept = dfa.accept.astype(np.int64)[:, None]  # kept in every key: a merged pair never mixes acceptance
    part = accept[:, 0].copy()
    count = len(np.unique(part))
    while True:
        _too_slow(deadline)
        succ = np.where(columns >= 0, part[np.maximum(columns, 0)], -1)  # [S, K']
        key = np.concatenate([accept, part[:, None], succ], axis=1) + 1
        new = _block_ids(key)
        new_count = int(new.max()) + 1
        if new_count == count:
            first = np.unique(part, return_index=True)[1]  # a member of each block
            if (key == key[first[np.searchsorted(part[first], part)]]).all():
                break  # every member agrees with its block's first member: a congruence
            new = np.unique(key, axis=0, return_inverse=True)[1].reshape(-1)  # a collision: split exactly
            new_count = int(new.max()) + 1
        part, count = new, new_count
    # renumber blocks so the start's block is 0, in first-seen order
    _, first_seen = np.unique(part, return_index=True)
    order = np.argsort(first_seen)
    block_of = np.empty_like(order)
    block_of[order] = np.arange(len(order))
    blocks = block_of[np.searchsorted(np.unique(part), part)]
    reps = first_seen[order]
    t = dfa.trans[reps]
    trans = np.where(t >= 0, blocks[np.maximum(t, 0)], DEAD).astype(np.int32)
    return Dfa(trans, dfa.accept[reps])


def intersects(a: Dfa, b: Dfa) -> bool:
    """Whether two DFAs accept a common string (product reachability)."""
    if a.is_empty() or b.is_empty():
        return False
    seen = {(0, 0)}
    todo = [(0, 0)]
    while todo:
        x, y = todo.pop()
        if a.accept[x] and b.accept[y]:
            return True
        tx, ty = a.trans[x], b.trans[y]
        both = (tx >= 0) & (ty >= 0)
        for pair in set(zip(tx[both].tolist(), ty[both].tolist(), strict=True)):
            if pair not in seen:
                seen.add(pair)
                todo.append(pair)
    return False


def intersect(a: Dfa, b: Dfa, max_states: int = 20000, deadline: float | None = None) -> Dfa:
    """The product DFA accepting what both accept (trimmed and minimised)."""
    return _product(a, b, max_states, deadline, keep_b=True)


def difference(a: Dfa, b: Dfa, max_states: int = 20000, deadline: float | None = None) -> Dfa:
    """The DFA accepting what `a` accepts and `b` does not (trimmed and minimised)."""
    return _product(a, b, max_states, deadline, keep_b=False)


def _product(a: Dfa, b: Dfa, max_states: int, deadline: float | None, keep_b: bool) -> Dfa:
    """Product construction; without `keep_b`, b may fall into its dead state (-1) while a goes on."""
    nothing = Dfa(np.zeros((0, SYMBOLS), dtype=np.int32), np.zeros(0, dtype=bool))
    if a.is_empty() or (keep_b and b.is_empty()):
        return nothing
    dead_row = np.full(SYMBOLS, DEAD, dtype=np.int32)
    first = (0, 0 if not b.is_empty() else DEAD)
    index = {first: 0}
    order = [first]
    rows = []
    while len(rows) < len(order):
        if len(rows) % 256 == 0:
            _too_slow(deadline)
        x, y = order[len(rows)]
        tx, ty = a.trans[x], (b.trans[y] if y != DEAD else dead_row)
        row = np.full(SYMBOLS, DEAD, dtype=np.int32)
        ok = (tx >= 0) & (ty >= 0) if keep_b else tx >= 0
        for sym in np.nonzero(ok)[0].tolist():
            pair = (int(tx[sym]), int(ty[sym]))
            if pair not in index:
                if len(order) >= max_states:
                    raise AutomatonTooLarge(f"an intersection needs more than {max_states} automaton states")
                index[pair] = len(order)
                order.append(pair)
            row[sym] = index[pair]
        rows.append(row)
    in_b = [y != DEAD and bool(b.accept[y]) for _, y in order]
    accept = np.array(
        [bool(a.accept[x]) and (yb if keep_b else not yb) for (x, _), yb in zip(order, in_b, strict=True)]
    )
    return minimise(trim(Dfa(np.stack(rows).astype(np.int32), accept)), deadline)
