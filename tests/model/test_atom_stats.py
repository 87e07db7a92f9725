"""The joint hook's per-atom statistics on the logits' device (torch ops) against the compiled host pass,
and the compiled loops' start-up: warm-up, and a process where numba finds no writable cache directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.structured import atom_stats, decode
from model.structured.atom_stats import AtomOrder, chunk_stats, chunk_stats_torch
from model.structured.dp import goal_states
from model.structured.regex import FILLER, alt, byteset, lit, rep, seq
from tests.model.test_regular import _TINY_VOCAB, _joint_draws, _lift

ROOT = Path(__file__).resolve().parents[2]


_RANDOM_BLOCKS = given(
    L=st.integers(1, 9),
    atoms=st.integers(1, 5),
    block=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**32 - 1),
)


def compiled_blocks(L: int, atoms: int, block: int, seed: int):
    """Random logits x and exp values e [L, V] over a vocabulary of two blocks and a short one, each token in
    one of `atoms` atoms or none: small integer logits (many ties), ~30% masked (-inf, zero exp), atom 0 with no
    finite logit at position 0. Returns (atom_of, x, e, order, blocks), blocks a list of (b, start, stop, xs,
    es, (best, arg, mass)) with the compiled pass's statistics of each block."""
    rng = np.random.default_rng(seed)
    V = 2 * block + 3  # a short last block
    atom_of = rng.integers(-1, atoms, V)
    x = rng.integers(-3, 3, size=(L, V)).astype(np.float32)
    x[rng.random((L, V)) < 0.3] = -np.inf
    x[0, atom_of == 0] = -np.inf  # atom 0 has no finite logit at position 0
    e = np.exp(x - 1.0).astype(np.float32)
    order = AtomOrder.build(atom_of, block, atoms)
    blocks = []
    for b, start in enumerate(range(0, V, block)):
        stop = min(V, start + block)
        xs, es = np.ascontiguousarray(x[:, start:stop]), np.ascontiguousarray(e[:, start:stop])
        best, arg = np.empty((L, atoms), np.float32), np.empty((L, atoms), np.int64)
        mass = np.empty((L, atoms), np.float32)
        chunk_stats(xs, es, order.offsets, order.bounds, b, start, best, arg, mass)
        blocks.append((b, start, stop, xs, es, (best, arg, mass)))
    return atom_of, x, e, order, blocks


@settings(max_examples=40, deadline=None)
@_RANDOM_BLOCKS
def test_chunk_statistics_match_a_plain_reduction(L, atoms, block, seed):
    """The compiled per-(position, atom) statistics of one block (best logit, its first token, summed exp
    values) equal a plain reduction over the atom's tokens, with ties, masked tokens and empty atoms; any L
    (four positions at a time, then the rest)."""
    atom_of, x, e, order, blocks = compiled_blocks(L, atoms, block, seed)
    for b, start, stop, _, _, (best, arg, mass) in blocks:
        for a in range(atoms):
            run = start + np.nonzero(atom_of[start:stop] == a)[0]
            assert order.run(b, a).tolist() == run.tolist()
            for p in range(L):
                if len(run) == 0 or np.isneginf(x[p, run]).all():
                    assert best[p, a] == -np.inf and arg[p, a] == -1 and mass[p, a] == 0
                    continue
                assert best[p, a] == x[p, run].max() and arg[p, a] == run[np.argmax(x[p, run])]
                assert mass[p, a] == pytest.approx(e[p, run].astype(np.float64).sum(), rel=1e-6)


@settings(max_examples=40, deadline=None)
@_RANDOM_BLOCKS
def test_torch_statistics_equal_the_compiled_pass(L, atoms, block, seed):
    """Same best logits and first tokens, close masses, block by block: ties (small integer logits), masked
    tokens (-inf, zero exp), atoms with no token in a block or no finite logit at a position, tokens in no
    atom, a short last block, any L."""
    atom_of, _, _, _, blocks = compiled_blocks(L, atoms, block, seed)
    index = torch.from_numpy(np.where(atom_of < 0, atoms, atom_of))
    for _, start, stop, xs, es, (best, arg, mass) in blocks:
        for one_hot_limit in (atom_stats.ONE_HOT_ELEMENTS, 0):  # the mass by GEMM, then by scatter-sum
            with mock.patch.object(atom_stats, "ONE_HOT_ELEMENTS", one_hot_limit):
                tb, ta, tm = chunk_stats_torch(
                    torch.from_numpy(xs), torch.from_numpy(es), index[start:stop], atoms, start
                )
            np.testing.assert_array_equal(tb.numpy(), best)
            np.testing.assert_array_equal(ta.numpy(), arg)
            np.testing.assert_allclose(tm.numpy(), mass, rtol=1e-6, atol=0)
        assert (arg[0, (best[0] == -np.inf)] == -1).all()


_LANGUAGE = seq(
    rep(alt(lit(b"ab"), lit(b"c")), 1, None), rep(lit(b"b"), 0, 1), rep(byteset([FILLER]), 0, None)
)


@pytest.mark.parametrize("kept", [True, False], ids=["kept-logits", "recomputed-blocks"])
def test_joint_step_on_the_torch_path_draws_what_the_compiled_path_draws(kept, monkeypatch):
    """The whole hook with its statistics from torch ops (forced on CPU) gives the compiled path's argmax
    and sampled canvases, every one valid; a short last chunk and a masked token included."""
    if not kept:
        monkeypatch.setattr(decode, "KEPT_ELEMENTS", 0)
    ta = _lift(_LANGUAGE)
    L, V = 5, len(_TINY_VOCAB)
    logits = torch.from_numpy(np.random.default_rng(11).normal(size=(L, V))).float()
    logits[1, 4] = float("-inf")
    logits[2, 5] = logits[2, 2] = logits[2].max() + 1  # a tie at the top
    host = _joint_draws(ta, logits, range(40), chunk=3)
    monkeypatch.setattr(decode._RowAccumulator, "device_stats", True)
    dev = _joint_draws(ta, logits, range(40), chunk=3)
    assert torch.equal(dev[0], host[0]) and torch.equal(dev[1], host[1])
    goal = goal_states(ta, 0)
    assert all(goal[ta.run(row.tolist())] for row in torch.cat(dev))


def test_generation_on_the_torch_path_matches_the_compiled_path(monkeypatch):
    """Real denoising with a tiny model under a JSON Schema (three canvases, recomputed blocks: the tiny
    model's vocabulary is too large to keep): the torch statistics give the compiled path's document."""
    from deployments.requests import _constraints
    from model.config import from_name
    from model.sampling.generate import generate
    from model.sampling.params import SamplingParams
    from model.structured.constraint import RegularLayout, compile_json_schema
    from model.structured.token_classes import token_classes_for
    from model.transformer import DiffusionGemma
    from model.weights import init_random
    from tests.model.test_structured import tiny_tokenizer

    cfg = from_name("tiny-test")
    model = init_random(DiffusionGemma(cfg), seed=0).eval()
    tok = tiny_tokenizer()
    digits = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": digits, "maxItems": 9}}}
    compiled = compile_json_schema(schema, token_classes_for(tok, cfg.vocab_size))

    def document():
        lay = RegularLayout(compiled, cfg.canvas_length, 3, tok.pad_id)
        params = SamplingParams(max_new_tokens=48, max_denoising_steps=3)
        with torch.no_grad():
            out = generate(model, [2, 7, 9], params, seed=5, constraints=_constraints(lay))
        return out.token_ids, lay.fill(out.token_ids, tok.token_bytes).text

    host = document()
    monkeypatch.setattr(decode._RowAccumulator, "device_stats", True)
    assert document() == host
    jsonschema.validate(json.loads(host[1]), schema)


def test_warm_up_compiles_every_loop_even_without_a_writable_cache():
    """In a fresh process where numba finds no writable cache location (its import used to raise there),
    `warm_up` compiles every non-inlined compiled function of the hook."""
    script = (
        "import json\n"
        "from numba.core.registry import CPUDispatcher\n"
        "from model.structured import atom_stats, dp\n"
        "from model.structured.warmup import warm_up\n"
        "warm_up()\n"
        "fs = {n: f for m in (atom_stats, dp) for n, f in vars(m).items() if isinstance(f, CPUDispatcher)}\n"
        "print(json.dumps({n: len(f.signatures) for n, f in fs.items() if f.targetoptions.get('inline') != 'always'}))\n"
    )
    env = dict(
        os.environ, NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator", NUMBA_CACHE_DIR="/dev/null/x"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    compiled = json.loads(out.stdout.splitlines()[-1])
    assert {"chunk_stats", "_max_values", "_walk", "_sum_values_scaled", "_sum_values_log"} <= set(compiled)
    assert all(n == 1 for n in compiled.values()), compiled
    assert "numba cache unavailable" in out.stderr
