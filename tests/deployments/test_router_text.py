"""TextAssembler (tokens -> streamed text deltas, stop strings) and the Tokenizer wrapper it relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.router import TextAssembler
from model.tokenizer import Tokenizer, TokenizerError
from tests.tiny import served_checkpoint


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(served_checkpoint(tmp_path_factory.mktemp("ckpt")))


def test_deltas_concatenate_to_the_full_text_even_when_a_character_is_split(tok):
    text = "héllo wörld ✓ done"
    ids = tok.encode(text)
    raw = b"".join(tok.token_bytes(i) for i in ids)
    assert raw == text.encode()  # byte-level pieces spell the text exactly
    asm = TextAssembler(tok, [])
    deltas = [asm.add([i], final=(k == len(ids) - 1)) for k, i in enumerate(ids)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # a split character is held back, never sent broken


def test_stop_string_truncates_text_and_tokens(tok):
    ids = tok.encode("alpha beta gamma delta")
    asm = TextAssembler(tok, ["gamma"])
    out = asm.add(ids)
    assert asm.stopped and out == "alpha beta "
    assert tok.decode(asm.tokens) == "alpha beta "
    assert asm.add(tok.encode(" more"), final=True) == "" and asm.sent == "alpha beta "


def test_stop_inside_a_token_keeps_the_text_before_it(tok):
    ids = tok.encode("x\n    return y")
    asm = TextAssembler(tok, [" "])  # the stop string starts inside a multi-character token
    assert asm.add(ids) == "x\n"
    asm.add([], final=True)  # the final flush must not re-derive the text from whole tokens only
    assert asm.sent == "x\n"
    assert len(tok.decode(asm.tokens)) <= len("x\n")


def test_special_tokens_have_no_bytes_and_decode_to_nothing(tok):
    assert {tok.pad_id, tok.eos_id, tok.bos_id} <= tok.special_ids
    assert tok.token_bytes(tok.eos_id) == b""
    assert tok.decode([tok.bos_id, *tok.encode("x"), tok.eos_id]) == "x"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
