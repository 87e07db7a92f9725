"""The committed default checkpoint (model/assets/tiny-diffusiongemma, written by `make tiny-model`) is the real
published format: transformers' `DiffusionGemmaForBlockDiffusion` loads it with no missing or unexpected text
weights and computes what our model computes, it fits the size budget, and its tokenizer, config and corpus
manifest agree.

`BLOCKSERVE_DEFAULT_MODEL_DIR` points the test at another checkpoint directory (to check a trial run before it
is committed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.kv_cache import PrefixBatch
from model.training.train_tiny import CHECKPOINT_FILES, DEFAULT_OUT, MAX_CHECKPOINT_BYTES
from model.transformer import TokenBatch
from model.weights import load_model

CHECKPOINT = Path(os.environ.get("BLOCKSERVE_DEFAULT_MODEL_DIR", DEFAULT_OUT))
ATOL = 2e-5

pytestmark = pytest.mark.skipif(
    not CHECKPOINT.is_dir(),
    reason=f"no default checkpoint at {CHECKPOINT}: `make tiny-model` writes it, and once it is committed "
    "this test always runs",
)

# Real code, longer than the model's sliding window (64 tokens) so the sliding layers really drop keys.
PROMPT_TEXT = '''import os


def walk_sizes(root):
    """Yield (path, size) for every regular file under root, smallest directories first."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                yield path, os.path.getsize(path)


def largest(root, count=10):
    """The `count` largest files under root, largest first."""
    sizes = sorted(walk_sizes(root), key=lambda item: item[1], reverse=True)
    return [path for path, _ in sizes[:count]]


class Counter(dict):
    def __missing__(self, key):
        return 0
'''


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(CHECKPOINT / "tokenizer.json"))


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.from_file(CHECKPOINT)


@pytest.fixture(scope="module")
def pair():
    transformers = pytest.importorskip("transformers")
    ref, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
        CHECKPOINT, output_loading_info=True
    )
    return ref.eval(), info, load_model(CHECKPOINT)


def test_make_tiny_model_writes_where_make_serve_reads():
    from cluster.env import DEFAULT_MODEL_PATH

    assert DEFAULT_OUT.resolve() == DEFAULT_MODEL_PATH.resolve()


def test_checkpoint_files_fit_the_size_budget():
    sizes = {name: (CHECKPOINT / name).stat().st_size for name in CHECKPOINT_FILES}
    assert sum(sizes.values()) <= MAX_CHECKPOINT_BYTES, sizes
    assert MAX_CHECKPOINT_BYTES <= 25 * 1024 * 1024  # the budget: at most 25 MB together


def test_corpus_manifest_records_source_licence_and_size():
    manifest = json.loads((CHECKPOINT / "corpus_manifest.json").read_text())
    assert isinstance(manifest["source"], str) and manifest["source"].strip()
    assert isinstance(manifest["licence"], str) and manifest["licence"].strip()
    assert manifest["num_bytes"] > 0 and manifest["num_files"] > 0
    split = manifest["split"]
    assert split["train_bytes"] + split["heldout_bytes"] == manifest["num_bytes"]
    assert split["train_files"] + split["heldout_files"] == manifest["num_files"]


def test_tokenizer_special_ids_match_the_config(tokenizer, config):
    ids = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    assert (config.pad_token_id, config.eos_token_ids, config.bos_token_id) == (0, (1,), 2)
    generation = json.loads((CHECKPOINT / "generation_config.json").read_text())
    assert (generation["pad_token_id"], generation["eos_token_id"], generation["bos_token_id"]) == (0, [1], 2)
    assert tokenizer.get_vocab_size() == config.vocab_size
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_transformers_loads_every_text_weight(pair):
    ref, info, ours = pair
    text_missing = [k for k in info["missing_keys"] if "vision" not in k]
    assert text_missing == []
    assert list(info["unexpected_keys"]) == []
    assert list(info["mismatched_keys"]) == []
    # the shared weights were really read, not left at their random init
    torch.testing.assert_close(
        ref.model.decoder.embed_tokens.weight, ours.embed_tokens.weight, atol=0, rtol=0
    )


@torch.no_grad()
def test_encoder_and_decoder_match_transformers_on_real_text(pair, tokenizer, config):
    from transformers.cache_utils import DynamicCache

    ref, _, ours = pair
    L = config.canvas_length
    ids = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False).ids
    prompt = [config.bos_token_id, *ids[: len(ids) - 2 * L]]
    assert len(prompt) > config.sliding_window, "the prompt must be longer than the sliding window"
    g = torch.Generator().manual_seed(0)

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc = ref.model.encoder(input_ids=torch.tensor([prompt]), past_key_values=cache)
    mine = ours.new_cache()
    hidden = ours.encode(TokenBatch.from_lists([prompt], [0], config.pad_token_id), [mine])
    torch.testing.assert_close(hidden, enc.last_hidden_state, atol=ATOL, rtol=0)

    pos = len(prompt)
    for _ in range(2):  # decode a canvas, then commit it through the encoder, twice
        clean = torch.tensor([ids[pos - 1 : pos - 1 + L]])  # the text's true continuation
        noisy = torch.where(
            torch.rand(1, L, generator=g) < 0.5,
            torch.randint(0, config.vocab_size, (1, L), generator=g),
            clean,
        )
        out = ref(decoder_input_ids=noisy, past_key_values=cache)
        got = ours.logits(ours.denoise(noisy, PrefixBatch([mine])))
        torch.testing.assert_close(got, out.logits, atol=ATOL, rtol=0)
        # Self-conditioning with the model's own first-pass logits at the sampler's temperature (what it uses).
        sc_logits = got / 0.8
        out_sc = ref(decoder_input_ids=noisy, past_key_values=cache, self_conditioning_logits=sc_logits)
        soft = ours.soft_embeddings(torch.softmax(sc_logits, -1))
        got_sc = ours.logits(ours.denoise(noisy, PrefixBatch([mine]), soft))
        torch.testing.assert_close(got_sc, out_sc.logits, atol=ATOL, rtol=0)
        assert (got_sc - got).abs().max() > 1e-3  # self-conditioning really changes the output
        positions = torch.arange(pos, pos + L)[None]
        enc = ref.model.encoder(input_ids=clean, past_key_values=cache, position_ids=positions)
        hidden = ours.encode(TokenBatch.from_lists([clean[0].tolist()], [pos], config.pad_token_id), [mine])
        torch.testing.assert_close(hidden, enc.last_hidden_state, atol=ATOL, rtol=0)
        pos += L
