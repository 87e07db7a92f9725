"""Gemma 4's reply conventions: a tiny tokenizer with Gemma 4's control tokens and a template of the same shape
(written here), rendered as transformers renders it, and replies in Gemma 4's exact format (`<|channel>thought`
reasoning, `<|tool_call>call:NAME{key:<|"|>text<|"|>}<tool_call|>` calls, `<turn|>` / `<|tool_response>` ends)
parsed into reasoning, content and calls, whole and while streaming."""

from __future__ import annotations

import json

import pytest

from deployments.chat import (
    FORMATS,
    GEMMA4_FORMAT,
    ChatChoice,
    ChatFormat,
    ChatTemplate,
    ReplyStream,
    calls_so_far,
    choose_format,
    parse_reply,
)
from deployments.tool_calls import ToolCallStream, read_value
from model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONTROL = [
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
]
# Gemma 4's shape: a system turn that switches thinking on with <|think|> and declares the tools, model turns,
# tool calls and responses in the native key:value syntax.
TEMPLATE = """{{- bos_token -}}
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- set turns = messages[1:] if has_system else messages -%}
{%- if has_system or tools or enable_thinking -%}
{{- '<|turn>system\\n' -}}
{%- if enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{%- if has_system -%}{{- messages[0].content -}}{%- endif -%}
{%- for tool in tools | default([], true) -%}
{{- '<|tool>declaration:' + tool.function.name + (tool.function.parameters | tojson) + '<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message.role == 'assistant' else message.role -%}
{{- '<|turn>' + role + '\\n' -}}
{%- if message.role == 'tool' -%}
{{- '<|tool_response>response:' + message.name + '{value:<|"|>' + message.content + '<|"|>}<tool_response|>' -}}
{%- elif message.content -%}
{{- message.content -}}
{%- endif -%}
{%- for call in message.tool_calls | default([]) -%}
{{- '<|tool_call>call:' + call.function.name + '{' -}}
{%- for key, value in call.function.arguments.items() -%}
{{- key + ':' -}}
{%- if value is string -%}{{- '<|"|>' + value + '<|"|>' -}}{%- else -%}{{- value | tojson -}}{%- endif -%}
{%- if not loop.last -%}{{- ',' -}}{%- endif -%}
{%- endfor -%}
{{- '}<tool_call|>' -}}
{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
            }
        ],
    },
    {"role": "tool", "name": "get_weather", "content": "cold"},
]
# A reply in Gemma 4's exact format: thought channel, a sentence, two calls back to back, then the model hands
# over with <|tool_response> (it ends the reply: what follows is not the model's)
REPLY = (
    "<|channel>thought\nThe user wants weather and a sum.<channel|>Checking."
    '<|tool_call>call:get_weather{city:<|"|>San Francisco, "CA"<|"|>,days:3,metric:true,'
    'where:{lat:37.77,tags:[<|"|>fog<|"|>,1]},note:null}<tool_call|>'
    "<|tool_call>call:add{a:2,b:-3.5}<tool_call|><|tool_response>ignored"
)
CALLS = [
    (
        "get_weather",
        {
            "city": 'San Francisco, "CA"',
            "days": 3,
            "metric": True,
            "where": {"lat": 37.77, "tags": ["fog", 1]},
            "note": None,
        },
    ),
    ("add", {"a": 2, "b": -3.5}),
]


@pytest.fixture(scope="module")
def gemma4_tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    from model.training import bpe

    raw = bpe.train_bpe(["The weather in Oslo is cold and the sum is small. " * 20], vocab_size=300)
    raw.add_special_tokens(CONTROL)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("gemma4-tokenizer")
    tok.save_pretrained(path)
    return tok, path


@pytest.mark.parametrize("thinking", [False, True])
def test_gemma4_shaped_template_renders_as_transformers_does(gemma4_tokenizer, thinking):
    tok, path = gemma4_tokenizer
    ours = ChatTemplate.from_dir(path)
    expected = tok.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False, enable_thinking=thinking
    )
    got = ours.render(CONVERSATION, tools=TOOLS, enable_thinking=thinking)
    assert got == expected and ("<|think|>" in got) == thinking
    assert '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:2}<tool_call|>' in got
    ids = tok.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, enable_thinking=thinking
    )
    assert Tokenizer.from_dir(path).encode(got) == ids["input_ids"]
    assert choose_format(ChatChoice(), ours.source) == GEMMA4_FORMAT  # auto: the template's control tokens


def test_reply_in_gemma4_format_parses_into_reasoning_content_and_calls():
    reply = parse_reply(REPLY.split("<|tool_response>")[0], GEMMA4_FORMAT)
    assert reply.reasoning == "The user wants weather and a sum."  # without the "thought\n" label
    assert reply.content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == CALLS
    # arguments are JSON text as json.dumps writes it (what OpenAI clients json.loads)
    assert reply.tool_calls[1].arguments == json.dumps(CALLS[1][1])
    # thinking off: a reply with no channel is all content; a malformed call stays text
    assert parse_reply("Hi.", GEMMA4_FORMAT).content == "Hi."
    broken = "<|tool_call>call:f{a:<tool_call|>"
    assert parse_reply(broken, GEMMA4_FORMAT).content == broken
    # a bare (undelimited) value runs to the next delimiter, spaces and all
    (call,) = parse_reply("<|tool_call>call:f{a:hello world , b:2}<tool_call|>", GEMMA4_FORMAT).tool_calls
    assert json.loads(call.arguments) == {"a": "hello world", "b": 2}


def test_gemma4_reply_tokens_through_the_router_text_path(gemma4_tokenizer):
    """The ids a Gemma 4 model writes: control tokens that are markers (and the string delimiter) stay text for
    the parser, <|tool_response> ends the reply as <turn|> does, as the chat plan sets them up."""
    from deployments.router import TextAssembler

    _, path = gemma4_tokenizer
    tok = Tokenizer.from_dir(path)
    fmt = GEMMA4_FORMAT
    keep = frozenset(tok.hf.token_to_id(m) for m in fmt.text_markers())
    stop = frozenset(tok.hf.token_to_id(m) for m in fmt.stop_markers())
    assert None not in keep | stop
    ids = tok.encode(REPLY)
    asm = TextAssembler(tok, [], stop_ids=stop, keep_ids=keep)
    half = len(ids) // 2
    asm.add(ids[:half])
    asm.add(ids[half:], final=True)
    assert asm.stopped and asm.sent == REPLY.split("<|tool_response>")[0]
    assert [(c.name, json.loads(c.arguments)) for c in parse_reply(asm.sent, fmt).tool_calls] == CALLS


def _stream(text: str, fmt: ChatFormat, cuts) -> tuple[list[dict], dict]:
    """Feed growing prefixes of a reply; returns every delta and the calls as an OpenAI client accumulates them."""
    stream, deltas, acc = ToolCallStream(), [], {}
    for cut in cuts:
        for d in stream.update(calls_so_far(text[:cut], fmt)):
            deltas.append(d)
            call = acc.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in d:
                assert call["id"] is None and d["function"]["arguments"] == ""  # the name comes first, once
                call["id"], call["name"] = d["id"], d["function"]["name"]
            else:
                assert call["id"] is not None  # fragments follow their call's first delta
            call["arguments"] += d["function"].get("arguments", "")
    return deltas, acc


JSON_REPLY = (
    '<think>ok</think>Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Caf\\u00e9 \\"X\\"", '
    '"days": 12, "flags": [true, null, 1.25]}}</tool_call>'
)


@pytest.mark.parametrize(
    ("text", "fmt"), [(REPLY, GEMMA4_FORMAT), (JSON_REPLY, ChatFormat())], ids=["gemma4", "json"]
)
@pytest.mark.parametrize("step", [1, 7, 40])
def test_streamed_arguments_add_up_to_the_final_arguments(text, fmt, step):
    """Arguments stream as they are written (here: a character, a few tokens or a canvas at a time); the
    fragments a client concatenates equal the arguments of the finished reply, call by call."""
    final = parse_reply(text.split("<|tool_response>")[0], fmt).tool_calls
    cuts = [*range(step, len(text), step), len(text)]
    deltas, acc = _stream(text, fmt, cuts)
    assert [(acc[i]["name"], acc[i]["arguments"]) for i in sorted(acc)] == [
        (c.name, c.arguments) for c in final
    ]
    fragments = [d for d in deltas if "id" not in d]
    if step == 1:  # really incremental: the first call's arguments arrive in many pieces before it closes
        assert len([d for d in fragments if d["index"] == 0]) > 5


def test_partial_values_never_send_what_may_change():
    # a number or keyword at the end may still grow; a string is sent up to its last character
    assert read_value("{a:12", "gemma4").items[0][1].closed is False
    stream = ToolCallStream()
    out = stream.update(calls_so_far('<|tool_call>call:f{n:12,s:<|"|>ab<|', GEMMA4_FORMAT))
    assert out[0]["function"]["name"] == "f"
    assert out[1]["function"]["arguments"] == '{"n": 12, "s": "ab'  # no piece of the <|"|> delimiter
    out = stream.update(calls_so_far('<|tool_call>call:f{n:12,s:<|"|>abc<|"|>,t:tr', GEMMA4_FORMAT))
    assert out == [{"index": 0, "function": {"arguments": 'c"'}}]  # "t": waits for its value to finish


def test_config_parser_names_are_the_formats_and_overrides_apply():
    from typing import get_args

    from cluster.config import ChatSection, ClusterConfig

    assert set(get_args(ChatSection.model_fields["parser"].annotation)) == {"auto", *FORMATS}
    choice = ClusterConfig().to_router_settings().chat_format
    assert choose_format(choice, "{{ '<start_of_turn>' }}") == ChatFormat()  # the tiny model's markers
    assert choose_format(choice, "{{ '<|turn>' }}") == GEMMA4_FORMAT
    forced = ClusterConfig.model_validate({"chat": {"parser": "gemma4", "end_of_turn": "<eot>"}})
    fmt = choose_format(forced.to_router_settings().chat_format, None)
    assert fmt.tool_syntax == "gemma4" and fmt.end_of_turn == "<eot>" and fmt.reasoning_start == "<|channel>"
    assert GEMMA4_FORMAT.call_prefix("add") == "<|tool_call>call:add"
    stream = ReplyStream(GEMMA4_FORMAT)
    assert stream.update("<|channel>thou") == ("", "")  # may still be the "thought\n" label: held back
    assert stream.update("<|channel>thought\nwhy<channel|>so", final=True) == ("why", "so")


def test_openai_client_accumulates_the_streamed_calls():
    """The chat stream's chunks for a Gemma 4 reply committed canvas by canvas, fed to the official `openai`
    client's own stream accumulator: it ends with the calls of the unary answer, and the finish reason."""
    openai_streaming = pytest.importorskip("openai.lib.streaming.chat")
    from openai.types.chat import ChatCompletionChunk

    from deployments import openai_protocol as oa
    from deployments.openai_api import OpenAIRouter
    from deployments.requests import ChatPlan, Prepared
    from protos.blockserve.v1 import blockserve_pb2 as pb

    text = REPLY.split("<|tool_response>")[0]
    chunks = OpenAIRouter._chat_chunks(None, Prepared(engine=None, chat=ChatPlan(format=GEMMA4_FORMAT)))
    replies, events = ReplyStream(GEMMA4_FORMAT), []
    for i, start in enumerate(range(0, len(text), 23)):  # a "canvas" of 23 characters
        piece = text[start : start + 23]
        reasoning, content = replies.update(text[: start + 23], final=start + 23 >= len(text))
        chat = pb.ChatDelta(content=content, reasoning_content=reasoning)
        events.append(pb.GenerateEvent(canvas=pb.Canvas(canvas_index=i, text_delta=piece, chat=chat)))
    parsed = parse_reply(text, GEMMA4_FORMAT)
    calls = [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in parsed.tool_calls]
    final = pb.Final(text=text, finish_reason=pb.FINISH_REASON_EOS, chat=pb.ChatReply(tool_calls=calls))
    events.append(pb.GenerateEvent(final=final))

    state = openai_streaming.ChatCompletionStreamState()
    tool_chunks = 0
    for event in events:
        for choice in chunks(event):
            tool_chunks += "tool_calls" in choice["delta"]
            envelope = oa.envelope("chat.completion.chunk", "chatcmpl-1", "m", [choice])
            state.handle_chunk(ChatCompletionChunk.model_validate(envelope))
    message = state.get_final_completion().choices[0].message
    got = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert got == CALLS and message.content == "Checking."
    assert state.get_final_completion().choices[0].finish_reason == "tool_calls"
    assert tool_chunks > len(CALLS) * 2  # arguments arrived over several canvases, not whole at the end
