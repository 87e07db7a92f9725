"""Validate and normalise a `GenerateRequest` once, at the Router: proto in, `Prepared` (engine request + what
the Router needs to build the answer) out, or `InvalidRequest` whose message says what to fix.

Every field is checked, and all problems are reported together so a client fixes them in one round trip. The rules
are the "Valid:" lines of protos/blockserve/v1/blockserve.proto (tests/deployments/test_request_rules.py holds one
test per rule). Sizes are checked before any tokenizing or schema compiling, so an oversized request costs the
Router next to nothing; anything a hostile document can make the compilers raise (deep nesting: RecursionError)
is an InvalidRequest too.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field

import torch
from google.protobuf.json_format import MessageToDict

from deployments.chat import (
    ChatError,
    ChatFormat,
    ChatTemplate,
    control_pattern,
    encode_marked,
    mark_control_tokens,
)
from deployments.scheduler import EngineRequest
from model.config import ModelConfig
from model.sampling.params import SamplingParams
from model.sampling.sampler import CanvasConstraint
from model.structured.constraint import RegularLayout, compile_json_schema
from model.structured.decode import SlotCanvas, SlotRun
from model.structured.schema_regular import RegularLimits
from model.structured.templates import Fixed, Layout, Slot, Template, TemplateError, TemplateLimits, layout
from model.structured.token_classes import token_classes_for
from model.tokenizer import Tokenizer
from protos.blockserve.v1 import blockserve_pb2 as pb

SAMPLING_FIELDS = (
    "max_denoising_steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
)


DEFAULT_SLOT_MIN_TOKENS = (
    1  # an infill slot without min_tokens holds content (the filler no longer wins by default)
)


class InvalidRequest(ValueError):
    """Answered as INVALID_ARGUMENT with this message."""


@dataclass
class RequestLimits:
    # Every generated position counts: free-text canvases and the positions of a template or json_schema alike.
    max_new_tokens: int = 4096
    max_prompt_tokens: int = 32768
    max_prompt_chars: int = 1 << 20
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_request_id_chars: int = 128
    max_schema_chars: int = 65536
    max_template_parts: int = 1024
    max_template_chars: int = 65536
    schema: RegularLimits = field(default_factory=RegularLimits)


SLOT_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class ChatSupport:
    """What chat requests need from the served checkpoint: its template (None = it has none) and reply markers."""

    template: ChatTemplate | None
    format: ChatFormat = field(default_factory=ChatFormat)


@dataclass
class ChatPlan:
    """How the Router answers a chat request."""

    format: ChatFormat
    stop_ids: frozenset[int] = frozenset()  # the end-of-turn token: the reply ends there
    marker_ids: frozenset[int] = frozenset()  # reasoning / tool-call markers that are single (special) tokens
    parse_tools: bool = True  # tool_choice NONE: the reply is all content
    forced_tool: str | None = None  # the reply is this tool's arguments (generated under its schema)
    choose_tool: bool = False  # REQUIRED with several tools: this request only picks the tool's name


@dataclass
class Prepared:
    engine: EngineRequest
    stop: list[str] = field(default_factory=list)
    layout: Layout | RegularLayout | None = None
    client_request_id: str = ""
    chat: ChatPlan | None = None


def _prompt_ids(
    req: pb.GenerateRequest, tokenizer: Tokenizer, cfg: ModelConfig, limits: RequestLimits, errors
):
    which = req.WhichOneof("prompt_input")
    if which is None:
        errors.append("set one of prompt (text), prompt_token_ids or chat")
        return []
    if which == "chat":  # rendered by _chat
        return []
    if which == "prompt":
        if not req.prompt:
            errors.append("prompt is empty: send some text")
            return []
        if len(req.prompt) > limits.max_prompt_chars:
            errors.append(f"prompt has {len(req.prompt)} characters; the limit is {limits.max_prompt_chars}")
            return []
        ids = tokenizer.encode(req.prompt)
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids
    else:
        if len(req.prompt_token_ids.ids) > limits.max_prompt_tokens:
            n = len(req.prompt_token_ids.ids)
            errors.append(f"the prompt has {n} tokens; this server's limit is {limits.max_prompt_tokens}")
            return []
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            errors.append("prompt_token_ids.ids is empty: send at least one token id")
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            errors.append(f"prompt_token_ids has ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    if len(ids) > limits.max_prompt_tokens:
        errors.append(f"the prompt has {len(ids)} tokens; this server's limit is {limits.max_prompt_tokens}")
    return ids


def _sampling(
    req: pb.GenerateRequest, defaults: SamplingParams, limits: RequestLimits, errors
) -> SamplingParams:
    values = {name: getattr(defaults, name) for name in SAMPLING_FIELDS}
    for name in SAMPLING_FIELDS:
        if req.sampling.HasField(name):
            values[name] = getattr(req.sampling, name)
    for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
        if not math.isfinite(values[name]):
            errors.append(f"sampling.{name} must be a finite number (got {values[name]})")
    max_new = req.max_new_tokens or defaults.max_new_tokens
    if max_new > limits.max_new_tokens:
        errors.append(f"max_new_tokens={max_new} exceeds this server's limit of {limits.max_new_tokens}")
    params = SamplingParams(max_new_tokens=max_new, **values)
    errors.extend(f"sampling.{e}" if not e.startswith("max_new") else e for e in params.errors())
    return params


def _stop(req: pb.GenerateRequest, limits: RequestLimits, errors) -> list[str]:
    stop = list(req.stop)
    if len(stop) > limits.max_stop_strings:
        errors.append(f"stop has {len(stop)} strings; at most {limits.max_stop_strings} are allowed")
    for i, s in enumerate(stop):
        if not s:
            errors.append(f"stop[{i}] is empty: remove it or give a non-empty string")
        elif len(s) > limits.max_stop_chars:
            errors.append(f"stop[{i}] has {len(s)} characters; the limit is {limits.max_stop_chars}")
    return stop


def schema_layout(
    schema, tokenizer: Tokenizer, cfg: ModelConfig, max_new_tokens: int, limits: RequestLimits
) -> RegularLayout:
    """A parsed JSON Schema -> the layout a request carries (compiled once per schema and vocabulary, cached).

    The entry point for every schema-constrained request (json_schema, and chat response formats / forced tool
    calls): max_new_tokens bounds the document. Raises ValueError (UnsupportedSchemaError, InvalidSchemaError,
    AutomatonTooLarge, or a too-small max_new_tokens) with a message that says what to change."""
    compiled = compile_json_schema(schema, token_classes_for(tokenizer, cfg.vocab_size), limits.schema)
    canvases = math.ceil(max_new_tokens / cfg.canvas_length)
    if compiled.min_tokens > limits.max_new_tokens:
        raise ValueError(
            f"the shortest valid document takes {compiled.min_tokens} tokens; this server's limit "
            f"(limits.max_new_tokens) is {limits.max_new_tokens}: lower minItems/minLength or simplify the schema"
        )
    if compiled.min_tokens > canvases * cfg.canvas_length:
        raise ValueError(
            f"the shortest valid document takes {compiled.min_tokens} tokens but max_new_tokens "
            f"allows {canvases * cfg.canvas_length}; raise max_new_tokens"
        )
    return RegularLayout(compiled, cfg.canvas_length, canvases, tokenizer.pad_id)


def _json_schema(
    req: pb.GenerateRequest,
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    params: SamplingParams,
    limits: RequestLimits,
    errors,
) -> RegularLayout | None:
    if len(req.json_schema) > limits.max_schema_chars:
        errors.append(
            f"json_schema has {len(req.json_schema)} characters; the limit is {limits.max_schema_chars}"
        )
        return None
    try:
        schema = json.loads(req.json_schema)
    except json.JSONDecodeError as e:
        errors.append(f"json_schema is not valid JSON: {e}")
        return None
    except RecursionError:
        errors.append("json_schema is nested too deeply to parse; flatten it")
        return None
    try:
        return schema_layout(schema, tokenizer, cfg, params.max_new_tokens, limits)
    except ValueError as e:
        errors.append(f"json_schema: {e}")
        return None
    except RecursionError:
        errors.append("json_schema is nested too deeply; flatten it or use $defs")
        return None


def _template(req: pb.GenerateRequest, limits: RequestLimits, errors) -> Template | None:
    if req.WhichOneof("structure") != "template":
        return None
    return _user_template(req.template, limits, errors)


def _user_template(template: pb.Template, limits: RequestLimits, errors) -> Template | None:
    n = len(template.parts)
    if n > limits.max_template_parts:
        errors.append(f"template has {n} parts; the limit is {limits.max_template_parts}")
        return None
    chars = sum(len(p.text) for p in template.parts)
    if chars > limits.max_template_chars:
        errors.append(
            f"template has {chars} characters of fixed text; the limit is {limits.max_template_chars}"
        )
        return None
    parts, problems = [], []
    for i, part in enumerate(template.parts):
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append(Fixed(part.text))
        elif kind == "slot":
            name = part.slot.name
            if not SLOT_NAME.fullmatch(name):
                problems.append(
                    f"template.parts[{i}].slot.name {name!r} must be letters, digits and '_' only (not empty)"
                )
            if part.slot.max_tokens < 1:
                problems.append(
                    f"template.parts[{i}].slot.max_tokens must be >= 1 (got {part.slot.max_tokens})"
                )
            valid_name = name if SLOT_NAME.fullmatch(name) else f"part{i}"  # the error is already recorded
            most = max(1, part.slot.max_tokens)
            least = (
                part.slot.min_tokens
                if part.slot.HasField("min_tokens")
                else min(DEFAULT_SLOT_MIN_TOKENS, most)
            )
            try:
                parts.append(Slot(valid_name, most, min_tokens=least))
            except TemplateError as e:
                problems.append(f"template.parts[{i}]: {e}")
                parts.append(Slot(valid_name, most))  # the error is already recorded
        else:
            problems.append(f"template.parts[{i}] is empty: set text or slot")
    if not any(isinstance(p, Slot) for p in parts):
        problems.append(
            "template has no slot: give at least one slot (a template of fixed text only is a prompt)"
        )
    errors.extend(problems)
    if problems:
        return None
    try:
        return Template(tuple(parts))
    except (TemplateError, ValueError) as e:
        errors.append(f"template: {e}")
        return None


def _slot_tokens(template: Template) -> int:
    return sum(p.max_tokens for p in template.parts if isinstance(p, Slot))


def _constraints(lay: Layout | RegularLayout) -> list[CanvasConstraint]:
    if isinstance(lay, RegularLayout):  # every position may hold any token of the automaton; the DP ties them
        allowed = torch.from_numpy(lay.compiled.automaton.allowed)  # [V]
        table = torch.stack([torch.ones_like(allowed), allowed])
        L = lay.canvas_length
        free, classes = torch.full((L,), -1, dtype=torch.long), torch.ones(L, dtype=torch.long)
        return [CanvasConstraint(free, classes, table, joint=c) for c in lay.canvases()]
    table = lay.mask_table()  # [C, V], row 0 all True; shared by every canvas of the request
    minimums = lay.slot_minimums
    run = SlotRun(minimums, lay.canvas_length, lay.pad_id) if minimums else None
    out = []
    for i in range(lay.num_canvases):
        pins, classes = lay.canvas(i)
        out.append(CanvasConstraint(pins, classes, table, joint=SlotCanvas(run, i) if run else None))
    return out


def prepare(
    req: pb.GenerateRequest,
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    defaults: SamplingParams,
    limits: RequestLimits,
    request_id: str,
    chat: ChatSupport | None = None,
) -> Prepared:
    errors: list[str] = []
    prompt = _prompt_ids(req, tokenizer, cfg, limits, errors)
    plan = None
    if req.WhichOneof("prompt_input") == "chat":
        req, prompt, plan = _chat_request(req, tokenizer, chat, limits, errors)
    params = _sampling(req, defaults, limits, errors)
    stop = _stop(req, limits, errors)
    if len(req.request_id) > limits.max_request_id_chars:
        errors.append(
            f"request_id has {len(req.request_id)} characters; the limit is {limits.max_request_id_chars}"
        )
    before = len(errors)
    template = _template(req, limits, errors)
    lay: Layout | RegularLayout | None = None
    if req.WhichOneof("structure") == "json_schema":
        lay = _json_schema(req, tokenizer, cfg, params, limits, errors)
    if plan is not None and (
        plan.forced_tool or plan.choose_tool
    ):  # the schema came from the tool, not the client
        where = f"chat.tools[{plan.forced_tool!r}].parameters" if plan.forced_tool else "chat.tools names"
        errors[before:] = [e.replace("json_schema", where, 1) for e in errors[before:]]
    if template is not None and _slot_tokens(template) > limits.max_new_tokens:
        errors.append(
            f"the {req.WhichOneof('structure')} asks for {_slot_tokens(template)} tokens in its slots; this "
            f"server's limit (limits.max_new_tokens) is {limits.max_new_tokens}: use fewer or smaller slots"
        )
        template = None
    if template is not None:
        try:
            classes = token_classes_for(tokenizer, cfg.vocab_size)
            lay = layout(template, tokenizer, cfg.canvas_length, TemplateLimits(), classes)
        except (TemplateError, ValueError) as e:
            errors.append(f"template: {e}")
    if req.WhichOneof("structure") is not None and stop:
        errors.append("stop strings cannot be combined with template or json_schema (their length is fixed)")
    # a json_schema's positions are bounded by max_new_tokens already (schema_layout); a template's are its own
    if isinstance(lay, Layout) and lay.num_content_positions > limits.max_new_tokens:
        errors.append(
            f"the {req.WhichOneof('structure')} needs {lay.num_content_positions} generated positions; this server's "
            f"limit (limits.max_new_tokens) is {limits.max_new_tokens}: use fewer or smaller slots"
        )
    if errors:
        raise InvalidRequest("; ".join(errors))
    new_positions = (
        lay.num_positions if lay else math.ceil(params.max_new_tokens / cfg.canvas_length) * cfg.canvas_length
    )
    if len(prompt) + new_positions > cfg.max_position_embeddings:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + {new_positions} generated positions exceeds the model's context of "
            f"{cfg.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
        )
    seed = req.seed if req.HasField("seed") else random.getrandbits(63)
    engine = EngineRequest(
        request_id=request_id,
        prompt_ids=prompt,
        params=params,
        seed=seed,
        stream_drafts=req.stream_drafts,
        constraints=_constraints(lay) if lay else None,
    )
    return Prepared(engine, stop, lay, chat=plan)


# -- chat ------------------------------------------------------------------------------------------------------
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TEMPLATE_BOUND = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


def _chat_request(req: pb.GenerateRequest, tokenizer: Tokenizer, support, limits: RequestLimits, errors):
    """(the request to generate, prompt ids, plan): a forced tool call becomes a json_schema request."""
    prompt, plan, schema = _chat(req, tokenizer, support, limits, errors)
    if schema is None:
        return req, prompt, plan
    if req.WhichOneof("structure") is not None:
        errors.append(
            "a forced tool call (chat.tool_choice REQUIRED / chat.tool_name) cannot be combined with template or "
            "json_schema: the call's arguments already follow the tool's schema"
        )
        return req, prompt, plan
    forced = pb.GenerateRequest()
    forced.CopyFrom(req)
    forced.json_schema = json.dumps(schema)
    return forced, prompt, plan


def _chat_messages(chat: pb.Chat, limits: RequestLimits, errors) -> list[dict]:
    messages, chars = [], 0
    if not chat.messages:
        errors.append("chat.messages is empty: send at least one message")
    for i, m in enumerate(chat.messages):
        if m.role not in ("system", "user", "assistant", "tool"):
            errors.append(f"chat.messages[{i}].role must be system, user, assistant or tool (got {m.role!r})")
        message: dict = {"role": m.role, "content": m.content}
        if m.reasoning_content:
            message["reasoning_content"] = m.reasoning_content
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = []
            for j, call in enumerate(m.tool_calls):
                args = _json_object(
                    call.arguments or "{}", f"chat.messages[{i}].tool_calls[{j}].arguments", errors
                )
                message["tool_calls"].append(
                    {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": args}}
                )
        chars += len(m.content) + len(m.reasoning_content)
        messages.append(message)
    if chars > limits.max_prompt_chars:
        errors.append(f"chat.messages have {chars} characters; the limit is {limits.max_prompt_chars}")
    return messages


def _json_object(text: str, where: str, errors) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        errors.append(f"{where} is not valid JSON: {e}")
        return {}
    if not isinstance(value, dict):
        errors.append(f"{where} must be a JSON object")
        return {}
    return value


def _chat_tools(chat: pb.Chat, limits: RequestLimits, errors) -> tuple[list[dict], dict[str, dict]]:
    tools, schemas = [], {}
    for i, tool in enumerate(chat.tools):
        if not TOOL_NAME.match(tool.name):
            errors.append(
                f"chat.tools[{i}].name must be 1-64 letters, digits, '_' or '-' (got {tool.name!r})"
            )
        elif tool.name in schemas:
            errors.append(f"chat.tools[{i}].name {tool.name!r} is used twice")
        if len(tool.parameters) > limits.max_schema_chars:
            errors.append(
                f"chat.tools[{i}].parameters has {len(tool.parameters)} characters; "
                f"the limit is {limits.max_schema_chars}"
            )
            continue
        params = _json_object(
            tool.parameters or '{"type": "object", "properties": {}}', f"chat.tools[{i}].parameters", errors
        )
        schemas[tool.name] = params
        function = {"name": tool.name, "parameters": params}
        if tool.description:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    return tools, schemas


def _forced(chat: pb.Chat, schemas: dict[str, dict], errors) -> tuple[str | None, bool]:
    """(the tool whose call is forced, whether the tool must first be chosen among several)."""
    if chat.tool_name:
        if chat.tool_name not in schemas:
            errors.append(f"chat.tool_name {chat.tool_name!r} is not one of chat.tools ({sorted(schemas)})")
        return chat.tool_name, False
    if chat.tool_choice == pb.TOOL_CHOICE_REQUIRED:
        if not schemas:
            errors.append("chat.tool_choice is REQUIRED but chat.tools is empty: give at least one tool")
            return None, False
        if len(schemas) == 1:
            return next(iter(schemas)), False
        return None, True
    return None, False


def _chat(
    req: pb.GenerateRequest, tokenizer: Tokenizer, support: ChatSupport | None, limits: RequestLimits, errors
) -> tuple[list[int], ChatPlan | None, dict | None]:
    """Render the conversation: (prompt ids, plan, schema the reply must follow when a tool call is forced)."""
    if support is None or support.template is None:
        errors.append(
            "chat: the served model has no chat template (chat_template.jinja); send prompt instead"
        )
        return [], None, None
    chat, fmt = req.chat, support.format
    messages = _chat_messages(chat, limits, errors)
    tools, schemas = _chat_tools(chat, limits, errors)
    kwargs = MessageToDict(chat.template_kwargs) if chat.HasField("template_kwargs") else {}
    clash = sorted(
        TEMPLATE_BOUND.intersection(kwargs) | set(support.template.special_tokens).intersection(kwargs)
    )
    if clash:
        errors.append(f"chat.template_kwargs may not set {clash}: the server binds them")
    forced, choose = _forced(chat, schemas, errors)
    if errors:
        return [], None, None
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    control = control_pattern([tokenizer.hf.id_to_token(i) for i in sorted(tokenizer.special_ids) if i >= 0])
    messages, tools, kwargs = (mark_control_tokens(v, control) for v in (messages, tools, kwargs))
    try:
        text = support.template.render(
            messages, tools=tools or None, add_generation_prompt=add_prompt, **kwargs
        )
    except ChatError as e:
        errors.append(f"chat: {e}")
        return [], None, None
    schema = None
    if forced is not None:
        text += fmt.call_prefix(forced)
        schema = schemas.get(forced, {})
    elif choose:
        text += fmt.call_prefix(None)
        schema = {"enum": list(schemas)}
    ends = {tokenizer.hf.token_to_id(m) for m in fmt.stop_markers()} - {None}
    markers = fmt.text_markers()
    plan = ChatPlan(
        format=fmt,
        stop_ids=frozenset(ends),
        marker_ids=frozenset(i for i in map(tokenizer.hf.token_to_id, markers) if i is not None),
        parse_tools=chat.tool_choice != pb.TOOL_CHOICE_NONE,
        forced_tool=forced,
        choose_tool=choose,
    )
    return encode_marked(tokenizer.hf, text, control), plan, schema
