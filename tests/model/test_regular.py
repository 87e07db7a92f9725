"""Tests for regular constraints (model/structured/regex.py, pattern.py, schema_regular.py, automaton.py, dp.py,
decode.py, constraint.py): the DP finds the most probable valid canvas (brute force on tiny vocabularies), the
token automaton agrees with the byte DFA, and for random schemas and random scores every output parses and
validates; unsupported keywords are refused with their pointer."""

from __future__ import annotations

import collections
import itertools
import json
import math
import re

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from model.sampling.categorical import EXP_FLOOR
from model.structured.automaton import lift
from model.structured.constraint import RegularLayout, compile_json_schema
from model.structured.dp import best_tokens, goal_states
from model.structured.json_schema import UnsupportedSchemaError
from model.structured.pattern import FORMATS, PatternError, pattern
from model.structured.regex import FILLER, alt, byteset, compile_dfa, lit, rep, seq
from model.structured.schema_regular import RegularLimits, schema_dfa
from model.structured.token_classes import TokenClasses, token_classes_for
from tests.model.test_structured import tiny_tokenizer

FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER

# --- the DP against brute force ---------------------------------------------------------------------

_sym = st.sampled_from([b"a", b"b", b"c"]).map(lit)
_exprs = st.recursive(
    _sym,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: seq(*xs)),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: alt(*xs)),
        st.tuples(inner, st.integers(0, 2), st.sampled_from([None, 0, 1, 2])).map(
            lambda t: rep(t[0], t[1], None if t[2] is None else t[1] + t[2])
        ),
    ),
    max_leaves=6,
)
# a tiny vocabulary: the pad (filler), a special token (spells nothing), single and double letters
_TINY_VOCAB = [b"", b"", b"a", b"b", b"c", b"ab", b"ca", b"bb"]


def _tiny_automaton(expr):
    dfa = compile_dfa(seq(expr, rep(byteset([FILLER]), 0, None)))
    assume(not dfa.is_empty())
    return dfa, lift(dfa, TokenClasses(_TINY_VOCAB, pad_id=0))


def _lift(expr):
    return lift(compile_dfa(expr), TokenClasses(_TINY_VOCAB, pad_id=0))


@settings(max_examples=150, deadline=None)
@given(expr=_exprs, length=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_dp_returns_the_most_probable_valid_assignment(expr, length, seed):
    _, ta = _tiny_automaton(expr)
    scores = np.random.default_rng(seed).normal(size=(length, len(_TINY_VOCAB)))
    goal = goal_states(ta, 0)
    best = None
    for ids in itertools.product(range(len(_TINY_VOCAB)), repeat=length):
        state = ta.run(ids)
        if state >= 0 and goal[state]:
            total = scores[np.arange(length), ids].sum()
            best = total if best is None else max(best, total)
    got = best_tokens(ta, scores, 0, goal)
    if best is None:
        assert got is None
        return
    state = ta.run(got.tolist())
    assert state >= 0 and goal[state]
    assert scores[np.arange(length), got].sum() == pytest.approx(best)


@settings(max_examples=150, deadline=None)
@given(expr=_exprs, ids=st.lists(st.integers(0, len(_TINY_VOCAB) - 1), max_size=6))
def test_token_automaton_agrees_with_the_byte_dfa(expr, ids):
    dfa, ta = _tiny_automaton(expr)
    symbols = [s for i in ids for s in ((FILLER,) if i == 0 else _TINY_VOCAB[i])]
    spelled = -1 if any(i == 1 for i in ids) else dfa.run(symbols)  # the special token is never allowed
    assert ta.run(ids) == spelled


def test_goal_states_keep_the_remaining_canvases_completable():
    dfa = compile_dfa(seq(lit(b"abcabc"), rep(byteset([FILLER]), 0, None)))
    ta = lift(dfa, TokenClasses(_TINY_VOCAB, pad_id=0))
    assert ta.distance[0] == 4  # "ab", "ca", "b", "c" at best
    scores = np.zeros((2, len(_TINY_VOCAB)))
    assert best_tokens(ta, scores, 0, goal_states(ta, 0)) is None  # 2 positions cannot hold it
    first = best_tokens(ta, scores, 0, goal_states(ta, 2))  # a first canvas of 2, then 2 more positions
    assert ta.distance[ta.run(first.tolist())] <= 2


# --- schemas: random ones from the supported set, random scores ---------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=4)
_literal_values = st.one_of(st.none(), st.booleans(), st.integers(-99, 99), st.text(max_size=5))


@st.composite
def _string(draw) -> dict:
    schema: dict = {"type": "string"}
    kind = draw(st.sampled_from(["plain", "length", "pattern", "format"]))
    if kind == "length":
        schema["minLength"] = draw(st.integers(0, 3))
        schema["maxLength"] = schema["minLength"] + draw(st.integers(0, 4))
    elif kind == "pattern":
        schema["pattern"] = draw(st.sampled_from(["^[a-c]+$", "^x(yz)*$", "[0-9]{2}", "^(on|off)$", "é"]))
    elif kind == "format":
        schema["format"] = draw(st.sampled_from(["date", "email", "uuid", "ipv4"]))
    return schema


@st.composite
def _number(draw) -> dict:
    schema: dict = {"type": draw(st.sampled_from(["integer", "number"]))}
    lo = draw(st.one_of(st.none(), st.integers(-30, 30)))
    hi = draw(st.one_of(st.none(), st.integers(-30, 30)))
    if lo is not None:
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = lo
    if hi is not None and (lo is None or hi >= lo + 2):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = hi
    return schema


_leaf = st.one_of(
    _string(),
    _number(),
    st.sampled_from(
        [{"type": "boolean"}, {"type": "null"}, {"type": ["string", "null"]}, {}, {"type": "object"}]
    ),
    st.lists(_literal_values, min_size=1, max_size=3, unique_by=json.dumps).map(lambda v: {"enum": v}),
    _literal_values.map(lambda v: {"const": v}),
    st.just({"enum": ["<bos>", "<eos>x"]}),  # special-token text inside strings
)


def _containers(children):
    @st.composite
    def obj(draw) -> dict:
        properties = draw(st.dictionaries(_names, children, max_size=3))
        schema = {
            "type": "object",
            "properties": properties,
            "required": [k for k in properties if draw(st.booleans())],
        }
        extra = draw(st.sampled_from(["absent", False, True, {"type": "integer", "maximum": 9}]))
        if extra != "absent":
            schema["additionalProperties"] = extra
            if extra is not False and draw(st.booleans()):
                schema["minProperties"] = len(schema["required"]) + 1  # one extra property at least
        return schema

    @st.composite
    def arr(draw) -> dict:
        schema: dict = {"type": "array", "items": draw(children), "minItems": draw(st.integers(0, 2))}
        if draw(st.booleans()):
            schema["maxItems"] = schema["minItems"] + draw(st.integers(0, 2))
        return schema

    @st.composite
    def any_of(draw) -> dict:
        return {
            "anyOf": draw(st.lists(children, min_size=1, max_size=2)),
            "description": "x",
            "unknownKeyword": 1,
        }

    return st.one_of(obj(), arr(), any_of())


_schemas = st.recursive(_leaf, _containers, max_leaves=5)


def _generate(schema, seed: int, positions: int = 64) -> str | None:
    tok = tiny_tokenizer()
    compiled = compile_json_schema(schema, token_classes_for(tok))
    ta = compiled.automaton
    if compiled.min_tokens > positions:
        return None
    scores = np.random.default_rng(seed).normal(size=(positions, tok.vocab_size)) * 3
    ids = best_tokens(ta, scores, 0, goal_states(ta, 0))
    lay = RegularLayout(compiled, positions, 1, tok.pad_id)
    return lay.fill(ids.tolist(), tok.token_bytes).text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_schemas, seed=st.integers(0, 2**32 - 1))
def test_random_schemas_and_scores_give_valid_json(schema, seed):
    text = _generate(schema, seed)
    assume(text is not None)
    jsonschema.validate(json.loads(text), schema, format_checker=FORMAT_CHECKER)


RECURSIVE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["v"],
        }
    },
    "$ref": "#/$defs/node",
}


@pytest.mark.parametrize(
    "schema",
    [
        RECURSIVE,
        {"oneOf": [{"type": "integer"}, {"type": "string", "format": "date"}]},
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
        {
            "type": "object",
            "definitions": {"p": {"type": "string", "maxLength": 3}},
            "properties": {"p": {"$ref": "#/definitions/p"}},
            "required": ["p"],
        },
        {
            "type": "array",
            "items": {"type": "string", "format": "date-time"},
            "minItems": 1,
            "uniqueItems": True,
        },
        {"type": "number", "minimum": 2.5, "exclusiveMaximum": 7},
        {"type": "integer", "minimum": 100, "maximum": 120, "multipleOf": 1},
    ],
)
def test_schema_features_give_valid_json(schema):
    for seed in range(4):
        text = _generate(schema, seed, positions=80)
        jsonschema.validate(json.loads(text), schema, format_checker=FORMAT_CHECKER)


@pytest.mark.parametrize(
    "source",
    [
        "^[a-z]+$",
        "^\\d{3}-\\d{4}$",
        "ab|cd",
        "^(foo|bar)+baz?$",
        "[A-Z]{2,3}[0-9]*",
        "^\\w+@\\w+\\.com$",
        "^é+ü?$",
        "^[^a-z\\s]{2}$",
    ],
)
def test_pattern_strings_match_python_re(source):
    body = compile_dfa(seq(lit(b'"'), pattern(source), lit(b'"'), rep(byteset([FILLER]), 0, None)))
    ta = lift(body, TokenClasses([b""] + [bytes([b]) for b in range(256)], pad_id=0))
    for seed in range(5):
        scores = np.random.default_rng(seed).normal(size=(12, 257))
        ids = best_tokens(ta, scores, 0, goal_states(ta, 0))
        text = bytes(i - 1 for i in ids.tolist() if i).decode("utf-8")
        assert re.search(source, json.loads(text)), (source, text)


def test_formats_validate_with_the_format_checker():
    for name in ("date", "email", "uuid", "ipv4", "date-time"):
        text = _generate({"type": "string", "format": name}, seed=1, positions=80)
        jsonschema.validate(
            json.loads(text), {"type": "string", "format": name}, format_checker=FORMAT_CHECKER
        )
    assert set(FORMATS) >= {"date", "date-time", "email", "uuid", "ipv4", "uri"}
    # year 0000 is RFC 3339 but not a date for the format checker (Python's date): kept out of the language
    date = re.compile(FORMATS["date"])
    assert not date.match("0000-01-02") and date.match("0001-01-02") and date.match("2000-12-31")


# --- strings with escapes, generic JSON ------------------------------------------------------------------

_bmp_text = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",)), max_size=6)


@settings(max_examples=150, deadline=None)
@given(text=_bmp_text, lo=st.integers(0, 3), extra=st.integers(0, 3), ascii_only=st.booleans())
def test_string_language_is_json_strings_counted_by_decoded_length(text, lo, extra, ascii_only):
    """Raw characters and escapes (json.dumps writes `\\n`, `\\"`, `\\\\`, and `\\uXXXX` with
    ensure_ascii) are all in the language; each counts as one character against min/maxLength."""
    dfa = schema_dfa({"type": "string", "minLength": lo, "maxLength": lo + extra})
    written = json.dumps(text, ensure_ascii=ascii_only).encode()
    assert dfa.matches(written) == (lo <= len(text) <= lo + extra), written


def test_string_language_refuses_lone_surrogates_and_bad_escapes():
    dfa = schema_dfa({"type": "string"})
    for bad in (b'"\\ud800"', b'"\\x41"', b'"\\u12"', b'"a\nb"', b'"\\"'):
        assert not dfa.matches(bad), bad
    assert dfa.matches(b'"\\u00e9\\/\\b\\f\\r\\t\\uD7FF"')


def test_generic_objects_hold_properties():
    """`{"type": "object"}` (additionalProperties defaults to true) gives real objects, not only `{}`."""
    schema = {"type": "object"}
    sizes = []
    for seed in range(6):
        value = json.loads(_generate(schema, seed))
        assert isinstance(value, dict)
        sizes.append(len(value))
    assert max(sizes) > 0, sizes
    dfa = schema_dfa(schema)
    assert dfa.matches(b'{"a": [1, {"b\\n": null}], "c": "x\\"y"}')  # extra names: raw
    deep = b'{"a": {"b": {"c": {"d": 1}}}}'  # 4 levels: beyond any_depth + 1
    assert not dfa.matches(deep) and schema_dfa(schema, RegularLimits(any_depth=3)).matches(deep)


def test_extra_properties_never_reuse_listed_names():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "additionalProperties": {"type": "string"},
    }
    dfa = schema_dfa(schema)
    assert dfa.matches(b'{"a":1,"b":"x"}') and dfa.matches(b'{"b":"x","c":"y"}')
    assert not dfa.matches(b'{"a":"x"}') and not dfa.matches(b'{"a":1,"a":"x"}')
    listed_only = schema_dfa({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert listed_only.matches(b'{"a":1}') and not listed_only.matches(b'{"a":1,"b":2}')


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "feature", "pointer"),
    [
        ({"not": {"type": "string"}}, "not", "#/properties/a/not"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains", "#/properties/a/contains"),
        ({"type": "integer", "multipleOf": 3}, "multipleOf", "#/properties/a/multipleOf"),
        ({"type": "string", "pattern": "(a)\\1"}, "pattern", "#/properties/a/pattern"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf", "#/properties/a/oneOf/1"),
        ({"$ref": "https://example.com/x.json"}, "$ref", "#/properties/a/$ref"),
    ],
)
def test_unsupported_keywords_are_refused_with_their_pointer(sub, feature, pointer):
    with pytest.raises(UnsupportedSchemaError) as err:
        schema_dfa({"type": "object", "properties": {"a": sub}})
    assert err.value.feature == feature and f"at {pointer}" in str(err.value)


def test_unknown_keywords_are_ignored():
    dfa = schema_dfa({"type": "integer", "x-vendor": {"anything": 1}, "minimum": 1, "maximum": 3})
    assert [dfa.matches(str(i).encode()) for i in range(5)] == [False, True, True, True, False]


def test_patterns_outside_the_subset_raise():
    for bad in ("(?=a)", "a\\b", "(a)\\1", "a^b"):
        with pytest.raises(PatternError):
            pattern(bad)


def test_too_large_automata_are_refused():
    with pytest.raises(ValueError, match="automaton states"):
        schema_dfa(
            {"type": "string", "maxLength": 200, "pattern": "^[a-z]{0,150}x[a-z]{0,150}$"},
            RegularLimits(max_states=500),
        )


# --- the sampler hook: real denoising with a tiny model --------------------------------------------


def test_generation_under_a_schema_spans_canvases_and_validates():
    from deployments.requests import _constraints
    from model.config import from_name
    from model.sampling.generate import generate
    from model.sampling.params import SamplingParams
    from model.transformer import DiffusionGemma
    from model.weights import init_random

    cfg = from_name("tiny-test")  # canvas 16: the document below needs more than one canvas
    model = init_random(DiffusionGemma(cfg), seed=0).eval()
    tok = tiny_tokenizer()
    digits = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {
        "type": "object",
        "properties": {
            "ids": {"type": "array", "items": digits, "minItems": 8, "maxItems": 10},
            "ok": {"type": "boolean"},
        },
        "required": ["ids", "ok"],
    }
    compiled = compile_json_schema(schema, token_classes_for(tok, cfg.vocab_size))
    assert compiled.min_tokens > cfg.canvas_length
    for seed in range(2):
        lay = RegularLayout(compiled, cfg.canvas_length, 3, tok.pad_id)
        params = SamplingParams(max_new_tokens=48, max_denoising_steps=3)
        with torch.no_grad():
            out = generate(model, [2, 7, 9], params, seed=seed, constraints=_constraints(lay))
        jsonschema.validate(json.loads(lay.fill(out.token_ids, tok.token_bytes).text), schema)


# --- the sampler hook without per-token noise: exact argmax and exact constrained draws ------------------


def _joint_draws(ta, logits: torch.Tensor, seeds: range, chunk: int, sampled: torch.Tensor | None = None):
    """(argmax [R, L], sampled [R, L]) of JointStep for rows of seeds `seeds` over logits [L, V], the
    vocabulary walked in chunks of `chunk` (as the sampler does); `sampled`: the sampler's unconstrained
    draws [R, L] (default: drawn here)."""
    from types import SimpleNamespace

    from model.sampling import noise
    from model.structured.decode import JointStep, RegularCanvas, RegularRun

    L, V = logits.shape
    R = len(seeds)
    run = RegularRun(ta, num_canvases=1, canvas_length=L)
    rows = [SimpleNamespace(constraint=SimpleNamespace(joint=RegularCanvas(run, 0))) for _ in seeds]
    t = lambda v: torch.full((R,), v, dtype=torch.long)  # noqa: E731
    keys = noise.position_keys(noise.row_keys(torch.tensor(list(seeds)), t(0), t(3), noise.STREAM_GUMBEL), L)
    step = JointStep.begin(rows, L, keys)
    m = torch.full((L,), float("-inf"))
    for start in range(0, V, chunk):
        x = logits[:, start : start + chunk]
        # the sampler's exp values: relative to its running maximum, zero more than EXP_FLOOR under it
        m = torch.maximum(m, x.amax(-1))
        ref = torch.where(torch.isinf(m), 0.0, m)
        d = x - ref[:, None]
        e = torch.exp(d.clamp(min=EXP_FLOOR)).masked_fill_(d <= EXP_FLOOR, 0.0)
        rows_of = lambda t: t[None].expand(R, *t.shape)  # noqa: E731
        step.chunk(rows_of(x), start, rows_of(e), rows_of(ref))
    # the sampler's unconstrained argmax and draw (here from torch's RNG: independent of the keyed noise)
    argmax = logits.argmax(-1).expand(R, L)
    if sampled is None:
        gen = torch.Generator().manual_seed(seeds.start)
        sampled = torch.multinomial(torch.softmax(logits, -1).repeat(R, 1), 1, generator=gen).view(R, L)
    return step.finish(argmax, sampled, lambda r, pos, tokens: logits[pos][:, tokens])


@settings(max_examples=60, deadline=None)
@given(expr=_exprs, length=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), chunk=st.sampled_from([3, 8]))
def test_joint_step_argmax_is_the_dp_optimum(expr, length, seed, chunk):
    """The chunked hook's argmax canvas is the brute-force-checked DP's (`best_tokens` on full scores), with
    kept logits (chunk 8) and with recomputed blocks (chunk 3, nothing kept)."""
    from model.structured import decode

    _, ta = _tiny_automaton(expr)
    scores = torch.from_numpy(np.random.default_rng(seed).normal(size=(length, len(_TINY_VOCAB)))).float()
    want = best_tokens(ta, scores.double().numpy(), 0, goal_states(ta, 0))
    assume(want is not None)
    kept = decode.KEPT_ELEMENTS
    decode.KEPT_ELEMENTS = kept if chunk == 8 else 0
    try:
        argmax, sampled = _joint_draws(ta, scores, range(3), chunk)
    finally:
        decode.KEPT_ELEMENTS = kept
    assert argmax[0].tolist() == want.tolist()
    assert all(goal_states(ta, 0)[ta.run(row.tolist())] for row in sampled)  # draws are valid too


def test_rescaled_and_log_space_sums_agree():
    """The sampled DP's two recursions (rescaled probabilities, and log space for paths out of float64's
    range) give the same values where both are in range."""
    from model.structured import dp

    ta = _lift(seq(rep(alt(lit(b"ab"), lit(b"c"), lit(b"b")), 1, None), rep(byteset([FILLER]), 0, None)))
    log_mass = np.random.default_rng(3).normal(size=(6, ta.num_atoms)) * 5
    goal = goal_states(ta, 0)
    bounds = ta.src_bounds
    scaled, ok = dp._sum_values_scaled(bounds, ta.edge_atom, ta.edge_dst, log_mass, goal)
    exact = dp._sum_values_log(bounds, ta.edge_atom, ta.edge_dst, log_mass, goal)
    assert ok and np.isfinite(exact[0, 0])
    np.testing.assert_allclose(scaled[np.isfinite(exact)], exact[np.isfinite(exact)], rtol=1e-9, atol=1e-9)
    assert (np.isinf(scaled) == np.isinf(exact)).all()


@pytest.mark.parametrize(
    "kept, shift",
    [(True, 0.0), (False, 0.0), (False, -300.0)],
    ids=["kept-logits", "recomputed-blocks", "low"],
)
def test_joint_step_draws_from_the_exact_constrained_distribution(kept, shift, monkeypatch):
    """Enumerate every canvas of a tiny language: the draws' frequencies match the per-position product
    distribution restricted to the language (chi-square, p < 1e-4 to fail), and a row's draw is the same alone.
    Both ways of finding a token inside its atom: kept logits (small rows) and recomputed blocks (large); and
    logits far below zero (temperature-scaled logits can be), which change nothing."""
    from model.structured import decode

    if not kept:
        monkeypatch.setattr(decode, "KEPT_ELEMENTS", 0)
    ta = _lift(
        seq(rep(alt(lit(b"ab"), lit(b"c")), 1, None), rep(lit(b"b"), 0, 1), rep(byteset([FILLER]), 0, None))
    )
    L, V = 3, len(_TINY_VOCAB)
    logits = torch.from_numpy(np.random.default_rng(7).normal(size=(L, V))).float()
    logits[1, 4] = float("-inf")  # a masked token ("c" at position 1), as the sampler's class masks do
    logits += shift
    goal = goal_states(ta, 0)
    probs = {}
    for ids in itertools.product(range(V), repeat=L):
        state = ta.run(ids)
        if state >= 0 and goal[state]:
            probs[ids] = float(
                torch.exp(logits[torch.arange(L), torch.tensor(ids)].double().sum() - L * shift)
            )
    total = sum(probs.values())
    n = 6000
    gen = torch.Generator().manual_seed(0)
    free = torch.multinomial(torch.softmax(logits, -1).repeat(n, 1), 1, generator=gen).view(n, L)
    _, sampled = _joint_draws(ta, logits, range(n), chunk=3, sampled=free)
    counts = collections.Counter(tuple(row) for row in sampled.tolist())
    assert set(counts) <= set(probs)  # only valid canvases, never the masked token
    expected = {ids: n * p / total for ids, p in probs.items()}
    big = [ids for ids, e in expected.items() if e >= 5]  # the rest pooled into one bin
    chi2 = sum((counts[ids] - expected[ids]) ** 2 / expected[ids] for ids in big)
    rest_e = n - sum(expected[ids] for ids in big)
    rest_c = n - sum(counts[ids] for ids in big)
    chi2 += (rest_c - rest_e) ** 2 / rest_e if rest_e > 0 else 0.0
    df = len(big) - (0 if rest_e > 0 else 1)
    z = 3.719  # the standard normal's 1 - 1e-4 quantile; Wilson-Hilferty for the chi-square's quantile
    assert df >= 5 and chi2 < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    _, alone = _joint_draws(ta, logits, range(5, 6), chunk=3, sampled=free[5:6])  # alone, not in a batch
    assert alone[0].tolist() == sampled[5].tolist()


def test_joint_step_reaches_a_forced_token_far_below_the_best():
    """An atom hundreds of nats below its position's best token has zero float32 mass; the draw still
    takes the only valid path."""
    ta = _lift(seq(lit(b"c"), rep(byteset([FILLER]), 0, None)))
    logits = torch.zeros(2, len(_TINY_VOCAB))
    logits[0, 2] = 500.0  # "a" is far likelier at position 0, but the language is "c" then filler
    argmax, sampled = _joint_draws(ta, logits, range(4), chunk=8)
    assert argmax[0].tolist() == [4, 0] and all(row == [4, 0] for row in sampled.tolist())


def test_sampled_dp_keeps_paths_thousands_of_nats_below_the_best():
    """A path with mass e^-3000 (below float64's range as a probability) is still drawn when it is the only one."""
    from model.structured.dp import sample_atoms

    ta = _lift(seq(lit(b"c"), rep(byteset([FILLER]), 0, None)))
    log_mass = np.zeros((2, ta.num_atoms))
    log_mass[0, ta.atom_of[4]] = -3000.0  # "c", the only valid first token
    atoms, _ = sample_atoms(ta, log_mass, 0, goal_states(ta, 0), np.zeros_like(log_mass))
    assert atoms.tolist() == [ta.atom_of[4], ta.atom_of[0]]


# --- slot minimums: the filler is weighed, not a default -------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 4)), min_size=1, max_size=2),
    seed=st.integers(0, 2**32 - 1),
)
def test_slot_minimum_is_the_best_canvas_with_enough_content(spans, seed):
    """Brute force over one canvas: pad (0) or content ids 1..2 per slot position."""
    from model.structured.decode import SlotCanvas, SlotRun

    layout_spans, pos = [], 0
    for size, least in spans:
        layout_spans.append((pos, pos + size, min(least, size)))
        pos += size
    L, V = pos, 3
    run = SlotRun(layout_spans, L, pad_id=0)
    scores = torch.from_numpy(np.random.default_rng(seed).normal(size=(L, V))).float()
    acc = SlotCanvas(run, 0).accumulator(L, torch.zeros(L, dtype=torch.long))
    acc.chunk(0, scores, 0)
    got = acc.solve(0, scores.argmax(-1))
    best = max(
        scores[torch.arange(L), torch.tensor(ids)].sum().item()
        for ids in itertools.product(range(V), repeat=L)
        if all(sum(1 for t in ids[a:b] if t) >= m for a, b, m in layout_spans)
    )
    assert all(int((got[a:b] != 0).sum()) >= m for a, b, m in layout_spans)
    assert scores[torch.arange(L), got].sum().item() == pytest.approx(best, abs=1e-5)


def test_slot_minimum_straddling_canvases_counts_what_earlier_canvases_committed():
    from model.structured.decode import SlotRun

    run = SlotRun([(2, 10, 5)], canvas_length=4, pad_id=0)  # positions 2..9 over canvases 0, 1, 2
    assert run.needs(0) == [(0, 2, 4, 0)]  # 6 later positions can still hold all 5
    run.counts[(0, 0)] = 1
    assert run.needs(1) == [(0, 0, 4, 2)]  # 5 - 1 committed - 2 positions in canvas 2
    run.counts[(1, 0)] = 2
    assert run.needs(2) == [(0, 0, 2, 2)]


def test_compilation_time_is_bounded():
    with pytest.raises(ValueError, match="too long"):
        schema_dfa(
            {"type": "object", "properties": {"a": {"type": "string"}}}, RegularLimits(max_build_seconds=0)
        )


@pytest.mark.parametrize(
    "schema",
    [
        {"const": "\x1f", "unknownKeyword": 1},
        {"anyOf": [{"const": "\x1f"}], "description": "x", "unknownKeyword": 1},
        {"enum": ["a\nb", 3], "x-vendor": {"type": "string"}},
    ],
)
def test_unknown_keywords_beside_a_literal_do_not_constrain_it(schema):
    # Found by hypothesis: an unknown keyword was taken as a constraint, intersecting the literal's escaped
    # text with the generic JSON language (which generates no escapes) and leaving nothing to generate.
    for seed in (0, 1):
        text = _generate(schema, seed)
        assert text is not None
        jsonschema.validate(json.loads(text), schema)
