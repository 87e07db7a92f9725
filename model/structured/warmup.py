"""Compile (or load from numba's disk cache) every compiled loop of the joint hook before the first request.

A fresh process pays about a second (cache load) or a few seconds (first compilation) on its first
constrained denoising step otherwise; the Engine calls `warm_up` once at start-up, off the request path.
The calls go through the hook itself on a tiny language and vocabulary, so the argument types are the ones
real steps use and numba compiles exactly those specialisations.
"""

from __future__ import annotations

import numpy as np
import torch

from model.structured import dp
from model.structured.automaton import lift
from model.structured.decode import RegularCanvas, RegularRun
from model.structured.regex import FILLER, alt, byteset, compile_dfa, lit, rep, seq
from model.structured.token_classes import TokenClasses

_VOCAB = [b"", b"", b"a", b"b", b"c", b"ab"]  # the pad (filler), a special token, letters


def warm_up() -> None:
    """One constrained step of a 3-position canvas over a 6-token vocabulary in two blocks (per-block
    statistics, both DPs, and a draw outside the chosen atoms), plus the log-space recursion directly."""
    dfa = compile_dfa(seq(rep(alt(lit(b"ab"), lit(b"c")), 1, None), rep(byteset([FILLER]), 0, None)))
    ta = lift(dfa, TokenClasses(_VOCAB, pad_id=0))
    L, V, C = 3, len(_VOCAB), 4
    acc = RegularCanvas(RegularRun(ta, num_canvases=1, canvas_length=L), 0).accumulator(
        L, torch.arange(L, dtype=torch.long)
    )
    acc.device_stats = False  # the compiled host pass, whatever the class default
    logits = torch.linspace(-1.0, 1.0, L * V).view(L, V)
    for start in range(0, V, C):
        x = logits[:, start : start + C].contiguous()
        ref = logits[:, : start + C].amax(-1)
        acc.chunk(x, start, torch.exp(x - ref[:, None]), ref)
    special = torch.ones(L, dtype=torch.long)  # in no atom: every sampled position draws inside its atom
    acc.solve(logits.argmax(-1), special, lambda pos, tokens: logits[pos][:, tokens])
    log_mass = np.zeros((L, ta.num_atoms))
    dp._sum_values_log(ta.src_bounds, ta.edge_atom, ta.edge_dst, log_mass, dp.goal_states(ta, 0))
