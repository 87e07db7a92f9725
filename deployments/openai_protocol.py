"""OpenAI request bodies -> `GenerateRequest`, and blockserve answers -> OpenAI response objects.

Only translation lives here: every check of a value's meaning (lengths, ranges, schemas, templates) is done once,
for gRPC and HTTP alike, by deployments/requests.py; its messages name proto fields, which `openai_param`
renames to the OpenAI field a client sent. What OpenAI's API has and blockserve cannot honour (n > 1, logprobs,
top_p != 1, penalties, logit_bias, echo, suffix, best_of) is refused with 400 naming the field.

Mappings (documented in the README):
- `temperature` T in [0, 2] scales the server's denoising temperature schedule: t_max = T x default t_max and
  t_min = T x default t_min (T = 1 keeps the defaults; T = 0 is read as 0.01, near-greedy). Explicit
  `blockserve.sampling.t_min` / `t_max` win.
- `max_tokens` (or `max_completion_tokens`) -> max_new_tokens: the completion never has more tokens, and has
  exactly that many when finish_reason is "length".
- `response_format` `json_schema` -> json_schema (output guaranteed to validate); `json_object` -> the schema
  `{"type": "object"}` (any JSON object, nesting bounded as docs/STRUCTURED.md says).
- `tool_choice` "none" / "auto" / "required" / {"type": "function", "function": {"name": ...}} -> Chat.tool_choice /
  Chat.tool_name; a forced call's arguments are generated under the tool's parameter schema.
- The extension field `blockserve`: {"sampling": {max_denoising_steps, entropy_bound, t_min, t_max,
  stability_threshold, confidence_threshold}, "stream_drafts": bool, "request_id": str}.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from google.protobuf.struct_pb2 import Struct
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.requests import SAMPLING_FIELDS
from model.sampling.params import SamplingParams
from protos.blockserve.v1 import blockserve_pb2 as pb

TEMPERATURE_FLOOR = 0.01  # temperature 0 -> this scale: the coldest schedule the sampler accepts (t_min > 0)
FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_TEMPLATE_DONE: "stop",
}
# proto field (as requests.py names it) -> the OpenAI field, longest first
PARAM_NAMES = [
    ("chat.template_kwargs", "chat_template_kwargs"),
    ("chat.tool_choice", "tool_choice"),
    ("chat.tool_name", "tool_choice.function.name"),
    ("chat.messages", "messages"),
    ("chat.tools", "tools"),
    ("prompt_token_ids", "prompt"),
    ("max_new_tokens", "max_tokens"),
    ("json_schema", "response_format.json_schema.schema"),
    ("sampling.", "blockserve.sampling."),
    ("request_id", "blockserve.request_id"),
    ("chat:", "messages:"),
]


class BadRequest(ValueError):
    """Answered as HTTP 400 in OpenAI's error shape; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def openai_param(message: str) -> tuple[str, str | None]:
    """A requests.py message with proto field names replaced by OpenAI ones, and the first field it names."""
    first = None
    for proto, openai in PARAM_NAMES:
        if proto in message:
            at = message.index(proto)
            if first is None or at < first[0]:
                first = (at, openai.rstrip(".:"))
            message = message.replace(proto, openai)
    return message, first[1] if first else None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Extension(_Body):
    sampling: dict[str, float | int] = Field(default_factory=dict)
    stream_drafts: bool = False
    request_id: str = ""


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Common(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    blockserve: Extension = Field(default_factory=Extension)


class CompletionBody(Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False


class ChatBody(Common):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None


UNSUPPORTED = {  # field -> the value that means "not used"
    "top_p": 1,
    "n": 1,
    "logprobs": None,
    "top_logprobs": None,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "best_of": 1,
    "suffix": None,
    "echo": False,
}


def parse_body(cls: type[Common], data: Any) -> Common:
    try:
        body = cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{param}: {first['msg']}", param) from None
    extras = {
        **(body.model_extra or {}),
        **{k: getattr(body, k) for k in ("top_p", "n", "echo") if hasattr(body, k)},
    }
    for name, neutral in UNSUPPORTED.items():
        value = extras.get(name)
        if value is not None and value != neutral and not (neutral is None and value is False):
            raise BadRequest(f"{name}={value!r} is not supported by blockserve (leave it unset)", name)
    return body


# -- request translation ---------------------------------------------------------------------------------------
def _sampling(body: Common, defaults: SamplingParams, out: pb.GenerateRequest) -> None:
    unknown = sorted(set(body.blockserve.sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise BadRequest(
            f"blockserve.sampling has unknown fields {unknown}; known: {list(SAMPLING_FIELDS)}",
            "blockserve.sampling",
        )
    if body.temperature is not None:
        scale = max(body.temperature, TEMPERATURE_FLOOR)
        out.sampling.t_min = defaults.t_min * scale
        out.sampling.t_max = defaults.t_max * scale
    for name, value in body.blockserve.sampling.items():
        try:
            setattr(out.sampling, name, value)
        except (TypeError, ValueError) as e:
            raise BadRequest(f"blockserve.sampling.{name}: {e}", f"blockserve.sampling.{name}") from None


def _common(body: Common, defaults: SamplingParams, out: pb.GenerateRequest) -> pb.GenerateRequest:
    out.max_new_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 0
    if body.seed is not None:
        out.seed = body.seed
    if body.stop is not None:
        out.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    out.stream_drafts = body.stream and body.blockserve.stream_drafts
    out.request_id = body.blockserve.request_id
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        out.json_schema = json.dumps({"type": "object"})
    if fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest(
                "response_format.json_schema.schema must be a JSON Schema object",
                "response_format.json_schema.schema",
            )
        out.json_schema = json.dumps(schema)
    _sampling(body, defaults, out)
    return out


def completion_request(body: CompletionBody, defaults: SamplingParams) -> pb.GenerateRequest:
    out = pb.GenerateRequest()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise BadRequest(
                "prompt: send one prompt per request (batches of prompts are not supported)", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        out.prompt = prompt
    else:
        out.prompt_token_ids.ids.extend(prompt)
    return _common(body, defaults, out)


def _content(value: Any, where: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"{where}[{i}]: only text content parts are supported", f"{where}[{i}]")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise BadRequest(f"{where} must be a string or a list of text parts", where)


def _message(m: dict, i: int) -> pb.ChatMessage:
    where = f"messages[{i}]"
    role = m.get("role")
    if role == "developer":  # OpenAI's newer name for system
        role = "system"
    msg = pb.ChatMessage(
        role=str(role or ""),
        content=_content(m.get("content"), f"{where}.content"),
        reasoning_content=str(m.get("reasoning_content") or m.get("reasoning") or ""),
        tool_call_id=str(m.get("tool_call_id") or ""),
        name=str(m.get("name") or ""),
    )
    for j, call in enumerate(m.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"{where}.tool_calls[{j}].function.name is missing", f"{where}.tool_calls[{j}]")
        args = fn.get("arguments", "{}")
        msg.tool_calls.add(
            id=str(call.get("id", "")),
            name=fn["name"],
            arguments=args if isinstance(args, str) else json.dumps(args),
        )
    return msg


def _tools(body: ChatBody, chat: pb.Chat) -> None:
    for i, tool in enumerate(body.tools or []):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        chat.tools.add(
            name=str(fn.get("name", "")),
            description=str(fn.get("description") or ""),
            parameters=json.dumps(fn["parameters"]) if fn.get("parameters") is not None else "",
        )
    choice = body.tool_choice
    if choice is None or choice == "auto":
        return
    if choice == "none":
        chat.tool_choice = pb.TOOL_CHOICE_NONE
    elif choice == "required":
        chat.tool_choice = pb.TOOL_CHOICE_REQUIRED
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        chat.tool_name = choice["function"]["name"]
    else:
        raise BadRequest(
            "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )


def chat_request(body: ChatBody, defaults: SamplingParams) -> pb.GenerateRequest:
    out = pb.GenerateRequest()
    out.chat.SetInParent()
    for i, m in enumerate(body.messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        out.chat.messages.append(_message(m, i))
    _tools(body, out.chat)
    kwargs = {**(body.model_extra or {}).get("template_kwargs", {}), **(body.chat_template_kwargs or {})}
    if kwargs:
        struct = Struct()
        struct.update(kwargs)
        out.chat.template_kwargs.CopyFrom(struct)
    return _common(body, defaults, out)


# -- responses -------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(u: pb.Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def stats(s: pb.GenerationStats) -> dict:
    out = _stats(s)
    if s.HasField("load_adaptation"):  # load-adaptive sampling changed the request's sampling under load
        a = s.load_adaptation
        out["load_adaptation"] = {
            "request_class": a.request_class,
            "pressure": a.pressure,
            "entropy_bound": a.entropy_bound,
            "max_denoising_steps": a.max_denoising_steps,
        }
    return out


def _stats(s: pb.GenerationStats) -> dict:
    return {
        "canvases": s.canvases,
        "denoising_steps": s.denoising_steps,
        "steps_per_canvas": list(s.steps_per_canvas),
        "tokens_per_forward": s.tokens_per_forward,
        "time_to_first_canvas_s": s.time_to_first_canvas_s,
        "total_time_s": s.total_time_s,
        "tokens_per_second": s.tokens_per_second,
        "queue_time_s": s.queue_time_s,
    }


def tool_calls(reply: pb.ChatReply, with_index: bool = False) -> list[dict]:
    out = []
    for i, c in enumerate(reply.tool_calls):
        call = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": i, **call} if with_index else call)
    return out


def unsent_tool_calls(reply: pb.ChatReply, sent: list) -> list[dict]:
    """`delta.tool_calls` entries for what of the final calls a stream has not sent yet (`sent`: per index, the
    streamed call's `id` and argument text `sent`): a call never streamed comes as its name, then its arguments."""
    out = []
    for i, c in enumerate(reply.tool_calls):
        if i >= len(sent):
            fn = {"name": c.name, "arguments": ""}
            out.append({"index": i, "id": c.id, "type": "function", "function": fn})
            done = ""
        else:
            done = sent[i].sent
        if len(c.arguments) > len(done) and c.arguments.startswith(done):
            out.append({"index": i, "function": {"arguments": c.arguments[len(done) :]}})
    return out


def chat_finish(final: pb.Final | pb.GenerateResponse) -> str:
    return "tool_calls" if final.chat.tool_calls else FINISH.get(final.finish_reason, "stop")


def envelope(kind: str, rid: str, model: str, choices: list, **extra) -> dict:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }
