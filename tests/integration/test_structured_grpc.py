"""Infill templates and schema-guaranteed JSON through the real gRPC server."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.structured.templates import Fixed, Slot, Template, layout
from model.tokenizer import Tokenizer
from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.model.test_json_schema import _nested

pytestmark = pytest.mark.slow

STEPS = dict(max_denoising_steps=6)


def template_request(parts, prompt="# complete the code\n", seed=3) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, seed=seed)
    for p in parts:
        if isinstance(p, str):
            req.template.parts.add(text=p)
        else:
            req.template.parts.add(slot=pb.Slot(name=p[0], max_tokens=p[1]))
    for k, v in STEPS.items():
        setattr(req.sampling, k, v)
    return req


def _straddling_parts(tok: Tokenizer, canvas: int):
    """Fixed text long enough that slot 'body' starts a few positions before a canvas boundary."""
    head = "def add(a, b):\n    return "
    filler = "# padding line\n"
    while True:
        parts = [head, ("body", 8), "\n\nprint(add(1, 2))  # ", ("comment", 5), "\n"]
        lay = layout(
            Template((Fixed(parts[0]), Slot("body", 8), Fixed(parts[2]), Slot("comment", 5), Fixed("\n"))),
            tok,
            canvas,
        )
        start, end = lay.slot_spans["body"]
        if start // canvas != (end - 1) // canvas:
            return parts
        head = filler + head


def test_infill_keeps_fixed_text_byte_exact_across_canvas_boundaries(app):
    tok = Tokenizer.from_dir(app.model_path)
    canvas = app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).canvas_length
    parts = _straddling_parts(tok, canvas)
    reply = app.stub.Generate(template_request(parts), timeout=120)
    assert reply.finish_reason == pb.FINISH_REASON_TEMPLATE_DONE
    slots = {s.name: s for s in reply.slots}
    assert set(slots) == {"body", "comment"}
    expected = parts[0] + slots["body"].text + parts[2] + slots["comment"].text + parts[4]
    assert reply.text == expected
    assert reply.text.startswith(parts[0])  # the pinned text, byte for byte
    assert all(len(slots[n].token_ids) <= m for n, m in (("body", 8), ("comment", 5)))
    assert tok.pad_id not in slots["body"].token_ids  # filler is removed from slot contents


def test_infill_stream_reports_the_same_result(app):
    tok = Tokenizer.from_dir(app.model_path)
    canvas = app.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).canvas_length
    req = template_request(_straddling_parts(tok, canvas))
    unary = app.stub.Generate(req, timeout=120)
    events = list(app.stub.GenerateStream(req, timeout=120))
    final = events[-1].final
    assert final.text == unary.text
    assert "".join(e.canvas.text_delta for e in events if e.HasField("canvas")) == final.text
    assert [(s.name, s.text) for s in final.slots] == [(s.name, s.text) for s in unary.slots]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schema=_nested, seed=st.integers(0, 2**31))
def test_json_schema_outputs_always_parse_and_validate(app, schema, seed):
    req = pb.GenerateRequest(prompt="Return JSON:\n", json_schema=json.dumps(schema), seed=seed)
    req.sampling.max_denoising_steps = 4
    try:
        reply = app.stub.Generate(req, timeout=120)
    except grpc.RpcError as e:  # a schema too large for the context is a clear client error, never a crash
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        return
    doc = json.loads(reply.text)
    jsonschema.validate(doc, schema)


UNSUPPORTED = {
    "$ref": {"$ref": "https://example.com/other.json"},
    "not": {"not": {"type": "string"}},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    "if": {"if": {"type": "string"}, "then": {"maxLength": 3}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "multipleOf": {"type": "integer", "multipleOf": 3},
    "pattern": {"type": "string", "pattern": "(a)\\1"},
    "patternProperties": {
        "type": "object",
        "properties": {"xa": {}},
        "patternProperties": {"^x": {"type": "string"}},
    },
}

REAL_WORLD = Path(__file__).resolve().parents[2] / "bench" / "schemas"


def _real_world(source: str, name: str) -> dict:
    for line in (REAL_WORLD / f"{source}.jsonl").open():
        entry = json.loads(line)
        if entry["name"] == name:
            return entry["schema"]
    raise KeyError(name)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("function_calling", "uber.ride"),
        ("function_calling", "get_current_weather"),
        ("openapi_components", "uber/Activities"),
        ("schemastore_small", "partial-fastapi.json"),
    ],
)
def test_real_world_schemas_through_the_server_always_validate(app, source, name):
    """Optional properties, enums, variable arrays and $ref through gRPC: every seed's output validates."""
    schema = _real_world(source, name)
    for seed in range(3):
        req = pb.GenerateRequest(
            prompt="Return JSON:\n", json_schema=json.dumps(schema), seed=seed, max_new_tokens=96
        )
        req.sampling.max_denoising_steps = 4
        reply = app.stub.Generate(req, timeout=120)
        assert reply.finish_reason == pb.FINISH_REASON_TEMPLATE_DONE
        jsonschema.validate(json.loads(reply.text), schema)


def test_schema_too_long_for_max_new_tokens_is_invalid_argument(app):
    schema = {
        "type": "array",
        "items": {"type": "integer"},
        "minItems": 60,
    }  # 60 items need more than 32 tokens
    req = pb.GenerateRequest(prompt="x", json_schema=json.dumps(schema), max_new_tokens=32)
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Generate(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in err.value.details()


def test_infill_slots_hold_content_by_default_and_may_be_empty_with_min_tokens_0(app):
    parts = ["def read(path):\n    ", ("body", 6), "\n"]
    for seed in range(3):
        reply = app.stub.Generate(template_request(parts, seed=seed), timeout=120)
        assert reply.slots[0].token_ids, "a slot without min_tokens holds at least one token"
    req = template_request(parts)
    req.template.parts[1].slot.min_tokens = 7
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Generate(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_tokens" in err.value.details()


@pytest.mark.parametrize("feature", sorted(UNSUPPORTED))
def test_unsupported_schema_feature_is_invalid_argument_naming_it(app, feature):
    schema = {"type": "object", "properties": {"a": UNSUPPORTED[feature]}}
    req = pb.GenerateRequest(prompt="x", json_schema=json.dumps(schema))
    with pytest.raises(grpc.RpcError) as err:
        app.stub.Generate(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert feature in err.value.details()


def test_template_and_json_schema_are_mutually_exclusive_on_the_wire():
    req = pb.GenerateRequest(prompt="x", json_schema="{}")
    req.template.parts.add(text="a")
    assert req.WhichOneof("structure") == "template"  # a oneof: setting one clears the other
    assert req.json_schema == ""
