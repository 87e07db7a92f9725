"""Property test through the real gRPC server: whatever a client puts in any GenerateRequest field, the answer
is OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, and a normal request right after it is served normally."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.blockserve.v1 import blockserve_pb2 as pb

pytestmark = pytest.mark.slow

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
U32 = st.one_of(st.integers(0, 6), st.integers(2**31, 2**32 - 1))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -0.0, 1e-30])
)
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # odd Unicode: surrogates excluded by the codec
NAMES = st.one_of(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), TEXT)
JSON_LEAF = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "nope"])}
    ),
    st.fixed_dictionaries({"enum": st.lists(st.one_of(st.integers(), TEXT, st.booleans()), max_size=3)}),
    st.fixed_dictionaries({"type": st.just("string"), "maxLength": st.integers(-5, 10**9)}),
)
SCHEMAS = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.fixed_dictionaries({"type": st.just("array"), "items": inner, "maxItems": st.integers(-1, 10**6)}),
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(NAMES, inner, max_size=3)}
        ),
    ),
    max_leaves=6,
)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        max_new_tokens=draw(st.one_of(st.integers(0, 24), st.integers(2**31, 2**32 - 1)))
    )
    if draw(st.booleans()):
        req.prompt = draw(st.one_of(TEXT, st.text(max_size=3000)))
    else:
        ids = draw(st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 300), max_size=200))
        req.prompt_token_ids.ids.extend(ids)
    s = req.sampling
    s.max_denoising_steps = draw(U32)
    for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
        if draw(st.booleans()):
            setattr(s, name, draw(FLOATS))
    if draw(st.booleans()):
        s.stability_threshold = draw(U32)
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    req.stop.extend(draw(st.lists(TEXT, max_size=12)))
    req.request_id = draw(st.one_of(TEXT, st.text(min_size=120, max_size=200)))
    structure = draw(st.sampled_from(["none", "template", "schema", "schema_text"]))
    if structure == "template":
        for _ in range(draw(st.integers(0, 6))):
            if draw(st.booleans()):
                req.template.parts.add(text=draw(TEXT))
            else:
                req.template.parts.add(slot=pb.Slot(name=draw(NAMES), max_tokens=draw(U32)))
    elif structure == "schema":
        req.json_schema = json.dumps(draw(SCHEMAS))
    elif structure == "schema_text":
        req.json_schema = draw(TEXT)
    return req


def normal() -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=8, seed=1)
    req.sampling.max_denoising_steps = 4
    return req


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(req=requests())
def test_any_request_gets_an_allowed_code_and_the_server_stays_normal(app, req):
    if req.WhichOneof("structure") is None and not req.stop:
        req.sampling.max_denoising_steps = min(req.sampling.max_denoising_steps, 6)  # keep OK cases short
    try:
        app.stub.Generate(req, timeout=120)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert "Traceback" not in (e.details() or "")
    assert code in ALLOWED, (code, req)
    # the next normal request is served, within a deadline a healthy server meets easily
    assert app.stub.Generate(normal(), timeout=30).usage.completion_tokens > 0
