"""JSON Schema -> `Template` compiler: schema-guaranteed JSON from a block-diffusion canvas.

The schema becomes fixed JSON structure (braces, keys, commas, quotes: pinned tokens) and typed
slots (`model/structured/templates.py` SLOT_KINDS) whose per-position allowed-token sets make every
possible output valid. Outlines/XGrammar-style constrained decoding walks a grammar left to right;
a diffusion canvas has no order, so here each position gets an *independent* allowed set and the
guarantee must hold for every combination of choices.

Supported subset (anything else raises `UnsupportedSchemaError` naming the keyword and its JSON
pointer; malformed schemas raise `InvalidSchemaError`; both are `ValueError`s):

- `type`: one of object, array, string, integer, number, boolean, null (a single string).
- object: `properties` (emitted in the schema's order, all of them, so any `required` subset of
  them holds), `required` (must name listed properties), `additionalProperties` (ignored: only
  listed properties are emitted, which satisfies any value of it).
- array: `items` (one schema), `maxItems`, `minItems`. Arrays have a FIXED length n: `maxItems`
  if given, else max(`minItems`, limits.array_items); capped at limits.max_array_items (a cap
  below `minItems` is refused).
- string: `maxLength`. Without it a string has limits.string_tokens positions. With it, the
  slot gets min(ceil(maxLength / string_chars_per_token), string_tokens) positions whose per-token
  code-point caps sum to maxLength.
- integer: `-?` then digits; number: `-?` digits `.` digits (always with a fraction; no exponent).
- boolean: `true` / `false`; null: `null`.
- `enum` (JSON values, optionally with `type` / `maxLength`, each value checked against them),
  `const` (pinned verbatim).
- annotations anywhere: title, description, $schema, $id, $comment, default, examples,
  deprecated, readOnly, writeOnly.

Not supported: $ref/$defs, anyOf/oneOf/allOf/not, if/then/else, pattern, format, minLength,
minimum/maximum/exclusive*, multipleOf, patternProperties, propertyNames, min/maxProperties,
dependent*, prefixItems/tuple items, contains, uniqueItems, unevaluated*, type lists, boolean
schemas, schemas without type/enum/const, and any unknown keyword.

Why each output is valid (with `fill`'s documented filler removal and normalisation):
- strings: body tokens never spell `"`, `\\` or a byte < 0x20; the body is decoded with U+FFFD
  replacement, so it cannot close its quotes, start an escape or hold a raw control char.
  Decoded length is at most the sum of the per-token caps (`token_classes.char_count` is
  subadditive), which is <= maxLength.
- integers / numbers: sign slot is '-' or empty; digit slots hold only ASCII digits; the integer
  part drops leading zeros and becomes '0' when empty; an empty fraction becomes '0'.
- booleans / enums: a `choice` slot resolves to exactly one of its literal texts whatever was
  generated (longest token-prefix match, ties to the earliest; empty -> the first value).
- objects / arrays: all structure is pinned text; every value inside is valid by the above.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from model.structured.templates import Fixed, Slot, Template, Tokenizer

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "$schema",
        "$id",
        "$comment",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
_TYPE_KEYWORDS = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "maxItems", "minItems"}),
    "string": frozenset({"maxLength"}),
    "integer": frozenset(),
    "number": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
}
_ALL_TYPE_KEYWORDS = frozenset().union(*_TYPE_KEYWORDS.values())
_LITERAL_KEYWORDS = frozenset({"type", "maxLength"})  # allowed beside enum / const


def _where(path: str) -> str:
    return "#" + path


class UnsupportedSchemaError(ValueError):
    """A valid JSON Schema feature outside the supported subset. `feature` names it, `path` is the
    JSON pointer (into the schema) where it appears."""

    def __init__(self, feature: str, path: str, hint: str = ""):
        self.feature, self.path = feature, path
        message = f"unsupported JSON Schema feature {feature!r} at {_where(path)}"
        super().__init__(f"{message}: {hint}" if hint else message)


class InvalidSchemaError(ValueError):
    """A malformed schema (wrong keyword value types, unsatisfiable bounds)."""

    def __init__(self, problem: str, path: str):
        self.path = path
        super().__init__(f"invalid JSON Schema at {_where(path)}: {problem}")


@dataclass(frozen=True)
class SchemaLimits:
    """Sizes of the slots the compiler emits (the server's knobs)."""

    string_tokens: int = 32  # positions of a string without maxLength (and at most with it)
    string_chars_per_token: int = 4  # target code points per token when maxLength bounds a string
    integer_tokens: int = 12  # digit-token positions of an integer / a number's integer part
    fraction_tokens: int = 6  # digit-token positions of a number's fraction
    array_items: int = 3  # items of an array without maxItems
    max_array_items: int = 64
    max_depth: int = 16  # nested objects / arrays

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1 and name != "array_items":
                raise ValueError(f"SchemaLimits.{name} must be >= 1, got {value}")
        if self.array_items < 0:
            raise ValueError(f"SchemaLimits.array_items must be >= 0, got {self.array_items}")


def _pointer_token(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _literal(value: Any, path: str) -> str:
    """Compact-but-readable JSON text of an enum / const value."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSchemaError(f"value {value!r} is not finite JSON ({exc})", path) from exc
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: only the \uXXXX escape can carry them
        text = json.dumps(value, allow_nan=False)
    # "<" only occurs inside JSON strings; escaping it keeps special-token text ("<bos>") out of the
    # pinned tokens while the parsed value stays the same
    return text.replace("<", "\\u003c")


def _matches_type(value: Any, type_: str) -> bool:
    if type_ == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    return checks[type_](value)


def _count(schema: dict, key: str, path: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSchemaError(f"'{key}' must be a non-negative integer, got {value!r}", f"{path}/{key}")
    return value


class _Builder:
    """Collects template parts, merging neighbouring fixed texts into one pinned run."""

    def __init__(self, tokenizer: Tokenizer, limits: SchemaLimits):
        self.tokenizer, self.limits = tokenizer, limits
        self.parts: list[Fixed | Slot] = []

    def text(self, text: str) -> None:
        if self.parts and isinstance(self.parts[-1], Fixed):
            self.parts[-1] = Fixed(self.parts[-1].text + text)
        else:
            self.parts.append(Fixed(text))

    def slot(self, slot: Slot) -> None:
        self.parts.append(slot)

    def choice(self, name: str, options: list[str]) -> None:
        unique = list(dict.fromkeys(options))
        if len(unique) == 1:
            self.text(unique[0])
            return
        longest = max(len(self.tokenizer.encode(o)) for o in unique)
        self.slot(Slot(name, longest, kind="choice", options=tuple(unique)))


def compile_schema(schema: Any, tokenizer: Tokenizer, limits: SchemaLimits | None = None) -> Template:
    """Compile a JSON Schema (subset in the module docstring) into a `Template`.

    Lay it out with `structured.layout` and read results with `structured.fill`; the filled text
    always `json.loads` and validates against `schema`.
    """
    builder = _Builder(tokenizer, limits or SchemaLimits())
    _emit(schema, "", "", 0, builder)
    return Template(tuple(builder.parts))


def _emit(schema: Any, path: str, name: str, depth: int, out: _Builder) -> None:
    """Append the parts of one value. `path`: pointer into the schema; `name`: into the instance."""
    if isinstance(schema, bool):
        raise UnsupportedSchemaError("boolean schema", path, "give an object schema with a 'type'")
    if not isinstance(schema, dict):
        raise InvalidSchemaError(f"a schema must be a JSON object, got {type(schema).__name__}", path)
    if "enum" in schema or "const" in schema:
        _emit_literals(schema, path, name, out)
        return
    type_ = _check_type(schema, path)
    if type_ is None:
        _check_keywords(schema, path, _ALL_TYPE_KEYWORDS, "a schema without type")  # name e.g. $ref first
        raise UnsupportedSchemaError(
            "schema without type", path, f"give 'type' (one of {', '.join(TYPES)}), 'enum' or 'const'"
        )
    _check_keywords(schema, path, _TYPE_KEYWORDS[type_] | {"type"}, type_)
    slot_name = "#" + name
    if type_ in ("object", "array"):
        if depth >= out.limits.max_depth:
            raise UnsupportedSchemaError(f"nesting deeper than {out.limits.max_depth}", path)
        emit = _emit_object if type_ == "object" else _emit_array
        emit(schema, path, name, depth + 1, out)
    elif type_ == "string":
        _emit_string(schema, path, slot_name, out)
    elif type_ in ("integer", "number"):
        out.slot(Slot(slot_name + "~sign", 1, kind="json_minus"))
        out.slot(Slot(slot_name + "~int", out.limits.integer_tokens, kind="json_int_digits"))
        if type_ == "number":
            out.text(".")
            out.slot(Slot(slot_name + "~frac", out.limits.fraction_tokens, kind="json_frac_digits"))
    elif type_ == "boolean":
        out.choice(slot_name, ["true", "false"])
    else:
        out.text("null")


def _check_type(schema: dict, path: str) -> str | None:
    type_ = schema.get("type")
    if type_ is None:
        return None
    if isinstance(type_, list):
        raise UnsupportedSchemaError("type list", f"{path}/type", "give a single type name")
    if type_ not in TYPES:
        raise InvalidSchemaError(f"'type' must be one of {', '.join(TYPES)}, got {type_!r}", f"{path}/type")
    return type_


def _check_keywords(schema: dict, path: str, allowed: frozenset[str], context: str) -> None:
    for key in schema:
        if key in allowed or key in ANNOTATIONS:
            continue
        owner = next((t for t, keys in _TYPE_KEYWORDS.items() if key in keys), None)
        hint = f"'{key}' applies to type {owner}, not {context}" if owner else "see docs/STRUCTURED.md"
        raise UnsupportedSchemaError(key, f"{path}/{_pointer_token(key)}", hint)


def _emit_literals(schema: dict, path: str, name: str, out: _Builder) -> None:
    if "enum" in schema and "const" in schema:
        raise UnsupportedSchemaError("const", f"{path}/const", "give either 'enum' or 'const', not both")
    keyword = "enum" if "enum" in schema else "const"
    _check_keywords(schema, path, _LITERAL_KEYWORDS | {keyword}, keyword)
    values = schema["enum"] if keyword == "enum" else [schema["const"]]
    if keyword == "enum" and (not isinstance(values, list) or not values):
        raise InvalidSchemaError("'enum' must be a non-empty array", f"{path}/enum")
    type_ = _check_type(schema, path)
    max_length = _count(schema, "maxLength", path)
    for index, value in enumerate(values):
        where = f"{path}/enum/{index}" if keyword == "enum" else f"{path}/const"
        if type_ is not None and not _matches_type(value, type_):
            raise InvalidSchemaError(f"value {value!r} is not of type {type_}", where)
        if max_length is not None and isinstance(value, str) and len(value) > max_length:
            raise InvalidSchemaError(f"value {value!r} is longer than maxLength {max_length}", where)
    out.choice("#" + name, [_literal(v, path) for v in values])


def _emit_string(schema: dict, path: str, slot_name: str, out: _Builder) -> None:
    max_length = _count(schema, "maxLength", path)
    if max_length == 0:
        out.text('""')
        return
    limits = out.limits
    out.text('"')
    if max_length is None:
        out.slot(Slot(slot_name, limits.string_tokens, kind="json_string_body"))
    else:
        positions = min(-(-max_length // limits.string_chars_per_token), limits.string_tokens)
        out.slot(Slot(slot_name, positions, kind="json_string_body", max_chars=max_length))
    out.text('"')


def _emit_object(schema: dict, path: str, name: str, depth: int, out: _Builder) -> None:
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(k, str) for k in properties):
        raise InvalidSchemaError("'properties' must be an object of schemas", f"{path}/properties")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise InvalidSchemaError("'required' must be an array of property names", f"{path}/required")
    missing = [r for r in required if r not in properties]
    if missing:
        raise UnsupportedSchemaError(
            "required property not in properties",
            f"{path}/required",
            f"{missing} must be listed in 'properties' (only listed properties are generated)",
        )
    extra = schema.get("additionalProperties", False)
    if not isinstance(extra, bool | dict):
        raise InvalidSchemaError(
            "'additionalProperties' must be a boolean or a schema", f"{path}/additionalProperties"
        )
    out.text("{")
    for index, (key, subschema) in enumerate(properties.items()):
        out.text((", " if index else "") + _literal(key, path) + ": ")
        token = _pointer_token(key)
        _emit(subschema, f"{path}/properties/{token}", f"{name}/{token}", depth, out)
    out.text("}")


def _emit_array(schema: dict, path: str, name: str, depth: int, out: _Builder) -> None:
    if "items" not in schema:
        raise UnsupportedSchemaError("array without items", path, "give 'items' with one schema")
    items = schema["items"]
    if isinstance(items, list):
        raise UnsupportedSchemaError("items as a list", f"{path}/items", "tuple validation; give one schema")
    limits = out.limits
    max_items, min_items = _count(schema, "maxItems", path), _count(schema, "minItems", path) or 0
    if max_items is not None and min_items > max_items:
        raise InvalidSchemaError(f"minItems {min_items} is above maxItems {max_items}", path)
    count = min(
        max_items if max_items is not None else max(min_items, limits.array_items), limits.max_array_items
    )
    if count < min_items:
        raise UnsupportedSchemaError(
            "minItems", f"{path}/minItems", f"{min_items} items exceed the limit of {limits.max_array_items}"
        )
    out.text("[")
    for index in range(count):
        if index:
            out.text(", ")
        _emit(items, f"{path}/items", f"{name}/{index}", depth, out)
    out.text("]")
