"""JSON Schema -> a regular language of JSON texts (a byte-level DFA), for decoding under a constraint.

Every text of the language parses as JSON and validates against the schema; the language is a
subset of the valid documents where the schema allows more than a regular language can express
(e.g. `maxLength` above `max_string_chars` generates at most `max_string_chars` characters).

Supported (docs/STRUCTURED.md has the table): `type` (also lists), objects (`properties` in schema
order, each optional unless `required`; extra members where `additionalProperties` is true or a schema,
or where an object lists no properties, as the specification's default says), arrays (`items`,
`minItems`/`maxItems`; `uniqueItems` caps the count at 1), strings (`minLength`/`maxLength` on decoded
characters, escapes allowed; `pattern` subset, `format` date, time, date-time, email, uuid, ipv4, uri,
hostname, generated raw; other formats are annotations), integers and numbers
(`minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum`, draft-4 boolean exclusives too; no
exponents), `enum`, `const`, `anyOf`, `oneOf` (branches must be disjoint: checked), `allOf` (merged
when the branches do not disagree), local `$ref` into `$defs`/`definitions` (recursion is unrolled
`max_ref_depth` times, deeper branches drop out), boolean schemas, `{}` (generic JSON, nested up
to `any_depth`). Unknown keywords are ignored, as the specification says. Keywords that restrict
instances in ways this compiler cannot express raise `UnsupportedSchemaError` with their pointer.

Texts are compact JSON with optional whitespace between tokens; the document is followed by any number
of FILLER symbols (the canvas filler).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from model.structured.json_schema import InvalidSchemaError, UnsupportedSchemaError
from model.structured.pattern import ANY_CHAR, FORMATS, JSON_CHAR, PatternError, pattern
from model.structured.regex import (
    EMPTY,
    FILLER,
    NOTHING,
    Dfa,
    alt,
    byteset,
    compile_dfa,
    difference,
    intersect,
    intersects,
    lit,
    opt,
    rep,
    seq,
)

WS = opt(lit(b" "))  # one optional space: compact or `json.dumps`-style text, never runs of blanks
_REFUSED = {
    "not": "negation is not a regular constraint here",
    "if": "conditional schemas are not supported",
    "then": "conditional schemas are not supported",
    "else": "conditional schemas are not supported",
    "contains": "arrays with 'contains' are not supported",
    "prefixItems": "tuple arrays are not supported",
    "propertyNames": "property names are not checked against a schema; drop propertyNames",
    "dependentRequired": "dependent properties are not supported",
    "dependentSchemas": "dependent properties are not supported",
    "dependencies": "dependent properties are not supported",
    "multipleOf": "multipleOf other than 1 on integers is not supported",
}
_OBJECT = ("properties", "required", "additionalProperties", "minProperties", "maxProperties")
_ARRAY = ("items", "minItems", "maxItems", "uniqueItems")
_STRING = ("minLength", "maxLength", "pattern", "format")
_NUMBER = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_VALIDATING = frozenset(
    ("type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "patternProperties")
    + _OBJECT
    + _ARRAY
    + _STRING
    + _NUMBER
    + tuple(_REFUSED)
)


@dataclass(frozen=True)
class RegularLimits:
    """Bounds of the schema compiler (the server's knobs)."""

    max_string_chars: int = 64  # longest string generated where maxLength is larger
    max_array_items: int = (
        64  # most items generated where maxItems is larger (unbounded arrays stay unbounded)
    )
    max_ref_depth: int = 3  # times a recursive $ref is unrolled
    any_depth: int = 2  # nesting of arrays/objects inside a value with no schema ({}, additionalProperties)
    max_states: int = 20000  # DFA states of the whole document or any part
    max_build_seconds: float = 30.0  # building the DFA, and again lifting it to the vocabulary


def _ptr(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


class _Compiler:
    def __init__(self, root: Any, limits: RegularLimits):
        self.root, self.limits = root, limits
        self.deadline = time.monotonic() + limits.max_build_seconds
        self.ref_depth: dict[str, int] = {}

    def dfa(self, e: tuple) -> tuple:
        """Minimise a sub-language now so that its copies in the parent stay small."""
        return ("dfa", compile_dfa(e, self.limits.max_states, self.deadline))

    # --- dispatch ---------------------------------------------------------------------------------

    def value(self, schema: Any, path: str) -> tuple:
        if schema is True:
            return self.any_value(self.limits.any_depth)
        if schema is False:
            return NOTHING
        if not isinstance(schema, dict):
            raise InvalidSchemaError(
                f"a schema must be an object or boolean, got {type(schema).__name__}", path
            )
        for key, why in _REFUSED.items():
            if key in schema and not self._harmless(schema, key):
                raise UnsupportedSchemaError(key, f"{path}/{key}", why)
        if "$ref" in schema:
            return self.ref(schema, path)
        if "allOf" in schema:
            return self.all_of(schema, path)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.alternatives(schema, key, path)
        if "enum" in schema or "const" in schema:
            return self.literals(schema, path)
        types = schema.get("type")
        if types is None:
            types = self._inferred_types(schema)
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types:
            raise InvalidSchemaError("'type' must be a type name or a non-empty list of them", f"{path}/type")
        return alt(*(self.typed(schema, t, path) for t in types))

    def _harmless(self, schema: dict, key: str) -> bool:
        value = schema[key]
        if key == "multipleOf":
            return value == 1 and schema.get("type") == "integer"
        return key in ("then", "else") and "if" not in schema

    def _inferred_types(self, schema: dict) -> list[str]:
        found = [
            t
            for t, keys in (("object", _OBJECT), ("array", _ARRAY), ("string", _STRING), ("number", _NUMBER))
            if any(k in schema for k in keys)
        ]
        return found or ["any"]

    def typed(self, schema: dict, type_: str, path: str) -> tuple:
        if type_ == "any":
            return self.any_value(self.limits.any_depth)
        handlers = {
            "object": self.object,
            "array": self.array,
            "string": self.string,
            "integer": lambda s, p: self.number(s, p, integer=True),
            "number": lambda s, p: self.number(s, p, integer=False),
            "boolean": lambda s, p: alt(lit(b"true"), lit(b"false")),
            "null": lambda s, p: lit(b"null"),
        }
        if type_ not in handlers:
            raise InvalidSchemaError(f"unknown type {type_!r}", f"{path}/type")
        return handlers[type_](schema, path)

    # --- references and combinators ---------------------------------------------------------------

    def resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchemaError(
                "$ref", f"{path}/$ref", f"only local references ('#/...') work, got {ref!r}"
            )
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise InvalidSchemaError(f"$ref {ref!r} points nowhere", f"{path}/$ref")
        return node

    def ref(self, schema: dict, path: str) -> tuple:
        ref = schema["$ref"]
        target = self.resolve(ref, path)
        depth = self.ref_depth.get(ref, 0)
        if depth > self.limits.max_ref_depth:
            return NOTHING  # recursion unrolled far enough: this branch drops out
        self.ref_depth[ref] = depth + 1
        try:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            if self._constraining(rest):
                return self.value({"allOf": [target, rest]}, path)
            return self.value(target, str(ref)[1:])
        finally:
            self.ref_depth[ref] = depth

    @staticmethod
    def _constraining(schema: dict) -> bool:
        """Whether `schema` narrows the set of values: annotations and unknown keywords (ignored, as the spec
        says) do not, so a const/enum beside them is generated as it is, escapes included."""
        return any(k in _VALIDATING for k in schema)

    def all_of(self, schema: dict, path: str) -> tuple:
        """The merged branches; references resolved while merging count towards `max_ref_depth` like any other."""
        refs: list[str] = []
        merged = self.merge_all_of(schema, path, refs)
        if any(self.ref_depth.get(r, 0) > self.limits.max_ref_depth for r in refs):
            return NOTHING  # recursion unrolled far enough: this branch drops out
        for r in refs:
            self.ref_depth[r] = self.ref_depth.get(r, 0) + 1
        try:
            return self.value(merged, path)
        finally:
            for r in refs:
                self.ref_depth[r] -= 1

    def merge_all_of(self, schema: dict, path: str, refs: list[str]) -> dict:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise InvalidSchemaError("'allOf' must be a non-empty array", f"{path}/allOf")
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for i, part in enumerate(parts):
            while (
                isinstance(part, dict)
                and "$ref" in part
                and not self._constraining({k: v for k, v in part.items() if k != "$ref"})
            ):
                refs.append(part["$ref"])
                if len(refs) > 64:
                    raise InvalidSchemaError(
                        "$ref chain does not end (a reference to itself)", f"{path}/allOf/{i}"
                    )
                part = self.resolve(part["$ref"], f"{path}/allOf/{i}")
            if part is True:
                continue
            if not isinstance(part, dict):
                raise UnsupportedSchemaError("allOf", f"{path}/allOf/{i}", "branches must be object schemas")
            for key, value in part.items():
                merged[key] = self._merge_key(merged, key, value, f"{path}/allOf/{i}")
        return merged

    def _merge_key(self, merged: dict, key: str, value: Any, path: str) -> Any:
        if key not in merged or merged[key] == value or not self._constraining({key: value}):
            return merged.get(key, value) if not self._constraining({key: value}) else value
        old = merged[key]
        if key == "required":
            return list(dict.fromkeys(old + value))
        if key == "properties":
            clash = [k for k in value if k in old and old[k] != value[k]]
            if clash:
                raise UnsupportedSchemaError("allOf", path, f"branches disagree on properties {clash}")
            return {**old, **value}
        raise UnsupportedSchemaError("allOf", f"{path}/{key}", f"branches disagree on '{key}'")

    def alternatives(self, schema: dict, key: str, path: str) -> tuple:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise InvalidSchemaError(f"'{key}' must be a non-empty array", f"{path}/{key}")
        rest = {k: v for k, v in schema.items() if k != key}
        langs = []
        for i, branch in enumerate(branches):
            where = f"{path}/{key}/{i}"
            if self._constraining(rest):
                branch = {"allOf": [rest, branch]}
            langs.append(self.dfa(self.value(branch, where)))
        if key == "oneOf":
            for i in range(len(langs)):
                for j in range(i):
                    if intersects(langs[i][1], langs[j][1]):
                        raise UnsupportedSchemaError(
                            "oneOf",
                            f"{path}/oneOf/{i}",
                            f"branches {j} and {i} overlap; use anyOf or disjoint branches",
                        )
        return alt(*langs)

    # --- literals ---------------------------------------------------------------------------------

    def literals(self, schema: dict, path: str) -> tuple:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise InvalidSchemaError("'enum' must be a non-empty array", f"{path}/enum")
        if "enum" in schema and "const" in schema:
            values = [v for v in values if v == schema["const"]]
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        options = []
        check = self.dfa(self.value(rest, path))[1] if self._constraining(rest) else None
        for value in values:
            if check is not None and not check.matches(_text(value, path)):
                continue  # a value the sibling keywords reject is never generated
            options.append(lit(_text(value, path)))
        return alt(*options)

    # --- objects and arrays -----------------------------------------------------------------------

    def object(self, schema: dict, path: str) -> tuple:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise InvalidSchemaError("'properties' must be an object", f"{path}/properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise InvalidSchemaError("'required' must be an array of names", f"{path}/required")
        extra = schema.get("additionalProperties", True)
        entries = [(k, v, k in required) for k, v in props.items()]  # (name, schema, required)
        for name in required:
            if name not in props:
                if extra is False:
                    raise InvalidSchemaError(
                        f"required {name!r} is not allowed by additionalProperties", path
                    )
                entries.append((name, extra if isinstance(extra, dict) else True, True))
        self._check_pattern_properties(schema, entries, path)
        n_required = sum(1 for e in entries if e[2])
        extras = self._extras(schema, props, entries, n_required, path)
        members = [
            (
                seq(
                    lit(_text(k, path)),
                    WS,
                    lit(b":"),
                    WS,
                    self.dfa(self.value(v, f"{path}/properties/{_ptr(k)}")),
                ),
                req,
            )
            for k, v, req in entries
        ]
        return seq(lit(b"{"), WS, self.members(members, extras), WS, lit(b"}"))

    def _extras(self, schema: dict, props: dict, entries: list, n_required: int, path: str):
        """(member expression, least count, most count or None) of extra properties after the listed
        ones, or None when none are generated.

        Extras are generated where the schema asks for them: `additionalProperties` true or a schema, or
        absent on an object that lists no properties (`{"type": "object"}`: a generic object). An object
        that lists properties and says nothing about others gets only those (a subset of what it allows,
        as OpenAI's strict mode and XGrammar's default do), unless `minProperties` needs one more; so do
        objects with `patternProperties` or `unevaluatedProperties` (extra names would have to be checked
        against them), and objects whose extra-value schema this compiler refuses (unless one is needed).
        Extra names are raw strings (no escapes) other than the listed names; they may repeat (JSON allows
        duplicate names)."""
        extra = schema.get("additionalProperties")
        least = max(0, schema.get("minProperties", 0) - n_required)
        most = schema.get("maxProperties")
        allowed = (
            extra is not False
            and "patternProperties" not in schema
            and schema.get("unevaluatedProperties", True) is True
        )
        wanted = allowed and (extra is True or isinstance(extra, dict) or not props or least > 0)
        room = None if most is None else most - len(entries)  # extras maxProperties leaves
        if least and (not wanted or least > 1 or (room is not None and room < least)):
            raise UnsupportedSchemaError(
                "minProperties",
                f"{path}/minProperties",
                "more than the required properties (at most one beyond them, where extra properties are allowed)",
            )
        if most is not None and most < len(entries):
            raise UnsupportedSchemaError(
                "maxProperties", f"{path}/maxProperties", "fewer than the listed properties"
            )
        if not wanted or room == 0:
            return None
        try:
            value = self.dfa(
                self.value(extra if isinstance(extra, dict) else True, f"{path}/additionalProperties")
            )
        except UnsupportedSchemaError:
            if least:
                raise
            return None  # extras are optional: the listed properties alone are still valid
        name = ("dfa", compile_dfa(seq(lit(b'"'), rep(ANY_CHAR, 1, None), lit(b'"')), self.limits.max_states))
        listed = [lit(_text(k, path)) for k, _, _ in entries]
        if listed:
            taken = compile_dfa(alt(*listed), self.limits.max_states, self.deadline)
            name = ("dfa", difference(name[1], taken, self.limits.max_states, self.deadline))
        member = self.dfa(seq(name, WS, lit(b":"), WS, value))
        return member, least, room

    def members(self, members: list[tuple[tuple, bool]], extras: tuple | None = None) -> tuple:
        """Properties in order, each optional unless required, separated by commas, then `extras`
        (member, least, most) if any. Built back to front: `after` is the rest once something was
        written, `first` the rest while nothing was written yet; both are minimised at each step so
        shared tails are not copied exponentially."""
        sep = seq(WS, lit(b","), WS)
        after, first = EMPTY, EMPTY
        if extras is not None:
            member, least, most = extras
            after = rep(seq(sep, member), least, most)
            tail = seq(member, rep(seq(sep, member), max(least - 1, 0), None if most is None else most - 1))
            first = tail if least else opt(tail)
            after, first = self.dfa(after), self.dfa(first)
        for member, required in reversed(members):
            with_sep, without = seq(sep, member, after), seq(member, after)
            if required:
                after, first = with_sep, without
            else:
                after, first = alt(with_sep, after), alt(without, first)
            after, first = self.dfa(after), self.dfa(first)
        return first

    def _check_pattern_properties(self, schema: dict, entries: list, path: str) -> None:
        for regex in schema.get("patternProperties", {}) or {}:
            try:
                hit = [k for k, _, _ in entries if re.search(regex, k)]
            except re.error:
                hit = [k for k, _, _ in entries]
            if hit:
                raise UnsupportedSchemaError(
                    "patternProperties", f"{path}/patternProperties/{_ptr(regex)}", f"applies to {hit}"
                )

    def array(self, schema: dict, path: str) -> tuple:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise UnsupportedSchemaError(
                "items", f"{path}/items", "tuple arrays (items as a list) are not supported"
            )
        lo, hi = _count(schema, "minItems", path) or 0, _count(schema, "maxItems", path)
        if schema.get("uniqueItems") is True:
            if lo > 1:
                raise UnsupportedSchemaError("uniqueItems", f"{path}/uniqueItems", "with minItems > 1")
            hi = 1 if hi is None else min(hi, 1)
        if hi is not None and lo > hi:
            raise InvalidSchemaError(f"minItems {lo} is above maxItems {hi}", path)
        cap = self.limits.max_array_items
        if lo > cap:
            raise UnsupportedSchemaError("minItems", f"{path}/minItems", f"above the limit of {cap} items")
        hi = None if hi is None else min(hi, cap)
        if hi == 0:
            return seq(lit(b"["), WS, lit(b"]"))
        item = self.dfa(self.value(items, f"{path}/items"))
        sep = seq(WS, lit(b","), WS)
        more = rep(seq(sep, item), max(lo - 1, 0), None if hi is None else hi - 1)
        body = seq(item, more)
        return seq(lit(b"["), WS, body if lo else opt(body), WS, lit(b"]"))

    # --- scalars ----------------------------------------------------------------------------------

    def string(self, schema: dict, path: str) -> tuple:
        lo = _count(schema, "minLength", path) or 0
        hi = _count(schema, "maxLength", path)
        cap = self.limits.max_string_chars
        if lo > cap:
            raise UnsupportedSchemaError(
                "minLength", f"{path}/minLength", f"above the limit of {cap} characters"
            )
        hi = None if hi is None else min(hi, cap)
        if hi is not None and lo > hi:
            raise InvalidSchemaError(f"minLength {lo} is above maxLength {hi}", path)
        shapes = []
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in FORMATS:
            shapes.append(("format", FORMATS[fmt]))
        if "pattern" in schema:
            shapes.append(("pattern", schema["pattern"]))
        # escapes decode to one character each, so lengths hold; a pattern / format sees raw characters only
        body = rep(ANY_CHAR if shapes else JSON_CHAR, lo, hi)
        if shapes:
            dfa = compile_dfa(body, self.limits.max_states, self.deadline) if (lo or hi is not None) else None
            for key, source in shapes:
                try:
                    shape = compile_dfa(pattern(source), self.limits.max_states, self.deadline)
                except PatternError as exc:
                    raise UnsupportedSchemaError(key, f"{path}/{key}", str(exc)) from None
                dfa = shape if dfa is None else intersect(dfa, shape, self.limits.max_states, self.deadline)
            body = ("dfa", dfa)
        return seq(lit(b'"'), body, lit(b'"'))

    def number(self, schema: dict, path: str, integer: bool) -> tuple:
        lo, lo_strict = _bound(schema, "minimum", "exclusiveMinimum", path, lower=True)
        hi, hi_strict = _bound(schema, "maximum", "exclusiveMaximum", path, lower=False)
        ints = _int_range(
            None
            if lo is None
            else (math.floor(lo) + 1 if lo_strict and lo == math.floor(lo) else math.ceil(lo)),
            None
            if hi is None
            else (math.ceil(hi) - 1 if hi_strict and hi == math.ceil(hi) else math.floor(hi)),
        )
        if integer:
            return ints
        frac = seq(lit(b"."), rep(byteset(b"0123456789"), 1, None))
        return alt(ints, _fraction_range(lo, lo_strict, hi, hi_strict, frac))

    def any_value(self, depth: int) -> tuple:
        """Generic JSON: any scalar; arrays and objects (any keys, any count) nested up to `depth` levels."""
        scalars = [
            seq(lit(b'"'), rep(JSON_CHAR, 0, None), lit(b'"')),
            self.number({}, "", integer=False),
            lit(b"true"),
            lit(b"false"),
            lit(b"null"),
        ]
        if depth > 0:
            inner = self.dfa(self.any_value(depth - 1))
            sep = seq(WS, lit(b","), WS)
            scalars.append(seq(lit(b"["), WS, opt(seq(inner, rep(seq(sep, inner), 0, None))), WS, lit(b"]")))
            key = seq(lit(b'"'), rep(JSON_CHAR, 0, None), lit(b'"'), WS, lit(b":"), WS, inner)
            scalars.append(seq(lit(b"{"), WS, opt(seq(key, rep(seq(sep, key), 0, None))), WS, lit(b"}")))
        return alt(*scalars)


def _text(value: Any, path: str) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidSchemaError(f"value {value!r} is not finite JSON ({exc})", path) from exc
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def _count(schema: dict, key: str, path: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSchemaError(f"'{key}' must be a non-negative integer, got {value!r}", f"{path}/{key}")
    return value


def _bound(schema: dict, key: str, exclusive: str, path: str, lower: bool) -> tuple[float | None, bool]:
    """(bound, strict) from the inclusive keyword and the exclusive one (number or draft-4 boolean)."""
    found: list[tuple[float, bool]] = []
    for name, strict in ((key, schema.get(exclusive) is True), (exclusive, True)):
        value = schema.get(name)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidSchemaError(f"'{name}' must be a finite number, got {value!r}", f"{path}/{name}")
        found.append((value, strict))
    if not found:
        return None, False
    pick = max if lower else min
    best = pick(v for v, _ in found)
    return best, any(s for v, s in found if v == best)


def _digits_range(lo: str, hi: str) -> tuple:
    """Digit strings of len(lo) == len(hi) between lo and hi (leading zeros allowed inside)."""
    if len(lo) == 1:
        return byteset(range(ord(lo), ord(hi) + 1))
    if lo[0] == hi[0]:
        return seq(lit(lo[0].encode()), _digits_range(lo[1:], hi[1:]))
    n = len(lo) - 1
    parts = [seq(lit(lo[0].encode()), _digits_range(lo[1:], "9" * n))]
    if int(lo[0]) + 1 <= int(hi[0]) - 1:
        parts.append(seq(byteset(range(ord(lo[0]) + 1, ord(hi[0]))), rep(byteset(b"0123456789"), n, n)))
    parts.append(seq(lit(hi[0].encode()), _digits_range("0" * n, hi[1:])))
    return alt(*parts)


def _natural_range(lo: int, hi: int | None) -> tuple:
    """Canonical decimal texts of the integers in [lo, hi] (lo >= 0; hi None: unbounded)."""
    if hi is not None and lo > hi:
        return NOTHING
    parts = []
    width = len(str(lo))
    while hi is None or width <= len(str(hi)):
        top = 10**width - 1
        a, b = max(lo, 10 ** (width - 1) if width > 1 else 0), top if hi is None else min(hi, top)
        if a <= b:
            parts.append(_digits_range(str(a), str(b)))
        if hi is None:
            parts.append(seq(byteset(b"123456789"), rep(byteset(b"0123456789"), width, None)))
            break
        width += 1
    return alt(*parts)


def _int_range(lo: int | None, hi: int | None) -> tuple:
    parts = []
    if hi is None or hi >= 0:
        parts.append(_natural_range(max(lo or 0, 0), hi))
    if lo is None or lo < 0:
        parts.append(
            seq(lit(b"-"), _natural_range(max(1, -hi if hi is not None else 1), None if lo is None else -lo))
        )
    return alt(*parts)


def _fraction_range(
    lo: float | None, lo_strict: bool, hi: float | None, hi_strict: bool, frac: tuple
) -> tuple:
    """Texts n.ddd inside the bounds whatever the fraction: n.ddd lies in [n, n + 1)."""
    parts = []
    if hi is None or hi >= 1:  # n <= value < n + 1 <= hi
        bottom = 0 if lo is None or lo < 0 else (math.floor(lo) + 1 if lo_strict else math.ceil(lo))
        parts.append(seq(_natural_range(bottom, None if hi is None else math.floor(hi) - 1), frac))
    if lo is None or lo <= -1:  # -(n + 1) < -n.ddd <= -n
        top = None if lo is None else math.floor(-lo) - 1
        bottom = 0 if hi is None else max(0, math.floor(-hi) + 1 if hi_strict else math.ceil(-hi))
        parts.append(seq(lit(b"-"), _natural_range(bottom, top), frac))
    return alt(*parts)


def document(value: tuple) -> tuple:
    """A whole canvas text: optional whitespace, the value, whitespace, then any number of fillers."""
    return seq(WS, value, WS, rep(byteset([FILLER]), 0, None))


def schema_dfa(schema: Any, limits: RegularLimits | None = None) -> Dfa:
    """Compile a JSON Schema to the byte-level DFA of its documents (see module docstring)."""
    limits = limits or RegularLimits()
    compiler = _Compiler(schema, limits)
    dfa = compile_dfa(document(compiler.value(schema, "")), limits.max_states, compiler.deadline)
    if dfa.is_empty():
        raise UnsupportedSchemaError(
            "schema",
            "",
            "no JSON text this compiler can generate satisfies it (e.g. a required recursive property)",
        )
    return dfa
