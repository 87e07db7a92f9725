"""Give the tiny default checkpoint a chat template of the published model's shape, without retraining it.

The published DiffusionGemma checkpoint marks chat turns with special tokens and ships its template as
`chat_template.jinja`. The tiny model's byte-level BPE has no spare ids (vocab 4,096 = the embedding rows), so two
ids are repurposed: the single-byte tokens of the control bytes 0x01 and 0x02, which never occur in the Python
corpus it was trained on (no merge uses them) and never in text a chat user types. After this step those two bytes
encode as `<unk>`; every other text tokenizes exactly as before.

    python -m model.training.chat_tokens [DIR]    # idempotent; `make tiny-model` runs it after training

Writes into DIR: `tokenizer.json` (the two turn markers as special tokens), `chat_template.jinja` and
`tokenizer_config.json` (special-token names, as transformers saves them), so `AutoTokenizer.from_pretrained(DIR)
.apply_chat_template(...)` and blockserve render the same prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# byte -> the GPT-2 byte-level character that spells it (non-printable bytes map to U+0100 + their rank)
REPURPOSED = {START_OF_TURN: (0x01, "\u0101"), END_OF_TURN: (0x02, "\u0102")}

# Gemma-style turns: `<start_of_turn>{role}\n...<end_of_turn>\n`, the assistant's role written `model`; a system
# turn carries the system message and the tool definitions; thinking is on when the caller passes
# enable_thinking=True, otherwise the generation prompt closes an empty thought block so the model answers at once.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = messages[0].content -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- if system or tools -%}
  {{- '<start_of_turn>system\\n' + system -}}
  {%- if tools -%}
    {%- if system -%}{{- '\\n\\n' -}}{%- endif -%}
    {{- 'You can call these functions. To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.\\n' -}}
    {%- for tool in tools -%}
      {{- (tool.function if tool.function is defined else tool) | tojson -}}{{- '\\n' -}}
    {%- endfor -%}
  {%- endif -%}
  {{- '<end_of_turn>\\n' -}}
{%- endif -%}
{%- for message in turns -%}
  {%- set role = 'model' if message.role == 'assistant' else message.role -%}
  {%- if role not in ['user', 'model', 'tool'] -%}
    {{- raise_exception('Roles must be user, assistant or tool (system only first), got ' + message.role) -}}
  {%- endif -%}
  {{- '<start_of_turn>' + role + '\\n' -}}
  {%- if message.content is string -%}
    {{- message.content -}}
  {%- elif message.content is defined and message.content is not none -%}
    {%- for part in message.content -%}
      {%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {%- for call in message.tool_calls | default([]) -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {{- '<tool_call>{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
    {%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
    {{- '}</tool_call>' -}}
  {%- endfor -%}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\\n' -}}
  {%- if not enable_thinking | default(false) -%}{{- '<think></think>' -}}{%- endif -%}
{%- endif -%}
"""


def add_turn_tokens(tokenizer_json: dict) -> dict:
    """Repurpose the ids of bytes 0x01 / 0x02 as the special tokens `<start_of_turn>` / `<end_of_turn>`."""
    vocab = tokenizer_json["model"]["vocab"]
    merges = tokenizer_json["model"]["merges"]
    added = tokenizer_json["added_tokens"]
    for token, (_, piece) in REPURPOSED.items():
        if token in vocab:
            continue  # already applied
        if any(piece in "".join(m if isinstance(m, list) else [m]) for m in merges):
            raise ValueError(f"a merge uses the byte token {piece!r}; it cannot be repurposed")
        token_id = vocab.pop(piece)
        vocab[token] = token_id
        added.append(
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    added.sort(key=lambda t: t["id"])
    return tokenizer_json


def tokenizer_config() -> dict:
    """What transformers reads beside tokenizer.json: special-token names (the template's `bos_token` etc.)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_special_tokens": [START_OF_TURN, END_OF_TURN],
        "model_max_length": 131072,
    }


def write_chat_files(out: Path) -> None:
    path = out / "tokenizer.json"
    data = add_turn_tokens(json.loads(path.read_text()))
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write_chat_files(Path(sys.argv[1]))
    else:
        from model.training.train_tiny import DEFAULT_OUT

        write_chat_files(DEFAULT_OUT)
