"""Tests for model/structured/json_schema.py: for random schemas within the supported subset, EVERY choice of
tokens from each position's allowed set (filler included) fills to JSON that parses and validates;
unsupported features and malformed schemas are refused with their JSON pointer."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.structured.json_schema import (
    InvalidSchemaError,
    SchemaLimits,
    UnsupportedSchemaError,
    compile_schema,
)
from model.structured.templates import Slot, fill, layout
from tests.model.test_structured import random_ids, tiny_tokenizer

SMALL = SchemaLimits(
    string_tokens=5,
    string_chars_per_token=3,
    integer_tokens=3,
    fraction_tokens=2,
    array_items=2,
    max_array_items=4,
)


def generate(schema: dict, seed: int, filler_rate: float = 0.3, limits: SchemaLimits = SMALL) -> str:
    tok = tiny_tokenizer()
    lay = layout(compile_schema(schema, tok, limits), tok, canvas_length=8)
    return fill(lay, random_ids(lay, random.Random(seed), filler_rate), tok).text


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, cls=jsonschema.Draft202012Validator)


# --- random schemas within the subset --------------------------------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=5)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=6),
)


def _annotate(schema: dict, draw_title: bool) -> dict:
    return {**schema, "title": "t", "description": "d"} if draw_title else schema


@st.composite
def _string_schema(draw) -> dict:
    schema: dict = {"type": "string"}
    if draw(st.booleans()):
        schema["maxLength"] = draw(st.integers(0, 12))
    return schema


@st.composite
def _typed_enum(draw) -> dict:
    values = draw(st.lists(st.text(max_size=6), min_size=1, max_size=4, unique=True))
    schema = {"type": "string", "enum": values}
    if draw(st.booleans()):
        schema["maxLength"] = max(len(v) for v in values)
    return schema


_leaves = st.one_of(
    _string_schema(),
    st.sampled_from([{"type": t} for t in ("integer", "number", "boolean", "null")]),
    st.lists(_scalars, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
    _typed_enum(),
    _scalars.map(lambda v: {"const": v}),
    st.lists(st.integers(-50, 50), min_size=1, max_size=3, unique=True).map(
        lambda v: {"type": "integer", "enum": v}
    ),
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def obj(draw) -> dict:
        properties = draw(st.dictionaries(_names, children, max_size=3))
        required = [k for k in properties if draw(st.booleans())]
        schema = {"type": "object", "properties": properties, "required": required}
        if draw(st.booleans()):
            schema["additionalProperties"] = False
        return _annotate(schema, draw(st.booleans()))

    @st.composite
    def arr(draw) -> dict:
        schema: dict = {"type": "array", "items": draw(children)}
        if draw(st.booleans()):
            schema["maxItems"] = draw(st.integers(0, 3))
        if draw(st.booleans()):
            schema["minItems"] = draw(st.integers(0, schema.get("maxItems", 3)))
        return schema

    return st.one_of(obj(), arr())


def _depth_at_most(levels: int) -> st.SearchStrategy:
    leaf = _leaves.map(dict)  # map: keeps one_of from flattening the leaf kinds into many branches
    strategy = leaf
    for _ in range(levels):
        strategy = st.one_of(leaf, _containers(strategy), _containers(strategy))  # containers 2:1
    return strategy


_nested = _containers(_depth_at_most(2))  # objects / arrays, depth <= 3


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_nested, seed=st.integers(0, 2**32 - 1), filler_rate=st.sampled_from([0.0, 0.3, 0.9]))
def test_every_token_choice_gives_valid_json(schema, seed, filler_rate):
    assert_valid(generate(schema, seed, filler_rate), schema)


@settings(max_examples=200, deadline=None)
@given(schema=_leaves, seed=st.integers(0, 2**32 - 1), filler_rate=st.sampled_from([0.0, 0.3, 0.9]))
def test_every_token_choice_gives_valid_json_for_root_scalars(schema, seed, filler_rate):
    assert_valid(generate(schema, seed, filler_rate), schema)


@settings(max_examples=100, deadline=None)
@given(max_length=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_max_length_holds_for_the_longest_tokens(max_length, seed):
    """Adversarial: at each position take the allowed token that decodes to the most chars."""
    tok = tiny_tokenizer()
    schema = {"type": "string", "maxLength": max_length}
    lay = layout(compile_schema(schema, tok, SchemaLimits(string_tokens=8)), tok, canvas_length=8)
    rng = random.Random(seed)
    ids = []
    for position in range(lay.num_positions):
        mask = lay.allowed(position)
        if mask is None:
            ids.append(int(lay.pin_ids[position]))
            continue
        allowed = torch.nonzero(mask).flatten().tolist()
        longest = max(len(tok.token_bytes(t).decode("utf-8", "replace")) for t in allowed)
        ids.append(
            rng.choice([t for t in allowed if len(tok.token_bytes(t).decode("utf-8", "replace")) == longest])
        )
    text = fill(lay, ids, tok).text
    assert_valid(text, schema)
    assert len(json.loads(text)) >= max_length - 8  # the bound is used, not wasted


def test_all_filler_gives_the_documented_defaults():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "z": {"type": "null"},
            "e": {"enum": ["x", 2]},
            "c": {"const": {"k": [1]}},
            "a": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            "empty": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
            "o": {"type": "object"},
        },
    }
    text = generate(schema, 0, filler_rate=1.0)
    assert text == (
        '{"s": "", "i": 0, "n": 0.0, "b": true, "z": null, "e": "x", "c": {"k": [1]}, "a": [0, 0], "empty": [], "o": {}}'
    )
    assert_valid(text, schema)


def test_template_shape_and_slot_names():
    tok = tiny_tokenizer()
    schema = {
        "type": "object",
        "properties": {"a/b": {"type": "number"}, "t": {"type": "array", "items": {"type": "string"}}},
    }
    template = compile_schema(schema, tok, SMALL)
    names = [p.name for p in template.parts if isinstance(p, Slot)]
    assert names == ["#/a~1b~sign", "#/a~1b~int", "#/a~1b~frac", "#/t/0", "#/t/1"]
    kinds = [p.kind for p in template.parts if isinstance(p, Slot)]
    assert kinds == [
        "json_minus",
        "json_int_digits",
        "json_frac_digits",
        "json_string_body",
        "json_string_body",
    ]


@pytest.mark.parametrize(
    ("array", "count"),
    [
        ({}, 2),  # limits.array_items
        ({"maxItems": 3}, 3),
        ({"minItems": 3}, 3),
        ({"maxItems": 9}, 4),  # capped at limits.max_array_items
        ({"maxItems": 0}, 0),
    ],
)
def test_array_length_rule(array, count):
    schema = {"type": "array", "items": {"type": "integer"}, **array}
    value = json.loads(generate(schema, 1))
    assert len(value) == count


def test_string_max_length_slot_size():
    tok = tiny_tokenizer()
    (slot,) = compile_schema({"type": "string", "maxLength": 10}, tok, SMALL).slots
    assert (slot.max_tokens, slot.max_chars) == (4, 10)  # ceil(10 / 3) positions, caps 3+3+2+2
    (slot,) = compile_schema({"type": "string", "maxLength": 100}, tok, SMALL).slots
    assert (slot.max_tokens, slot.max_chars) == (5, 100)  # string_tokens bounds the positions


def test_lone_surrogates_are_escaped_in_keys_and_values():
    schema = {
        "type": "object",
        "properties": {"k\ud800": {"const": "v\udfff"}, "e": {"enum": ["\ud801", "x"]}},
    }
    text = generate(schema, 0)
    assert "\\ud800" in text and "\\udfff" in text
    assert_valid(text, schema)


def test_enum_returns_each_value_when_spelled():
    tok = tiny_tokenizer()
    values = ["red", "green", 3, None, "gr"]
    lay = layout(compile_schema({"enum": values}, tok), tok, canvas_length=8)
    (name,) = lay.slot_spans
    start, end = lay.slot_spans[name]
    for value in values:
        spelled = tok.encode(json.dumps(value))
        ids = lay.pin_ids.tolist()
        ids[start:end] = spelled + [tok.pad_id] * (end - start - len(spelled))
        assert json.loads(fill(lay, ids, tok).text) == value


# --- refusals ------------------------------------------------------------------------------------

_UNSUPPORTED = [
    ({"$ref": "#/$defs/x"}, "$ref"),
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"type": "string", "format": "date"}, "format"),
    ({"type": "string", "minLength": 1}, "minLength"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "number", "maximum": 1}, "maximum"),
    ({"type": "number", "exclusiveMinimum": 1}, "exclusiveMinimum"),
    ({"type": "integer", "multipleOf": 2}, "multipleOf"),
    ({"anyOf": [{"type": "string"}]}, "anyOf"),
    ({"oneOf": [{"type": "string"}]}, "oneOf"),
    ({"allOf": [{"type": "string"}]}, "allOf"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {}, "type": "string"}, "if"),
    ({"type": "object", "patternProperties": {"a": {}}}, "patternProperties"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": {"type": "string"}, "contains": {"type": "string"}}, "contains"),
    ({"type": "array", "prefixItems": [{"type": "string"}]}, "prefixItems"),
    ({"type": "array", "items": [{"type": "string"}]}, "items as a list"),
    ({"type": "array"}, "array without items"),
    ({"type": ["string", "null"]}, "type list"),
    ({"type": "string", "x-custom": 1}, "x-custom"),
    ({"type": "integer", "maxLength": 3}, "maxLength"),
    ({}, "schema without type"),
    ({"description": "anything"}, "schema without type"),
    (True, "boolean schema"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "required property not in properties"),
    ({"enum": [1], "const": 1}, "const"),
    ({"type": "object", "enum": [{}], "properties": {}}, "properties"),
]


@pytest.mark.parametrize(("subschema", "feature"), _UNSUPPORTED, ids=[f for _, f in _UNSUPPORTED])
def test_unsupported_feature_is_named_with_its_pointer(subschema, feature):
    tok = tiny_tokenizer()
    schema = {"type": "object", "properties": {"outer": {"type": "array", "items": subschema, "maxItems": 1}}}
    with pytest.raises(UnsupportedSchemaError) as caught:
        compile_schema(schema, tok)
    error = caught.value
    assert error.feature == feature
    assert error.path.startswith("/properties/outer/items")
    assert repr(feature) in str(error) and "#/properties/outer/items" in str(error)


def test_unsupported_keyword_pointer_is_exact():
    with pytest.raises(UnsupportedSchemaError, match=r"'pattern' at #/properties/a~1b/pattern"):
        compile_schema(
            {"type": "object", "properties": {"a/b": {"type": "string", "pattern": "x"}}}, tiny_tokenizer()
        )


def test_nesting_limit():
    schema: dict = {"type": "string"}
    for _ in range(5):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    with pytest.raises(UnsupportedSchemaError, match="nesting deeper than 4"):
        compile_schema(schema, tiny_tokenizer(), SchemaLimits(max_depth=4))
    assert json.loads(generate(schema, 0, limits=SchemaLimits(max_depth=5)))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("not a schema", "must be a JSON object"),
        ({"type": "str"}, "'type' must be one of"),
        ({"type": "string", "maxLength": -1}, "non-negative integer"),
        ({"type": "string", "maxLength": "5"}, "non-negative integer"),
        ({"type": "array", "items": {"type": "string"}, "maxItems": True}, "non-negative integer"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1}, "minItems 3 is above"),
        ({"enum": []}, "non-empty array"),
        ({"type": "string", "enum": ["a", 1]}, "not of type string"),
        ({"type": "string", "maxLength": 1, "enum": ["ab"]}, "longer than maxLength"),
        ({"const": float("nan")}, "not finite JSON"),
        ({"type": "object", "properties": []}, "'properties' must be"),
        ({"type": "object", "properties": {1: {"type": "null"}}}, "'properties' must be"),
        ({"type": "object", "properties": {}, "required": "a"}, "'required' must be"),
        ({"type": "object", "additionalProperties": 1}, "'additionalProperties' must be"),
    ],
)
def test_invalid_schema_errors(schema, message):
    with pytest.raises(InvalidSchemaError, match=message):
        compile_schema(schema, tiny_tokenizer())


def test_errors_are_value_errors():
    assert issubclass(UnsupportedSchemaError, ValueError) and issubclass(InvalidSchemaError, ValueError)


@pytest.mark.parametrize(
    "schema",
    [
        {"enum": ["<bos>", "a<eos>"]},
        {"const": "<pad>"},
        {"type": "object", "properties": {"<bos>": {"type": "string", "enum": ["x<unk>"]}}},
    ],
)
def test_special_token_text_in_literals_is_escaped_not_refused(schema):
    """Regression: literal strings spelling special tokens used to fail layout; JSON escapes '<' instead."""
    for seed in range(3):
        text = generate(schema, seed)
        assert "<" not in text
        assert_valid(text, schema)
