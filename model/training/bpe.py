"""Byte-level BPE tokenizer for the tiny DiffusionGemma, trained with HF `tokenizers` on `model.training.corpus`.

Design (GPT-2's byte-level BPE, as exposed by `tokenizers`):
- the ByteLevel pre-tokenizer maps every byte to a printable character, so any text is encodable with no
  `<unk>`; `add_prefix_space=False` so a text's first word is not changed by tokenization;
- the ByteLevel decoder maps back, so `decode(encode(text), skip_special_tokens=False) == text` exactly
  (unicode, leading spaces, newlines and indentation included);
- special tokens take the first ids in the order the model config names them: `<pad>`=0, `<eos>`=1, `<bos>`=2
  (DiffusionGemma's pad / eos / bos ids), then `<unk>`=3;
- no post-processor: whether to prepend `<bos>` is the caller's decision (`model/tokenizer.py`).

Determinism: the same texts give a byte-identical `tokenizer.json` (the trainer orders merges by count, then
by pair; tested in `tests/model/test_corpus_bpe.py`; also checked across processes and rayon thread counts).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
DEFAULT_VOCAB_SIZE = 4096


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with our pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train on `texts`; the vocabulary holds the 4 specials, the 256 byte symbols and the learned merges."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size must exceed {minimum} (specials + 256 bytes), got {vocab_size}")
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, even those absent from the corpus, so no input ever needs `<unk>`.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    _check_special_ids(tokenizer)
    return tokenizer


def _check_special_ids(tokenizer: Tokenizer) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise RuntimeError(f"special token {token!r} got id {got}, expected {expected}")


def save(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write `tokenizer.json` (pretty-printed); a directory path gets that file name inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path), pretty=True)
    return path


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    _check_special_ids(tokenizer)
    return tokenizer
