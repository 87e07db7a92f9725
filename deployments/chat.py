"""Chat: render a checkpoint's own chat template exactly as transformers' `apply_chat_template` does, and split a
model reply into reasoning, content and tool calls.

Rendering: the template comes from the checkpoint (`chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`) and runs in jinja2's `ImmutableSandboxedEnvironment` with the settings and globals transformers
gives it (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now`, a `tojson`
filter that does not HTML-escape, a restricted `dict` and `namespace`), and the same variables: `messages`, `tools`,
`documents`, `add_generation_prompt`, the special-token names from `tokenizer_config.json` (`bos_token`, ...) and
any extra template kwargs (`enable_thinking`). Messages are normalised as transformers does (keys whose value is
None dropped; `reasoning_content` / `thinking` / `reasoning` aliased), so the rendered text is identical
(tests/deployments/test_chat.py holds the two together).

Encoding: control tokens inside client-supplied strings are wrapped before rendering and encoded as plain text
afterwards (`mark_control_tokens`, `encode_marked`), so a message cannot forge a turn; the ids equal transformers'
`apply_chat_template(..., sanitize_control_tokens=True)`.

Parsing: the markers a reply uses (thought block, tool-call block, end of turn) and the syntax of a call are
model-specific, like vLLM's named reasoning and tool-call parsers; `ChatFormat` names them. Two are known
(`FORMATS`), and `choose_format` picks one from the checkpoint's template unless the config names it:

- `gemma4`, Gemma 4 / DiffusionGemma checkpoints: turns end with `<turn|>`; thinking (switched on by the template's
  `enable_thinking`, which puts `<|think|>` in the system turn) comes as `<|channel>thought\n...<channel|>` before
  the answer; a call is `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1}<tool_call|>` (deployments/tool_calls.py),
  after which the model writes `<|tool_response>` and waits for the result, so that token also ends the reply.
- `json`, the shipped tiny model's template: `<think>...</think>`, `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, `<end_of_turn>`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from deployments import observability as obs
from deployments.tool_calls import GEMMA4_STRING, Call, read_call

SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatError(ValueError):
    """A conversation the template refuses (its `raise_exception`), or a template that does not render."""


@dataclass(frozen=True)
class ChatFormat:
    """The markers a model's replies use. Defaults: the shipped tiny model's template (model/assets)."""

    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"
    tool_call_start: str = "<tool_call>"
    tool_call_end: str = "</tool_call>"
    end_of_turn: str = "<end_of_turn>"
    tool_syntax: str = "json"  # json | gemma4: how a call's name and arguments are written (tool_calls.py)
    reasoning_label: str = ""  # text the model writes right after reasoning_start, not part of the reasoning
    also_ends: tuple[str, ...] = ()  # further tokens that end the reply
    kept_tokens: tuple[str, ...] = ()  # special tokens that are part of a call's text (kept when decoding)

    def call_prefix(self, name: str | None) -> str:
        """The text of a tool call up to its arguments (up to its name when `name` is None). A forced call's
        arguments (and a chosen name) are then generated as JSON under a schema, so they are valid whatever
        syntax the model would otherwise write."""
        if self.tool_syntax == "gemma4":
            return self.tool_call_start + "call:" + ("" if name is None else name)
        head = self.tool_call_start + '{"name": '
        return head if name is None else head + json.dumps(name) + ', "arguments": '

    def stop_markers(self) -> tuple[str, ...]:
        return (self.end_of_turn, *self.also_ends)

    def text_markers(self) -> tuple[str, ...]:
        """Markers the reply parser reads: kept as text when they are special tokens."""
        ends = (self.reasoning_start, self.reasoning_end, self.tool_call_start, self.tool_call_end)
        return (*ends, *self.kept_tokens)


GEMMA4_FORMAT = ChatFormat(
    reasoning_start="<|channel>",
    reasoning_end="<channel|>",
    reasoning_label="thought\n",
    tool_call_start="<|tool_call>",
    tool_call_end="<tool_call|>",
    end_of_turn="<turn|>",
    tool_syntax="gemma4",
    also_ends=("<|tool_response>",),
    kept_tokens=(GEMMA4_STRING,),
)
FORMATS = {"json": ChatFormat(), "gemma4": GEMMA4_FORMAT}
# a template that writes these control tokens is Gemma 4's (its turn and tool-call markers)
GEMMA4_SIGNS = ("<|turn>", "<|tool_call>", "<|channel>")


@dataclass(frozen=True)
class ChatChoice:
    """What the config says about reply markers: a format by name (`auto`: from the template) and overrides."""

    parser: str = "auto"
    overrides: tuple[tuple[str, str], ...] = ()


def choose_format(choice: ChatChoice | ChatFormat, template_source: str | None) -> ChatFormat:
    """The format replies are parsed with: `choice` itself when it is one, else the named format (`auto`:
    gemma4 when the template writes Gemma 4's control tokens, else json) with the overrides applied."""
    if isinstance(choice, ChatFormat):
        return choice
    name = choice.parser
    if name == "auto":
        name = "gemma4" if template_source and any(t in template_source for t in GEMMA4_SIGNS) else "json"
    base = FORMATS[name]
    return ChatFormat(**{**base.__dict__, **dict(choice.overrides)})


# -- rendering -----------------------------------------------------------------------------------------------
def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` for templates, without the class object itself (no attribute access to type internals)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore-prefixed attributes (no reach into Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"templates cannot set the attribute {name!r} on a namespace"
            )


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Only JSON-shaped data reaches the sandbox (no objects with methods it does not know to be unsafe)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float):
        return type(value).__mro__[-2](value)  # str / int / float subclasses back to the base type
    return f"<{type(value).__name__}>"


def _normalise(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """A checkpoint's chat template plus the special-token names it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatError(f"the chat template does not parse: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """`chat_template.jinja` (else `tokenizer_config.json`'s `chat_template`); None if the checkpoint has none."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        source = None
        if (path / "chat_template.jinja").exists():
            source = (path / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        if source is None:
            return None
        special = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            if isinstance(value, dict):  # AddedToken form
                value = value.get("content")
            if isinstance(value, str):
                special[key] = value
        return cls(source, special)

    def render(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> str:
        if not messages:
            raise ChatError("messages is empty: send at least one message")
        variables = _plain({**self.special_tokens, **kwargs})
        try:
            return _compile(self.source).render(
                messages=_normalise(messages),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"the chat template refused the conversation: {e}") from None


# -- user text stays text ------------------------------------------------------------------------------------
# Private-use code points wrap the control tokens found in what the client sent, so that after rendering they are
# encoded as plain text while the template's own markers stay control tokens: a user cannot forge a turn
# (transformers offers the same as `apply_chat_template(..., sanitize_control_tokens=True)`; here it is always on).
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"


def control_pattern(tokens: list[str]) -> re.Pattern:
    """Matches any of `tokens` (longest first, so a token wins over the tokens inside it)."""
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")


def mark_control_tokens(value: Any, pattern: re.Pattern) -> Any:
    """`value` (messages, tools, kwargs) with every control token in its strings wrapped in the markers."""
    if isinstance(value, str):
        value = value.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")  # no forged markers
        return pattern.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, value)
    if isinstance(value, dict):
        return {k: mark_control_tokens(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mark_control_tokens(v, pattern) for v in value]
    return value


def encode_marked(hf_tokenizer, text: str, pattern: re.Pattern) -> list[int]:
    """Encode a rendered chat: wrapped control tokens as text, everything else normally. A lone marker (a template
    string operation split a pair) is dropped, but still separates the text on either side. A sampled request
    gets a `router.tokenize` span for it, as for a prompt."""
    with obs.span("router.tokenize", **{"blockserve.chars": len(text)}) as span:
        ids = _encode_marked(hf_tokenizer, text, pattern)
        if span is not None:
            span.set_attribute("blockserve.tokens", len(ids))
        return ids


def _encode_marked(hf_tokenizer, text: str, pattern: re.Pattern) -> list[int]:
    pieces = re.split(f"{MARK_OPEN}({pattern.pattern}){MARK_CLOSE}|[{MARK_OPEN}{MARK_CLOSE}]", text)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        as_text = i % 2 == 1  # split() puts the captured (wrapped) token at odd positions
        hf_tokenizer.encode_special_tokens = as_text
        try:
            ids += hf_tokenizer.encode(piece, add_special_tokens=False).ids
        finally:
            hf_tokenizer.encode_special_tokens = False
    return ids


# -- parsing -------------------------------------------------------------------------------------------------
@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could be the start of a marker (kept back while streaming)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


def parse_reply(text: str, fmt: ChatFormat, final: bool = True, tools: bool = True) -> Reply:
    """Split a reply into reasoning, content and tool calls. With `final=False` (streaming), an unterminated thought
    block counts as reasoning so far, an unterminated tool call is withheld, and a tail that may be the start of a
    marker is held back."""
    reply = Reply()
    start, end = fmt.reasoning_start, fmt.reasoning_end
    if text.lstrip().startswith(start) or (start in text and end in text.split(start, 1)[1]):
        before, rest = text.split(start, 1)
        thought, sep, after = rest.partition(end)
        if not sep and not final:
            thought = thought[: len(thought) - _held_back(thought, (end,))]
            reply.reasoning = _unlabelled(thought, fmt.reasoning_label, final=False)
            return reply
        reply.reasoning = _unlabelled(thought, fmt.reasoning_label)
        text = before + after
    elif end in text and start not in text:  # the template opened the thought block in the prompt
        thought, _, text = text.partition(end)
        reply.reasoning = _unlabelled(thought, fmt.reasoning_label)
    if not final:
        text = text[: len(text) - _held_back(text, (start, fmt.tool_call_start) if tools else (start,))]
    if not tools:  # tool_choice none: calls the model wrote anyway stay in the content
        reply.content = text
        return reply
    pattern = re.compile(re.escape(fmt.tool_call_start) + r"(.*?)" + re.escape(fmt.tool_call_end), re.S)
    kept = []
    last = 0
    for m in pattern.finditer(text):
        call = read_call(m.group(1), fmt.tool_syntax, finished=True)
        if call is None:
            continue  # not a well-formed call: leave it in the content
        kept.append(text[last : m.start()])
        reply.tool_calls.append(ToolCall(name=call.name, arguments=call.arguments_json()))
        last = m.end()
    kept.append(text[last:])
    content = "".join(kept)
    if not final and fmt.tool_call_start in content:  # a call still being written
        content = content.split(fmt.tool_call_start, 1)[0]
    reply.content = content
    return reply


def _unlabelled(thought: str, label: str, final: bool = True) -> str:
    """The reasoning without the label the model writes first (Gemma 4: "thought\n"); while streaming, a
    reasoning that may still become the label is held back."""
    if label and thought.startswith(label):
        return thought[len(label) :]
    if label and not final and label.startswith(thought):
        return ""
    return thought


def calls_so_far(text: str, fmt: ChatFormat) -> list[Call]:
    """The tool calls of a reply still being written: the finished ones (as `parse_reply` reads them) and the
    one being written at the end, read as far as it goes (deployments/tool_calls.py)."""
    start, end = fmt.tool_call_start, fmt.tool_call_end
    if fmt.reasoning_end in text:  # calls come after the thought block
        text = text.rsplit(fmt.reasoning_end, 1)[1]
    elif text.lstrip().startswith(fmt.reasoning_start):
        return []  # still thinking
    calls = []
    pieces = text.split(start)[1:]
    for i, piece in enumerate(pieces):
        body, closed, _ = piece.partition(end)
        if not closed and i < len(pieces) - 1:
            continue  # never closed, and not the one being written
        if not closed:
            body = body[: len(body) - _held_back(body, (end,))]
        call = read_call(body, fmt.tool_syntax, finished=bool(closed))
        if call is not None:
            calls.append(call)
    return calls


class ReplyStream:
    """Incremental `parse_reply`: feed the reply text so far, get the reasoning and content not yet sent."""

    def __init__(self, fmt: ChatFormat, tools: bool = True):
        self.fmt, self.tools = fmt, tools
        self.sent = Reply()

    def update(self, text: str, final: bool = False) -> tuple[str, str]:
        now = parse_reply(text, self.fmt, final=final, tools=self.tools)
        deltas = []
        for name in ("reasoning", "content"):
            old, new = getattr(self.sent, name), getattr(now, name)
            if new.startswith(old) and len(new) > len(old):
                deltas.append(new[len(old) :])
                setattr(self.sent, name, new)
            else:
                deltas.append("")
        return deltas[0], deltas[1]
