"""Allowed-token masks ("token classes") computed from a tokenizer's vocabulary bytes.

Structured generation (infill, schema-guaranteed JSON; see `model/structured/templates.py` and
docs/STRUCTURED.md) constrains each canvas position to a set of vocabulary ids. Every set is
derived from what each token *spells* — its raw bytes — so the guarantees hold for any vocabulary
(byte-level BPE, SentencePiece with byte fallback, ...) as long as the tokenizer reports
`token_bytes(id)` truthfully (b"" for special tokens).

Classes (all of them also allow the pad id, the slot filler):
- `free`: every token that spells at least one byte (no special tokens).
- `json_string` (optionally `max_chars=k`): tokens whose bytes contain no `"`, no `\\` and no
  byte < 0x20. Any concatenation of such tokens, decoded as UTF-8 with U+FFFD replacement, is a
  valid JSON string body. `max_chars=k` further keeps tokens that decode (alone) to <= k code
  points; the count is subadditive under concatenation (see `char_counts`), which bounds a
  slot's length for `maxLength`.
- `digits`: tokens spelling only ASCII digits.
- `exact`: tokens whose bytes equal a given byte string (e.g. b"-").
- `ids`: an explicit id set (positions of a `choice` slot).

The per-token features are computed in one vectorised pass (< 2 s at a 262,144 vocabulary);
masks are built on demand from them and cached. The byte-level alphabet (`bytes_to_unicode`)
follows the public GPT-2 convention that HF `tokenizers`' ByteLevel pre-tokenizer uses.

Shape legend: V vocabulary size, N total bytes of all tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_CLASS_KINDS = ("free", "json_string", "digits", "exact", "ids")


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-char table of byte-level BPE (GPT-2 convention).

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...)
    map to U+0100 upwards in byte order, so every byte has a visible, distinct character.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def byte_level_token_bytes(tokenizer: Any) -> list[bytes]:
    """Raw bytes of every id of an HF `tokenizers.Tokenizer` with a ByteLevel pre-tokenizer.

    Special added tokens spell b""; non-special added tokens spell their UTF-8 content; every
    other vocabulary string is mapped back through the inverse of `bytes_to_unicode`.
    """
    inverse = {ch: b for b, ch in bytes_to_unicode().items()}
    added = tokenizer.get_added_tokens_decoder()
    out: list[bytes] = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        if token_id in added:
            tok = added[token_id]
            out.append(b"" if tok.special else tok.content.encode("utf-8"))
            continue
        piece = tokenizer.id_to_token(token_id)
        if piece is None:  # a hole in the id space spells nothing
            out.append(b"")
            continue
        try:
            out.append(bytes(inverse[ch] for ch in piece))
        except KeyError as exc:
            raise ValueError(
                f"token {token_id} ({piece!r}) is not in the byte-level alphabet; "
                "byte_level_token_bytes only fits tokenizers with a ByteLevel pre-tokenizer"
            ) from exc
    return out


def char_count(raw: bytes) -> int:
    """Code points of `raw` decoded as UTF-8 with U+FFFD replacement (Python's decoder).

    Subadditive: char_count(a + b) <= char_count(a) + char_count(b). Python's decoder consumes
    one maximal unit per output char and only looks forward, so units starting inside `a` are the
    same as for `a` alone; a unit crossing the boundary only swallows leading continuation bytes
    of `b`, each of which `b` alone would have turned into its own U+FFFD.
    """
    return len(raw.decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class TokenClass:
    """Key of one allowed-token set. `max_chars` only for json_string, `raw` only for exact,
    `ids` only for ids."""

    kind: str
    max_chars: int | None = None
    raw: bytes = b""
    ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _CLASS_KINDS:
            raise ValueError(f"unknown token class kind {self.kind!r}; use one of {_CLASS_KINDS}")
        if self.max_chars is not None and (self.kind != "json_string" or self.max_chars < 0):
            raise ValueError("max_chars is a non-negative bound and only applies to kind 'json_string'")


@dataclass(frozen=True)
class _Features:
    special: torch.Tensor  # [V] bool: spells no bytes
    string_safe: torch.Tensor  # [V] bool: no '"', '\\' or control byte
    digits: torch.Tensor  # [V] bool: only ASCII digits
    chars: torch.Tensor  # [V] int64: code points when decoded alone
    lengths: torch.Tensor  # [V] int64: bytes


def _features(token_bytes: Sequence[bytes]) -> _Features:
    vocab = len(token_bytes)
    lengths = torch.tensor([len(b) for b in token_bytes], dtype=torch.int64)  # [V]
    flat_raw = b"".join(token_bytes)
    if not flat_raw:
        zero = torch.zeros(vocab, dtype=torch.int64)
        return _Features(lengths == 0, lengths > 0, lengths > 0, zero, lengths)
    flat = torch.frombuffer(bytearray(flat_raw), dtype=torch.uint8).to(torch.int64)  # [N]
    owner = torch.repeat_interleave(torch.arange(vocab), lengths)  # [N]

    def per_token(flags: torch.Tensor) -> torch.Tensor:  # [N] bool -> [V] count
        return torch.zeros(vocab, dtype=torch.int64).index_add_(0, owner, flags.to(torch.int64))

    bad = per_token((flat < 0x20) | (flat == ord('"')) | (flat == ord("\\")))
    digit = per_token((flat >= ord("0")) & (flat <= ord("9")))
    high = per_token(flat >= 0x80)
    chars = lengths.clone()  # ASCII-only tokens: one char per byte
    multi = torch.nonzero(high, as_tuple=True)[0]  # only these need the real decoder
    if len(multi):
        counts = [char_count(token_bytes[i]) for i in multi.tolist()]
        chars[multi] = torch.tensor(counts, dtype=torch.int64)
    special = lengths == 0
    return _Features(special, (bad == 0) & ~special, (digit == lengths) & ~special, chars, lengths)


class TokenClasses:
    """Boolean masks [V] per `TokenClass` for one vocabulary, built lazily and cached.

    `vocab_size` may exceed len(token_bytes) (a model's padded embedding table): the extra ids
    are never allowed.
    """

    def __init__(self, token_bytes: Sequence[bytes], pad_id: int, vocab_size: int | None = None):
        size = len(token_bytes) if vocab_size is None else vocab_size
        if size < len(token_bytes):
            raise ValueError(f"vocab_size {size} is smaller than the {len(token_bytes)} tokens given")
        if not 0 <= pad_id < len(token_bytes):
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary of {len(token_bytes)} tokens")
        self.vocab_size = size
        self.pad_id = pad_id
        self._bytes = list(token_bytes)
        self._features = _features(self._bytes)
        self._max_chars = int(self._features.chars.max()) if self._bytes else 0
        # keys are bounded (caps clamp to _max_chars, "exact" only serves b"-"), so the cache is too
        self._cache: dict[TokenClass, torch.Tensor] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def ids_spelling(self, raw: bytes) -> list[int]:
        """All ids whose bytes equal `raw` (a vocabulary may spell the same bytes twice)."""
        if not raw:
            return []
        same_length = torch.nonzero(self._features.lengths == len(raw), as_tuple=True)[0]
        return [i for i in same_length.tolist() if self._bytes[i] == raw]

    def mask(self, key: TokenClass) -> torch.Tensor:
        """[V] bool mask of the ids allowed by `key`, pad (filler) included. Do not mutate (shared)."""
        if key.kind == "ids":  # per-request id sets (enum spellings): cheap to build, not worth keeping
            return self._build(key)
        if key.kind == "json_string" and key.max_chars is not None and key.max_chars >= self._max_chars:
            key = TokenClass("json_string")  # a cap no token reaches: same set, one cache entry
        if key not in self._cache:
            self._cache[key] = self._build(key)
        return self._cache[key]

    def _build(self, key: TokenClass) -> torch.Tensor:
        feats = self._features
        if key.kind == "free":
            base = ~feats.special
        elif key.kind == "json_string":
            base = feats.string_safe
            if key.max_chars is not None:
                base = base & (feats.chars <= key.max_chars)
        elif key.kind == "digits":
            base = feats.digits
        else:
            ids = self.ids_spelling(key.raw) if key.kind == "exact" else list(key.ids)
            base = torch.zeros(len(self._bytes), dtype=torch.bool)
            if ids:
                base[torch.tensor(ids)] = True
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # [V]
        mask[: len(self._bytes)] = base
        mask[self.pad_id] = True
        return mask


_CLASSES_BY_TOKENIZER: weakref.WeakKeyDictionary[Any, dict[int, TokenClasses]] = weakref.WeakKeyDictionary()


def token_classes_for(tokenizer: Any, vocab_size: int | None = None) -> TokenClasses:
    """The `TokenClasses` of a tokenizer object (interface of model/tokenizer.py), cached per
    (object, vocab_size) while the object lives. Objects that cannot be weak-referenced are not cached."""
    wanted = tokenizer.vocab_size if vocab_size is None else vocab_size
    try:
        per_size = _CLASSES_BY_TOKENIZER.setdefault(tokenizer, {})
    except TypeError:
        per_size = {}
    if wanted not in per_size:
        raw = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        per_size[wanted] = TokenClasses(raw, tokenizer.pad_id, wanted)
    return per_size[wanted]
