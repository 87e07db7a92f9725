"""The OpenAI-compatible HTTP API through the real server, driven by the official `openai` client: Ray Serve's
HTTP proxy on the session app's http_port, the Router's FastAPI ingress, the real Engine and the shipped model."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from model.tokenizer import Tokenizer
from protos.blockserve.v1 import blockserve_pb2 as pb

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

FAST = {"blockserve": {"sampling": {"max_denoising_steps": 6}}}  # short canvases: these tests check the API
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    },
]


@pytest.fixture(scope="module")
def client(app):
    c = openai.OpenAI(
        base_url=f"http://127.0.0.1:{app.config.server.http_port}/v1", api_key="unused", max_retries=0
    )
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client) -> str:
    models = client.models.list().data
    assert [m.id for m in models] == ["test-model"]
    return models[0].id


def test_completion_honours_max_tokens_exactly_and_reports_usage(client, model):
    reasons = []
    for max_tokens in (5, 40):  # inside one canvas, and across two
        out = client.completions.create(
            model=model, prompt="import os\n", max_tokens=max_tokens, seed=3, extra_body=FAST
        )
        choice = out.choices[0]
        reasons.append(choice.finish_reason)
        assert out.usage.completion_tokens <= max_tokens
        if choice.finish_reason == "length":
            assert out.usage.completion_tokens == max_tokens
        assert len(out.model_extra["blockserve"]["token_ids"]) == out.usage.completion_tokens
        assert (
            out.usage.prompt_tokens > 0
            and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        )
    assert "length" in reasons  # the exact-count branch really ran
    long = client.completions.create(
        model=model, prompt="import os\n", max_tokens=40, seed=3, extra_body=FAST
    )
    cut = client.completions.create(
        model=model, prompt="import os\n", max_tokens=40, seed=3, stop=["\n"], extra_body=FAST
    )
    if "\n" in long.choices[0].text:  # same seed, same tokens: the stop string cuts where the newline was
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == long.choices[0].text.split("\n")[0]


def test_chat_answers_and_thinking_switch_reaches_the_template(app, client, model):
    messages = [
        {"role": "system", "content": "Answer in Python."},
        {"role": "user", "content": "Sort a list"},
    ]
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, seed=1, extra_body=FAST
    )
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert out.usage.completion_tokens <= 24 and out.choices[0].finish_reason in ("stop", "length")
    # thinking on: the template leaves the thought block to the model, and whatever it writes is parsed
    on = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        seed=1,
        extra_body={**FAST, "chat_template_kwargs": {"enable_thinking": True}},
    )
    closed_thought = len(
        Tokenizer.from_dir(app.model_path).encode("<think></think>")
    )  # thinking off pre-fills it
    assert out.usage.prompt_tokens - on.usage.prompt_tokens == closed_thought


def test_streams_chunk_per_canvas_and_per_step_with_drafts(client, model):
    chunks = list(
        client.completions.create(
            model=model,
            prompt="def f(x):",
            max_tokens=64,
            seed=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FAST,
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens <= 64
    assert 1 <= len(texts) <= 2  # one chunk per committed canvas (canvas 32 tokens)
    whole = client.completions.create(model=model, prompt="def f(x):", max_tokens=64, seed=2, extra_body=FAST)
    assert "".join(texts) == whole.choices[0].text

    steps = 6
    drafted = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20,
            seed=2,
            stream=True,
            extra_body={"blockserve": {"sampling": {"max_denoising_steps": steps}, "stream_drafts": True}},
        )
    )
    drafts = [
        c.model_extra["blockserve"]["draft"] for c in drafted if (c.model_extra or {}).get("blockserve")
    ]
    assert 1 <= len(drafts) <= steps and [d["step"] for d in drafts] == list(range(1, len(drafts) + 1))
    streamed = "".join(c.choices[0].delta.content or "" for c in drafted if c.choices)
    unary = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=20,
        seed=2,
        extra_body={"blockserve": {"sampling": {"max_denoising_steps": steps}}},
    )
    assert (
        streamed == unary.choices[0].message.content
    )  # drafts change nothing; the deltas add up to the reply
    assert (
        drafted[0].choices[0].delta.role == "assistant" and drafted[-1].choices[0].finish_reason is not None
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_and_forced_tool_calls_always_validate(client, model, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather?"}],
        response_format=fmt,
        seed=seed,
        extra_body=FAST,
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), WEATHER)

    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Oslo?"}],
        tools=TOOLS,
        tool_choice=named,
        seed=seed,
        extra_body=FAST,
    )
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and out.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "2+3?"}],
        tools=TOOLS,
        tool_choice="required",
        seed=seed,
        extra_body=FAST,
    )
    (call,) = out.choices[0].message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_tool_call_comes_name_first_and_accumulates_to_the_unary_call(client, model):
    """`stream: true` with a forced call: a first delta with the call's index, id and name, then its arguments;
    the official client's stream accumulation ends with the unary answer's call (same seed, same tokens)."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Oslo?"}],
        tools=TOOLS,
        tool_choice=named,
        seed=5,
        extra_body=FAST,
    )
    unary = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kwargs) as stream:
        deltas = [
            d
            for event in stream
            if event.type == "chunk"
            for d in event.chunk.choices[0].delta.tool_calls or []
        ]
        final = stream.get_final_completion().choices[0]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.function.name == "get_weather"
    assert first.function.arguments == "" and rest and all(d.id is None and d.index == 0 for d in rest)
    (call,) = final.message.tool_calls
    assert final.finish_reason == "tool_calls" and call.id == first.id
    assert (call.function.name, call.function.arguments) == (unary.function.name, unary.function.arguments)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 10**6}, "max_tokens"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "not": {"const": "a"}}},
                }
            },
            "response_format",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"top_p": 0.5}, "top_p"),
        ({"temperature": 3}, "temperature"),
        (
            {"extra_body": {"blockserve": {"sampling": {"entropy_bound": -1}}}},
            "blockserve.sampling.entropy_bound",
        ),
    ],
)
def test_invalid_requests_get_400_naming_the_field(client, model, kwargs, field):
    kwargs = {"messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, max_tokens=kwargs.pop("max_tokens", 8), **kwargs)
    assert info.value.status_code == 400
    assert field in info.value.body["message"], info.value.body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=4)


def test_grpc_and_http_give_identical_tokens_for_the_same_seed(app, client, model):
    out = client.completions.create(model=model, prompt="class A:\n", max_tokens=40, seed=11, extra_body=FAST)
    sampling = pb.SamplingOverrides(max_denoising_steps=6)
    reply = app.stub.Generate(
        pb.GenerateRequest(prompt="class A:\n", max_new_tokens=40, seed=11, sampling=sampling), timeout=120
    )
    assert (
        list(reply.token_ids) == out.model_extra["blockserve"]["token_ids"]
        and reply.text == out.choices[0].text
    )

    messages = [{"role": "user", "content": "Weather?"}]
    http = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS[:1], tool_choice="required", seed=5, extra_body=FAST
    )
    chat = pb.Chat(
        messages=[pb.ChatMessage(role="user", content="Weather?")],
        tools=[pb.Tool(name="get_weather", description="Forecast", parameters=json.dumps(WEATHER))],
        tool_choice=pb.TOOL_CHOICE_REQUIRED,
    )
    reply = app.stub.Generate(pb.GenerateRequest(chat=chat, seed=5, sampling=sampling), timeout=120)
    assert list(reply.token_ids) == http.model_extra["blockserve"]["token_ids"]
    assert reply.chat.tool_calls[0].arguments == http.choices[0].message.tool_calls[0].function.arguments


def test_grpc_chat_validation_is_the_same_source(app):
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="x")], tool_name="missing")
    with pytest.raises(grpc.RpcError) as info:
        app.stub.Generate(pb.GenerateRequest(chat=chat), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat.tool_name" in info.value.details()
