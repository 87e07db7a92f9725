"""Tokenizer wrapper over HF `tokenizers`, reading a checkpoint's `tokenizer.json`.

Adds no special tokens on encode (the caller decides about BOS), decodes without dropping anything the model
wrote except special tokens, and exposes each token's raw bytes for byte-level BPE vocabularies — what the
structured-output layer needs to decide which tokens may appear inside a JSON string or number.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    pass


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (printable bytes map to themselves, others to U+0100+)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class Tokenizer:
    def __init__(self, hf: HFTokenizer, pad_id: int = 0, eos_id: int = 1, bos_id: int | None = 2):
        self.hf = hf
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id

    @classmethod
    def from_dir(
        cls, path: str | Path, pad_id: int = 0, eos_id: int = 1, bos_id: int | None = 2
    ) -> Tokenizer:
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise TokenizerError(f"no tokenizer.json at {file}; the checkpoint directory must contain one")
        return cls(HFTokenizer.from_file(str(file)), pad_id, eos_id, bos_id)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        added = self.hf.get_added_tokens_decoder()  # {id: AddedToken}
        return frozenset(i for i, t in added.items() if t.special) | frozenset(
            i for i in (self.pad_id, self.eos_id, self.bos_id) if i is not None
        )

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        table = _byte_decoder()
        out = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i)
            if piece is None or i in self.special_ids:
                out.append(b"")
            elif all(ch in table for ch in piece):
                out.append(bytes(table[ch] for ch in piece))
            else:  # not a byte-level piece: fall back to its decoded text
                out.append(self.hf.decode([i]).encode("utf-8"))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]
