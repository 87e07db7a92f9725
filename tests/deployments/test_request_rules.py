"""The proto's "Valid:" rules (protos/blockserve/v1/blockserve.proto) and the validator are the same rules: one
test per rule, each sending a request that breaks exactly that rule and one at its edge that passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deployments.requests import InvalidRequest, RequestLimits, prepare
from model.config import ModelConfig
from model.sampling.params import SamplingParams
from model.tokenizer import Tokenizer
from protos.blockserve.v1 import blockserve_pb2 as pb
from tests.tiny import served_checkpoint

PROTO = Path(__file__).resolve().parents[2] / "protos" / "blockserve" / "v1" / "blockserve.proto"
LIMITS = RequestLimits(max_new_tokens=256, max_prompt_tokens=64, max_prompt_chars=400)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path = served_checkpoint(tmp_path_factory.mktemp("rules"))
    return Tokenizer.from_dir(path), ModelConfig.from_file(path)


def run(env, req: pb.GenerateRequest):
    tok, cfg = env
    return prepare(req, tok, cfg, SamplingParams(max_new_tokens=16), LIMITS, "r")


def ok(env, **fields):
    return run(env, make(**fields))


def bad(env, match: str, **fields):
    with pytest.raises(InvalidRequest, match=match):
        run(env, make(**fields))


def make(prompt="def f():", sampling=None, template=None, **fields) -> pb.GenerateRequest:
    req = pb.GenerateRequest(**fields)
    if prompt is not None and "prompt_token_ids" not in fields:
        req.prompt = prompt
    for k, v in (sampling or {}).items():
        setattr(req.sampling, k, v)
    for part in template or []:
        if isinstance(part, str):
            req.template.parts.add(text=part)
        else:
            req.template.parts.add(slot=pb.Slot(name=part[0], max_tokens=part[1]))
    return req


def test_every_valid_line_of_the_proto_has_a_test_here():
    # Chat.messages ("at least one message") needs a model with a chat template: its test is
    # tests/deployments/test_openai_protocol.py (`pb.Chat()` -> "chat.messages is empty").
    rules = [r for r in re.findall(r"//[^\n]*Valid:", PROTO.read_text()) if "conversation so far" not in r]
    tests = [
        name
        for name in globals()
        if name.startswith("test_") and name != "test_every_valid_line_of_the_proto_has_a_test_here"
    ]
    assert len(rules) == len(tests) == 17  # a new "Valid:" rule in the proto needs its test here


def test_max_denoising_steps_1_to_1024(env):
    ok(env, sampling={"max_denoising_steps": 1024})
    bad(env, "max_denoising_steps", sampling={"max_denoising_steps": 1025})
    bad(env, "max_denoising_steps", sampling={"max_denoising_steps": 0})


def test_entropy_bound_finite_and_positive(env):
    ok(env, sampling={"entropy_bound": 1e-6})
    bad(env, "entropy_bound", sampling={"entropy_bound": 0.0})
    bad(env, "entropy_bound", sampling={"entropy_bound": float("inf")})


def test_t_min_finite_positive_and_at_most_t_max(env):
    ok(env, sampling={"t_min": 0.5, "t_max": 0.5})
    bad(env, "t_min", sampling={"t_min": 0.0})
    bad(env, "t_max must be >= t_min", sampling={"t_min": 0.9, "t_max": 0.5})
    bad(env, "t_min", sampling={"t_min": float("nan")})


def test_t_max_finite_and_at_least_t_min(env):
    bad(env, "t_max", sampling={"t_max": float("inf")})
    bad(env, "t_max", sampling={"t_max": 0.1})  # below the default t_min 0.4


def test_stability_threshold_0_to_64(env):
    ok(env, sampling={"stability_threshold": 0})
    ok(env, sampling={"stability_threshold": 64})
    bad(env, "stability_threshold", sampling={"stability_threshold": 65})


def test_confidence_threshold_finite_and_positive(env):
    bad(env, "confidence_threshold", sampling={"confidence_threshold": 0.0})
    bad(env, "confidence_threshold", sampling={"confidence_threshold": float("-inf")})


def test_template_text_not_empty(env):
    bad(env, "empty fixed text", template=["", ("a", 4)])


def test_slot_name_letters_digits_underscore_not_empty(env):
    ok(env, template=["x = ", ("a_1", 4)])
    bad(env, "letters, digits and '_'", template=["x = ", ("a-b", 4)])
    bad(env, "letters, digits and '_'", template=["x = ", ("", 4)])
    bad(env, "used twice", template=[("a", 2), " + ", ("a", 2)])


def test_slot_max_tokens_at_least_1_and_all_slots_within_max_new_tokens(env):
    bad(env, "max_tokens must be >= 1", template=[("a", 0)])
    bad(env, "limit \\(limits.max_new_tokens\\) is 256", template=[("a", 200), " ", ("b", 100)])


def test_template_needs_a_slot_and_parts_and_bounded_size(env):
    bad(env, "no slot", template=["only fixed text"])
    req = make()
    req.template.parts.add()  # neither text nor slot
    req.template.parts.add(slot=pb.Slot(name="a", max_tokens=2))
    with pytest.raises(InvalidRequest, match=r"parts\[0\] is empty"):
        run(env, req)
    bad(env, "1025 parts", template=["x"] * 1024 + [("a", 2)])


def test_prompt_not_empty_and_within_char_and_token_limits(env):
    bad(env, "prompt is empty", prompt="")
    bad(env, "401 characters", prompt="x" * 401)
    bad(env, "limit is 64", prompt="word " * 70)  # under the character limit, over the token limit


def test_prompt_token_ids_at_least_one_in_vocab_and_bounded(env):
    vocab = env[1].vocab_size
    ok(env, prompt=None, prompt_token_ids=pb.TokenIds(ids=[0, vocab - 1]))
    bad(env, "empty", prompt=None, prompt_token_ids=pb.TokenIds(ids=[]))
    bad(env, "outside", prompt=None, prompt_token_ids=pb.TokenIds(ids=[vocab]))
    bad(env, "outside", prompt=None, prompt_token_ids=pb.TokenIds(ids=[-1]))
    bad(env, "limit is 64", prompt=None, prompt_token_ids=pb.TokenIds(ids=[1] * 65))


def test_max_new_tokens_within_the_server_limit(env):
    ok(env, max_new_tokens=256)
    bad(env, "exceeds this server's limit of 256", max_new_tokens=257)


def test_stop_at_most_8_strings_of_1_to_128_chars_and_not_with_structure(env):
    ok(env, stop=["a" * 128] * 8)
    bad(env, "9 strings", stop=["a"] * 9)
    bad(env, "empty", stop=[""])
    bad(env, "129 characters", stop=["a" * 129])
    bad(env, "cannot be combined", stop=["x"], template=[("a", 4)])


def test_json_schema_size_nesting_and_positions(env):
    bad(env, "65537 characters", json_schema=" " * 65537)
    deep = '{"type": "array", "items": ' * 2000 + '{"type": "integer"}' + "}" * 2000
    bad(env, "nested too deeply|depth|nest", json_schema=deep)
    big = '{"type": "array", "minItems": 60, "maxItems": 60, "items": {"type": "string", "maxLength": 200}}'
    bad(env, "automaton states", json_schema=big)
    long = (
        '{"type": "array", "minItems": 60, "maxItems": 60, "items": '  # 60 x [1,1,1]: shortest 481 tokens
        '{"type": "array", "minItems": 3, "maxItems": 3, "items": {"enum": [1]}}}'
    )
    bad(env, "limits.max_new_tokens", json_schema=long, max_new_tokens=256)
    short = '{"type": "array", "minItems": 20, "maxItems": 20, "items": {"enum": [1]}}'  # shortest: 41 tokens
    bad(env, "raise max_new_tokens", json_schema=short, max_new_tokens=16)
    ok(env, json_schema=short, max_new_tokens=48)


def test_slot_min_tokens_at_most_max_tokens(env):
    req = make(template=["x = "])
    req.template.parts.add(slot=pb.Slot(name="a", max_tokens=4, min_tokens=4))
    run(env, req)
    req.template.parts[1].slot.min_tokens = 5
    with pytest.raises(InvalidRequest, match="min_tokens 5"):
        run(env, req)


def test_request_id_at_most_128_chars(env):
    ok(env, request_id="x" * 128)
    bad(env, "request_id has 129", request_id="x" * 129)
