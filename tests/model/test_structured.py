"""Tests for model/structured/templates.py and model/structured/token_classes.py: layout byte-exactness, canvas
straddling, filler removal, normalisation and allowed-token masks.

`tiny_tokenizer()` (also used by test_json_schema.py) trains a ~600-token byte-level BPE with HF
`tokenizers` and wraps it in the interface of model/tokenizer.py.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.structured.templates import (
    Fixed,
    Layout,
    Slot,
    Template,
    TemplateError,
    TemplateLimits,
    fill,
    layout,
    resolve_choice,
)
from model.structured.token_classes import (
    TokenClass,
    TokenClasses,
    byte_level_token_bytes,
    bytes_to_unicode,
    char_count,
    token_classes_for,
)

_CORPUS = [
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "ok": true, "score": 12.75, "none": null}',
    '[{"id": 1, "city": "Zürich"}, {"id": 22, "city": "東京"}, {"id": 333, "note": "say \\"hi\\"\\n"}]',
    "hello world, hello there. The quick brown fox jumps over the lazy dog 0123456789 42 -7 3.14159",
    "café naïve résumé — “quotes” 中文字符 😀🎉 \t tabs and\nnewlines\r\n C:\\path\\file",
    "def helper(x):\n    return x + 1\n\nprint(helper(41))  # false, true, null, 1000000, 2024-01-01",
]


class TinyTokenizer:
    """The model/tokenizer.py interface over an HF byte-level BPE."""

    def __init__(self, hf):
        self.hf = hf
        self._bytes = byte_level_token_bytes(hf)
        self.vocab_size = len(self._bytes)
        self.pad_id, self.eos_id, self.bos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]


@functools.cache
def tiny_tokenizer() -> TinyTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_CORPUS * 20, trainer)
    return TinyTokenizer(hf)


def random_ids(lay: Layout, rng: random.Random, filler_rate: float = 0.3) -> list[int]:
    """Pins where pinned; elsewhere a uniformly random allowed id, or the filler at `filler_rate`."""
    allowed: dict[int, list[int]] = {}
    ids = []
    for position in range(lay.num_positions):
        pin, cls = int(lay.pin_ids[position]), int(lay.class_ids[position])
        if pin >= 0:
            ids.append(pin)
            continue
        if cls not in allowed:
            allowed[cls] = torch.nonzero(lay.class_masks[cls]).flatten().tolist()
        ids.append(lay.pad_id if rng.random() < filler_rate else rng.choice(allowed[cls]))
    return ids


# --- token bytes and classes ----------------------------------------------------------------------


def test_bytes_to_unicode_is_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


@pytest.mark.parametrize("text", ["hello world", "café 中文 😀", '{"a": "b\\n"}\t\r\n', "\x00\x7f ü"])
def test_byte_level_token_bytes_spell_encoded_text(text):
    tok = tiny_tokenizer()
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert [tok.token_bytes(i) for i in range(4)] == [b""] * 4  # special tokens spell nothing


@given(st.binary(max_size=12), st.binary(max_size=12))
def test_char_count_is_subadditive(a, b):
    assert char_count(a + b) <= char_count(a) + char_count(b)


def test_class_masks_follow_token_bytes():
    tok = tiny_tokenizer()
    classes = TokenClasses(
        [tok.token_bytes(i) for i in range(tok.vocab_size)], tok.pad_id, vocab_size=tok.vocab_size + 5
    )
    string = classes.mask(TokenClass("json_string"))
    digits = classes.mask(TokenClass("digits"))
    free = classes.mask(TokenClass("free"))
    capped = classes.mask(TokenClass("json_string", max_chars=2))
    assert string.shape == (tok.vocab_size + 5,) and not string[tok.vocab_size :].any()
    for token_id in range(tok.vocab_size):
        raw = tok.token_bytes(token_id)
        if token_id == tok.pad_id:
            assert string[token_id] and digits[token_id] and free[token_id] and capped[token_id]
            continue
        safe = bool(raw) and not any(b < 0x20 or b in b'"\\' for b in raw)
        assert bool(string[token_id]) == safe, raw
        assert bool(capped[token_id]) == (safe and char_count(raw) <= 2), raw
        assert bool(digits[token_id]) == (bool(raw) and raw.isdigit()), raw
        assert bool(free[token_id]) == bool(raw), raw
    minus = classes.mask(TokenClass("exact", raw=b"-")).nonzero().flatten().tolist()
    assert minus == sorted({tok.pad_id, *tok.encode("-")})
    assert string.sum() > 300  # the class is not trivially small


def test_token_classes_are_cached_per_tokenizer():
    tok = tiny_tokenizer()
    classes = token_classes_for(tok)
    assert classes is token_classes_for(tok)
    # a cap above every token's length is the uncapped class (one cache entry, not one per maxLength)
    assert classes.mask(TokenClass("json_string", max_chars=10**6)) is classes.mask(TokenClass("json_string"))
    ids = classes.mask(TokenClass("ids", ids=(5, 9)))
    assert ids.nonzero().flatten().tolist() == [tok.pad_id, 5, 9]
    assert token_classes_for(tok, vocab_size=tok.vocab_size + 8).vocab_size == tok.vocab_size + 8


def test_token_classes_at_gemma_vocab_size():  # bench/constrained.py prints build time
    rng = random.Random(0)
    pieces = [bytes([b]) for b in range(256)] + [
        w.encode() for w in (" the", "ing", "é", "中", "😀", "12", '",')
    ]
    vocab = [b""] * 16 + [b"".join(rng.choices(pieces, k=rng.randint(1, 5))) for _ in range(262_144 - 16)]
    classes = TokenClasses(vocab, pad_id=0)
    for key in (TokenClass("free"), TokenClass("json_string", max_chars=3), TokenClass("digits")):
        assert classes.mask(key).shape == (262_144,)
    assert classes.mask(TokenClass("exact", raw=b"-"))[vocab.index(b"-")]


# --- template validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Template(()), "empty template"),
        (lambda: Template((Fixed(""),)), "empty fixed text"),
        (lambda: Template((Slot("a", 0),)), "max_tokens 0"),
        (lambda: Template((Slot("a", 2), Fixed("x"), Slot("a", 3))), "used twice"),
        (lambda: Template((Slot("", 2),)), "non-empty"),
        (lambda: Template((Slot("a", 2, kind="regex"),)), "unknown kind"),
        (lambda: Template((Slot("a", 2, kind="json_minus"),)), "exactly 1"),
        (lambda: Template((Slot("a", 2, kind="choice"),)), "at least one option"),
        (lambda: Template((Slot("a", 2, max_chars=3),)), "max_chars"),
        (lambda: Template(("text",)), "must be Fixed or Slot"),
    ],
)
def test_template_structure_errors(build, message):
    with pytest.raises(TemplateError, match=message):
        build()


def test_layout_limit_errors():
    tok = tiny_tokenizer()
    limits = TemplateLimits(max_slot_tokens=16, max_positions=40)
    with pytest.raises(TemplateError, match="asks for 17 tokens; the limit is 16"):
        layout(Template((Slot("a", 17),)), tok, 8, limits)
    needed = len(tok.encode("hello world, ")) + 3 * 16
    with pytest.raises(TemplateError, match=f"needs {needed} positions .* the limit is 40"):
        layout(
            Template((Fixed("hello world, "), Slot("a", 16), Slot("b", 16), Slot("c", 16))), tok, 8, limits
        )
    with pytest.raises(TemplateError, match="raise max_tokens"):
        layout(Template((Slot("a", 1, kind="choice", options=("false", "true")),)), tok, 8)
    with pytest.raises(TemplateError, match=r"special token ids \[0\]"):
        layout(Template((Fixed("before <pad> after"),)), tok, 8)  # the text would become a special token


def test_layout_refuses_lone_surrogates():
    with pytest.raises(TemplateError, match="lone surrogates"):
        layout(Template((Fixed("a\ud800"),)), tiny_tokenizer(), 8)


def test_layout_refuses_a_tokenizer_that_does_not_keep_bytes():
    class AddsBos(TinyTokenizer):
        def encode(self, text):
            return [self.bos_id, *super().encode(text)]

    class Lowercases(TinyTokenizer):
        def encode(self, text):
            return super().encode(text.lower())

    hf = tiny_tokenizer().hf
    with pytest.raises(TemplateError, match="special token"):
        layout(Template((Fixed("x"),)), AddsBos(hf), 8)
    with pytest.raises(TemplateError, match="round-trip"):
        layout(Template((Fixed("Hello"),)), Lowercases(hf), 8)


def test_mask_table_and_model_vocab_padding():
    tok = tiny_tokenizer()
    classes = token_classes_for(tok, vocab_size=tok.vocab_size + 8)
    lay = layout(_straddling_template(), tok, 8, classes=classes)
    table = lay.mask_table()
    assert table.shape == (len(lay.class_masks), tok.vocab_size + 8)
    assert table[0].all() and not table[1:, tok.vocab_size :].any()
    for cls in range(1, len(lay.class_masks)):
        assert torch.equal(table[cls], lay.class_masks[cls])
    allowed = table[lay.canvas(1)[1]]  # [L, V] per-position allowed sets of one canvas
    assert allowed.shape == (8, tok.vocab_size + 8)


# --- layout --------------------------------------------------------------------------------------


def _straddling_template() -> Template:
    return Template(
        (
            Fixed("hel"),
            Slot("first", 10),
            Fixed("lo wor"),
            Fixed("ld café"),
            Slot("second", 3, kind="json_string_body", max_chars=5),
            Fixed("中文 end"),
            Slot("third", 2, kind="json_int_digits"),
        )
    )


def test_layout_pins_each_fixed_part_byte_exact_across_canvases():
    tok = tiny_tokenizer()
    # precondition: tokenizing the parts together would merge across the part boundaries
    assert tok.encode("hel") + tok.encode("lo wor") != tok.encode("hello wor")
    assert tok.encode("lo wor") + tok.encode("ld café") != tok.encode("lo world café")
    template = _straddling_template()
    lay = layout(template, tok, canvas_length=8)
    assert lay.num_positions % 8 == 0 and lay.num_positions >= lay.num_content_positions
    assert lay.num_positions - lay.num_content_positions < 8
    assert torch.equal(torch.cat([lay.canvas(i)[0] for i in range(lay.num_canvases)]), lay.pin_ids)
    assert torch.equal(torch.cat([lay.canvas(i)[1] for i in range(lay.num_canvases)]), lay.class_ids)
    assert (lay.pin_ids[lay.num_content_positions :] == tok.pad_id).all()
    # fixed runs between slot spans spell their text byte-exactly
    spans = sorted(lay.slot_spans.values())
    assert spans[0][0] == len(tok.encode("hel"))
    assert any(start // 8 != (end - 1) // 8 for start, end in spans)  # some slot straddles a boundary
    fixed_ids = lay.pin_ids[spans[0][1] : spans[1][0]].tolist()
    assert b"".join(tok.token_bytes(i) for i in fixed_ids) == "lo world café".encode()
    assert tok.decode(fixed_ids) == "lo world café"
    for start, end in spans:
        assert (lay.pin_ids[start:end] == -1).all() and (lay.class_ids[start:end] > 0).all()
    pinned = lay.pin_ids >= 0
    assert (lay.class_ids[pinned] == 0).all()
    assert lay.class_masks[0] is None
    assert all(mask[tok.pad_id] for mask in lay.class_masks[1:])  # the filler is always allowed
    with pytest.raises(IndexError):
        lay.canvas(lay.num_canvases)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), canvas_length=st.sampled_from([1, 3, 8, 16]))
def test_fill_returns_fixed_text_byte_exact_and_slot_contents(seed, canvas_length):
    tok = tiny_tokenizer()
    lay = layout(_straddling_template(), tok, canvas_length)
    ids = random_ids(lay, random.Random(seed))
    filled = fill(lay, ids, tok)
    slots = filled.slots
    expected = (
        "hel"
        + slots["first"].text
        + "lo world café"
        + slots["second"].text
        + "中文 end"
        + slots["third"].text
    )
    assert filled.text == expected
    for name, (start, end) in lay.slot_spans.items():
        assert slots[name].token_ids == [t for t in ids[start:end] if t != tok.pad_id]
    raw_first = b"".join(tok.token_bytes(t) for t in slots["first"].token_ids)
    assert slots["first"].text == raw_first.decode("utf-8", errors="replace")
    assert len(slots["second"].text) <= 5 and not any(c in slots["second"].text for c in '"\\\n')
    assert slots["third"].text.isdigit() and (slots["third"].text == "0" or slots["third"].text[0] != "0")


def test_fill_accepts_tensor_and_content_only_ids():
    tok = tiny_tokenizer()
    lay = layout(Template((Fixed("a b"), Slot("x", 2), Fixed("c"))), tok, 8)
    ids = random_ids(lay, random.Random(3), filler_rate=0.0)
    from_tensor = fill(lay, torch.tensor(ids), tok)
    from_content = fill(lay, ids[: lay.num_content_positions], tok)
    assert from_tensor == from_content and from_tensor.text.startswith("a b")


def test_fill_refuses_ids_that_break_pins_or_allowed_sets():
    tok = tiny_tokenizer()
    lay = layout(Template((Fixed("n="), Slot("n", 2, kind="json_int_digits"))), tok, 8)
    ids = random_ids(lay, random.Random(0))
    start, _ = lay.slot_spans["n"]
    broken = list(ids)
    broken[0] = tok.encode("x")[0]
    with pytest.raises(ValueError, match="pinned"):
        fill(lay, broken, tok)
    broken = list(ids)
    broken[start] = tok.encode("a")[0]
    with pytest.raises(ValueError, match="outside its allowed set"):
        fill(lay, broken, tok)
    with pytest.raises(ValueError, match="content positions"):
        fill(lay, ids[: lay.num_content_positions - 1], tok)


def _fill_slot(slot: Slot, texts: list[str]) -> str:
    """Fill a one-slot template with the given token texts (one token each), rest filler."""
    tok = tiny_tokenizer()
    lay = layout(Template((slot,)), tok, 4)
    ids = [tok.pad_id] * lay.num_positions
    for position, text in enumerate(texts):
        (token,) = tok.encode(text)
        ids[position] = token
    return fill(lay, ids, tok).slots[slot.name].text


@pytest.mark.parametrize(
    ("kind", "texts", "expected"),
    [
        ("json_int_digits", [], "0"),
        ("json_int_digits", ["0", "0", "7"], "7"),
        ("json_int_digits", ["0", "0"], "0"),
        ("json_int_digits", ["4", "0"], "40"),
        ("json_frac_digits", [], "0"),
        ("json_frac_digits", ["0", "5"], "05"),
        ("free", ["a", "\n"], "a\n"),
    ],
)
def test_digit_normalisation(kind, texts, expected):
    assert _fill_slot(Slot("s", 3, kind=kind), texts) == expected


def test_minus_slot_is_a_sign_or_nothing():
    assert _fill_slot(Slot("s", 1, kind="json_minus"), ["-"]) == "-"
    assert _fill_slot(Slot("s", 1, kind="json_minus"), []) == ""


def test_partial_utf8_in_a_string_slot_becomes_replacement_chars():
    tok = tiny_tokenizer()
    lay = layout(Template((Fixed('"'), Slot("s", 3, kind="json_string_body"), Fixed('"'))), tok, 4)
    start, _ = lay.slot_spans["s"]
    first_byte_of_e_acute = bytes_to_unicode()[0xC3]
    ids = lay.pin_ids.tolist()
    ids[start : start + 3] = [tok.hf.token_to_id(first_byte_of_e_acute), tok.pad_id, tok.encode("a")[0]]
    assert fill(lay, ids, tok).text == '"\ufffda"'


def test_choice_resolution_rule():
    options = [[5, 6], [5, 7, 8], [9]]
    assert resolve_choice(options, [5, 7, 8]) == 1  # exact spelling
    assert resolve_choice(options, [5, 7]) == 1  # longest common prefix
    assert resolve_choice(options, [5]) == 0  # tie on prefix -> earliest
    assert resolve_choice(options, []) == 0  # nothing generated -> first option
    assert resolve_choice(options, [9, 6]) == 2


def test_choice_slot_returns_an_option_for_any_tokens():
    tok = tiny_tokenizer()
    options = ("true", "false", "null")
    lay = layout(Template((Fixed("v: "), Slot("v", 6, kind="choice", options=options))), tok, 4)
    rng = random.Random(7)
    seen = {fill(lay, random_ids(lay, rng), tok).slots["v"].text for _ in range(200)}
    assert seen <= set(options) and len(seen) >= 2
    start, end = lay.slot_spans["v"]
    for option in options:  # spelling an option exactly (filler after it) selects it
        spelled = tok.encode(option)
        ids = lay.pin_ids.tolist()
        ids[start:end] = spelled + [tok.pad_id] * (end - start - len(spelled))
        assert fill(lay, ids, tok).slots["v"].text == option
