"""Tests for the training objective (model/training/train.py) and the `make tiny-model` entry point (model/training/train_tiny.py).

The CI smoke test trains a tiny config from scratch for 30 steps and checks the loss falls; the others hold the
training-time decoder view (prefix cut from the encoder's window K/V) to the serving path (SequenceCache).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.config import FULL, SLIDING, build_config
from model.kv_cache import PrefixBatch
from model.training import bpe
from model.training.corpus import build_corpus
from model.training.train import (
    CanvasPrefix,
    TokenData,
    TrainConfig,
    Windows,
    canvas_prefix,
    corrupt,
    cut_canvases,
    encode_window,
    lr_at,
    sample_windows,
    train,
)
from model.transformer import DiffusionGemma, TokenBatch
from model.weights import init_random

CANVAS = 8
WINDOW = 40


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(max_bytes=120_000)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return bpe.train_bpe(corpus.train_texts, vocab_size=384)


def micro_config(vocab_size: int, window: int = 6):
    config = build_config(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=64,
        layer_types=[SLIDING, FULL],
        num_heads=4,
        head_dim=12,
        num_kv_heads=2,
        global_head_dim=16,
        num_global_kv_heads=1,
        sliding_window=window,
        num_experts=4,
        top_k=2,
        moe_intermediate_size=32,
        canvas_length=CANVAS,
        name="micro",
    )
    return dataclasses.replace(config, bos_token_id=bpe.BOS_ID, eos_token_ids=(bpe.EOS_ID,), pad_token_id=0)


@pytest.fixture(scope="module")
def data(corpus, tokenizer):
    return TokenData.from_texts(corpus.train_texts, tokenizer)


def test_loss_falls_when_training_from_scratch(tokenizer, data):
    config = micro_config(tokenizer.get_vocab_size())
    model = init_random(DiffusionGemma(config), seed=0)
    tc = TrainConfig(
        max_steps=30, batch_size=8, window=WINDOW, lr=1e-2, warmup_steps=3, log_every=0, threads=1
    )
    result = train(model, data, tc, log=lambda _: None)
    assert result.steps == 30 and result.stopped_by == "max_steps"
    first, last = result.first_last_mean("total")  # means of the first 5 and the last 5 steps
    assert last < first - 1.0, (first, last)  # measured: 11.4 -> 9.1
    first_dec, last_dec = result.first_last_mean("decoder")
    assert last_dec < first_dec - 0.5, (first_dec, last_dec)  # the denoiser itself learns (5.6 -> 4.1)


def test_training_is_deterministic_for_a_seed(tokenizer, data):
    config = micro_config(tokenizer.get_vocab_size())
    runs = []
    for _ in range(2):
        model = init_random(DiffusionGemma(config), seed=3)
        tc = TrainConfig(
            max_steps=3, batch_size=4, window=WINDOW, warmup_steps=1, log_every=0, seed=3, threads=1
        )
        runs.append([h["total"] for h in train(model, data, tc, log=lambda _: None).history])
    assert runs[0] == runs[1]


def test_windows_start_with_bos_and_end_files_with_eos_then_pad():
    files = [torch.arange(10, 15), torch.arange(20, 80)]
    data = TokenData(files, bos_id=2, eos_id=1, pad_id=0)
    w = sample_windows(data, 64, 16, torch.Generator().manual_seed(0))
    assert (w.ids[:, 0] == 2).all()
    for row, n in zip(w.ids, w.lengths, strict=True):
        assert (row[n:] == 0).all() and (row[1:n] >= 1).all()
        if n < 16:  # the file ended inside the window
            assert row[n - 1] == 1
    short = w.ids[w.ids[:, 1] == 10]
    assert len(short) and short[0, :7].tolist() == [2, 10, 11, 12, 13, 14, 1]


def test_canvases_start_after_bos_hold_real_tokens_and_fit():
    ids = torch.ones(3, WINDOW, dtype=torch.long)
    w = Windows(ids, torch.tensor([WINDOW, 12, 3]))
    rows, starts = cut_canvases(w, CANVAS, torch.Generator().manual_seed(1))
    assert (starts >= 1).all() and (starts + CANVAS <= WINDOW).all()
    assert (starts < w.lengths[rows]).all()
    full = starts[rows == 0]
    assert (full.diff() == CANVAS).all() and int(full[-1]) + 2 * CANVAS > WINDOW  # back to back, to the end
    assert set(rows.tolist()) >= {0, 1}


def test_corruption_replaces_about_t_of_the_positions():
    clean = torch.full((2000, 32), 7, dtype=torch.long)
    noisy, t = corrupt(clean, vocab=5000, g=torch.Generator().manual_seed(0))
    changed = (noisy != clean).float().mean(1)
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert float((changed - t).abs().mean()) < 0.08  # per-canvas rate follows its own noise level
    assert abs(float(t.mean()) - 0.5) < 0.05


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(50, tc) < lr_at(20, tc)
    assert lr_at(100, tc) == pytest.approx(1e-4)
    by_time = dataclasses.replace(tc, max_steps=10_000, max_seconds=60.0, anneal_by_time=True)
    assert lr_at(20, by_time, elapsed=1.0) > 0.99e-3  # far from both ends
    assert lr_at(20, by_time, elapsed=60.0) == pytest.approx(1e-4)  # the time budget ends first


@pytest.mark.parametrize("start", [3, 13])  # prefix shorter and longer than the sliding window (6)
def test_training_prefix_matches_the_serving_cache(start):
    """The decoder sees the same keys in training (cut from one window pass) as when serving (encode, then
    denoise over the SequenceCache), including the sliding layers' trimmed window."""
    config = micro_config(vocab_size=300)
    torch.manual_seed(0)
    model = init_random(DiffusionGemma(config), seed=1).eval()
    ids = torch.randint(4, 300, (1, 24))
    windows = Windows(ids, torch.tensor([24]))
    canvas = torch.randint(0, 300, (1, CANVAS))
    soft = torch.randn(1, CANVAS, config.hidden_size)
    with torch.no_grad():
        _, keys, values, valid = encode_window(model, windows)
        prefix = canvas_prefix(config, keys, values, valid, torch.tensor([0]), torch.tensor([start]))
        trained_view = model.denoise(canvas, prefix, soft)
        cache = model.new_cache()
        model.encode(TokenBatch.from_lists([ids[0, :start].tolist()], [0], pad_id=0), [cache])
        serving_view = model.denoise(canvas, PrefixBatch([cache]), soft)
    torch.testing.assert_close(trained_view, serving_view, rtol=1e-5, atol=1e-5)


def test_zero_self_conditioning_equals_none():
    """Rows without self-conditioning get a zero signal in the batched pass: that must be the first-step input."""
    config = micro_config(vocab_size=300)
    model = init_random(DiffusionGemma(config), seed=2).eval()
    windows = Windows(torch.randint(4, 300, (1, 16)), torch.tensor([16]))
    canvas = torch.randint(0, 300, (1, CANVAS))
    with torch.no_grad():
        _, keys, values, valid = encode_window(model, windows)
        prefix = canvas_prefix(config, keys, values, valid, torch.tensor([0]), torch.tensor([8]))
        assert isinstance(prefix, CanvasPrefix)
        zero = model.denoise(canvas, prefix, torch.zeros(1, CANVAS, config.hidden_size))
        none = model.denoise(canvas, prefix, None)
    torch.testing.assert_close(zero, none)


def test_train_tiny_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    from model.training import train_tiny

    monkeypatch.setattr(train_tiny, "tiny_config", lambda vocab: micro_config(vocab, window=16))
    args = ["--out", str(tmp_path), "--max-steps", "2", "--corpus-bytes", "1500000", "--vocab-size", "320"]
    assert (
        train_tiny.main(
            [*args, "--batch-size", "2", "--window", "40", "--eval-windows", "2", "--threads", "1"]
        )
        == 0
    )
    for name in (*train_tiny.CHECKPOINT_FILES, "corpus_manifest.json", "training_log.json"):
        assert (tmp_path / name).exists(), name
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert log["steps"] == 2 and log["seed"] == 0 and len(log["loss_curve"]) == 2 and log["heldout"]
    manifest = json.loads((tmp_path / "corpus_manifest.json").read_text())
    assert manifest["num_bytes"] <= 1_500_000 and "PSF" in manifest["licence"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and config["text_config"]["vocab_size"] == 320
    assert bpe.load(tmp_path).get_vocab_size() == 320

    transformers = pytest.importorskip("transformers")
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    gen = DiffusionGemmaGenerationConfig.from_pretrained(tmp_path)
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max) == (48, 0.4, 0.8)
    assert (gen.stability_threshold, gen.confidence_threshold) == (1, 0.005)
    assert gen.sampler_config.entropy_bound == 0.1
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (
        hf_config.text_config.bos_token_id == bpe.BOS_ID and hf_config.text_config.pad_token_id == bpe.PAD_ID
    )
