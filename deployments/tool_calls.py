"""Tool calls in a model's reply: the two call syntaxes, read whole or while the reply is still growing.

Syntaxes (`ChatFormat.tool_syntax`, deployments/chat.py):

- `json` (the shipped tiny model's template): `<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>`.
- `gemma4` (Gemma 4 and DiffusionGemma checkpoints): `<|tool_call>call:f{a:1,city:<|"|>Paris<|"|>}<tool_call|>`:
  keys are bare, strings are delimited by the `<|"|>` token (no escapes inside), values are numbers, `true` /
  `false`, `null`, nested `{...}` objects and `[...]` arrays, and several calls follow one another with no
  separator.

Either way a call's arguments reach clients as JSON text (OpenAI's `function.arguments`), serialised like
`json.dumps` does. Streaming needs more than the finished call: while a call is being written, `partial_call`
reads what is there so far into a tree of possibly unfinished values, and `json_prefix` renders the part of its
JSON that can no longer change (an open string up to its last character, never a number or keyword that may
still grow, no closing bracket before the source has it). Each later prefix extends the earlier one, and the
finished call's arguments extend them all, so the fragments a client concatenates add up to the final text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

GEMMA4_STRING = '<|"|>'
NAME = re.compile(r"[\w\-.]+")
_WS = " \t\r\n"


@dataclass
class Node:
    """A value read from possibly unfinished text. `items`: (key, Node) pairs of an object, Nodes of an array."""

    kind: str  # obj | arr | str | lit
    items: list = field(default_factory=list)
    text: str = ""  # str: the characters read so far; lit: the literal's source text
    closed: bool = False

    def value(self) -> Any:
        """The Python value of a finished node."""
        if self.kind == "obj":
            return {k: v.value() for k, v in self.items}
        if self.kind == "arr":
            return [v.value() for v in self.items]
        if self.kind == "str":
            return self.text
        return self._literal()

    def _literal(self) -> Any:
        raw = self.text.strip()
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            if raw.lower() in ("none", "nil"):  # gemma4 writers also spell null these ways
                return None
            return raw  # a bare word: the text itself


def json_prefix(node: Node) -> tuple[str, bool]:
    """(the JSON text of `node` that cannot change any more, whether the node is finished)."""
    if node.kind == "lit":
        return (json.dumps(node.value()), True) if node.closed else ("", False)
    if node.kind == "str":
        body = json.dumps(node.text)[1:-1]
        return ('"' + body + '"', True) if node.closed else ('"' + body, False)
    opening, closing = ("{", "}") if node.kind == "obj" else ("[", "]")
    out = opening
    for i, item in enumerate(node.items):
        key, child = item if node.kind == "obj" else (None, item)
        text, done = json_prefix(child)
        if not text:  # a literal still being written: not even its key is certain to be followed by it
            return out, False
        out += (", " if i else "") + (json.dumps(key) + ": " if key is not None else "") + text
        if not done:
            return out, False
    return (out + closing, True) if node.closed else (out, False)


class _Reader:
    """Reads one value of either syntax from `src`; stops (leaving nodes unclosed) where the text ends."""

    def __init__(self, src: str, syntax: str):
        self.src, self.syntax, self.i = src, syntax, 0

    def _skip(self) -> None:
        while self.i < len(self.src) and self.src[self.i] in _WS:
            self.i += 1

    def at_end(self) -> bool:
        self._skip()
        return self.i >= len(self.src)

    def value(self) -> Node:
        self._skip()
        s, i = self.src, self.i
        if s.startswith("{", i):
            return self._container("obj", "}")
        if s.startswith("[", i):
            return self._container("arr", "]")
        if self.syntax == "gemma4" and s.startswith(GEMMA4_STRING, i):
            return self._gemma_string()
        if self.syntax == "json" and s.startswith('"', i):
            return self._json_string()
        return self._literal()

    def _container(self, kind: str, closing: str) -> Node:
        node = Node(kind)
        self.i += 1
        while not self.at_end():
            if self.src[self.i] == closing:
                self.i += 1
                node.closed = True
                return node
            if self.src[self.i] == ",":
                self.i += 1
                continue
            if kind == "obj":
                key = self._key()
                if key is None:
                    return node
                if self.at_end():
                    return node
                node.items.append((key, self.value()))
            else:
                node.items.append(self.value())
            last = node.items[-1][1] if kind == "obj" else node.items[-1]
            if not last.closed:
                return node
        return node

    def _key(self) -> str | None:
        """An object key and its colon; None when the text ends first."""
        s = self.src
        if self.syntax == "json":
            if not s.startswith('"', self.i):
                raise ValueError(f"expected a key at {self.i}")
            key = self._json_string()
            if not key.closed:
                return None
            name = key.text
        elif s.startswith(GEMMA4_STRING, self.i):
            key = self._gemma_string()
            if not key.closed:
                return None
            name = key.text
        else:
            colon = s.find(":", self.i)
            if colon < 0:
                return None
            name, self.i = s[self.i : colon].strip(), colon
        self._skip()
        if self.i >= len(s):
            return None
        if s[self.i] != ":":
            raise ValueError(f"expected ':' at {self.i}")
        self.i += 1
        return name

    def _json_string(self) -> Node:
        s, node = self.src, Node("str")
        i = self.i + 1
        while i < len(s):
            c = s[i]
            if c == '"':
                node.closed = True
                self.i = i + 1
                return node
            if c == "\\":
                end = i + (6 if s.startswith("u", i + 1) else 2)
                if end > len(s):  # an escape cut by the end of the text
                    break
                node.text += json.loads('"' + s[i:end] + '"')
                i = end
                continue
            node.text += c
            i += 1
        self.i = len(s)
        return node

    def _gemma_string(self) -> Node:
        start = self.i + len(GEMMA4_STRING)
        end = self.src.find(GEMMA4_STRING, start)
        if end < 0:
            text = self.src[start:]
            for n in range(len(GEMMA4_STRING) - 1, 0, -1):  # a delimiter cut by the end of the text
                if text.endswith(GEMMA4_STRING[:n]):
                    text = text[:-n]
                    break
            self.i = len(self.src)
            return Node("str", text=text)
        self.i = end + len(GEMMA4_STRING)
        return Node("str", text=self.src[start:end], closed=True)

    def _literal(self) -> Node:
        s, start = self.src, self.i
        # JSON literals end at whitespace; a gemma4 bare value runs to the next delimiter (it may hold spaces)
        ends = ",}]" + (_WS if self.syntax == "json" else "")
        while self.i < len(s) and s[self.i] not in ends:
            self.i += 1
        if self.i == start:
            raise ValueError(f"expected a value at {start}")
        # a literal the text ends in may still grow ("12" -> "123", "tr" -> "true")
        return Node("lit", text=s[start : self.i], closed=self.i < len(s))


def read_value(src: str, syntax: str) -> Node:
    """The value at the start of `src` (`json` or `gemma4` syntax); raises ValueError on malformed text."""
    return _Reader(src, syntax).value()


@dataclass
class Call:
    """A tool call read from its body (the text between the call markers); `arguments` None: not begun."""

    name: str | None
    arguments: Node | None
    finished: bool = False

    def arguments_json(self) -> str:
        """The finished call's arguments as JSON text (json.dumps of the value)."""
        if self.arguments is None:
            return "{}"
        if self.arguments.kind == "str":  # arguments given as a JSON string holding the object
            return self.arguments.text
        return json.dumps(self.arguments.value())


def read_call(body: str, syntax: str, finished: bool) -> Call | None:
    """A call's name and arguments from its body; None if the body cannot be a call of this syntax."""
    try:
        if syntax == "gemma4":
            return _gemma4_call(body, finished)
        return _json_call(body, finished)
    except (ValueError, json.JSONDecodeError):
        return None


def _gemma4_call(body: str, finished: bool) -> Call | None:
    text = body.lstrip()
    if not text.startswith("call:"):
        return None if finished or not "call:".startswith(text) else Call(None, None)
    brace = text.find("{")
    if brace < 0:
        return None if finished else Call(None, None)
    name = text[len("call:") : brace].strip()
    if not NAME.fullmatch(name):
        return None
    reader = _Reader(text[brace:], "gemma4")
    args = reader.value()
    if finished and (not args.closed or not reader.at_end()):
        return None
    return Call(name, args, finished)


def _json_call(body: str, finished: bool) -> Call | None:
    if finished:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
    if not body.strip():
        return None if finished else Call(None, None)
    root = read_value(body, "json")
    if root.kind != "obj":
        return None
    fields = dict(root.items)
    name = fields.get("name")
    if name is None or name.kind != "str" or not name.closed:
        return Call(None, None)
    args = fields.get("arguments")
    if finished and args is None:
        args = Node("obj", closed=True)
    return Call(name.text, args, finished)


@dataclass
class CallState:
    id: str
    name: str
    sent: str = ""  # argument text sent so far


class ToolCallStream:
    """OpenAI `delta.tool_calls` entries for a growing list of calls: per call, first its index, id, type and
    name (arguments ""), then argument fragments whose concatenation is the finished call's arguments."""

    def __init__(self):
        self.calls: list[CallState] = []

    def update(self, calls: list[Call]) -> list[dict]:
        out = []
        for i, call in enumerate(calls):
            if call.name is None:
                break
            if i == len(self.calls):
                self.calls.append(CallState("call_" + uuid.uuid4().hex[:24], call.name))
                fn = {"name": call.name, "arguments": ""}
                out.append({"index": i, "id": self.calls[i].id, "type": "function", "function": fn})
            state = self.calls[i]
            if call.finished:
                text = call.arguments_json()
            elif call.arguments is None or call.arguments.kind == "str":  # a string holding JSON: sent whole
                text = ""
            else:
                text = json_prefix(call.arguments)[0]
            if len(text) > len(state.sent) and text.startswith(state.sent):
                out.append({"index": i, "function": {"arguments": text[len(state.sent) :]}})
                state.sent = text
        return out
