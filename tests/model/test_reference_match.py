"""Our model and sampler against transformers' DiffusionGemmaForBlockDiffusion (the numerical ground truth)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.kv_cache import PrefixBatch
from model.sampling.generate import generate
from model.sampling.params import SamplingParams
from model.transformer import TokenBatch
from model.weights import load_model
from tests.tiny import FULL, SLIDING, reference_checkpoint, reference_generate

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402

ATOL = 2e-5

PATTERNS = {
    "s-s-f": dict(layer_types=(SLIDING, SLIDING, FULL), top_k=2),
    "f-only-top1": dict(layer_types=(FULL,), top_k=1),
    "s-f-s-f-top3": dict(layer_types=(SLIDING, FULL, SLIDING, FULL), top_k=3),
}


@pytest.fixture(scope="module", params=sorted(PATTERNS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = reference_checkpoint(path, **PATTERNS[request.param])
    return ref, load_model(path)


@torch.no_grad()
def test_encoder_and_decoder_logits_match(pair):
    ref, ours = pair
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 512, (1, 21), generator=g)  # longer than the sliding window (8)
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc = ref.model.encoder(input_ids=prompt, past_key_values=cache)
    mine = ours.new_cache()
    hidden = ours.encode(TokenBatch.from_lists([prompt[0].tolist()], [0], 0), [mine])
    torch.testing.assert_close(hidden, enc.last_hidden_state, atol=ATOL, rtol=0)
    pos = 21
    for _ in range(2):  # two canvases: decode, then commit the canvas through the encoder
        canvas = torch.randint(0, 512, (1, 16), generator=g)
        out = ref(decoder_input_ids=canvas, past_key_values=cache)
        got = ours.logits(ours.denoise(canvas, PrefixBatch([mine])))
        torch.testing.assert_close(got, out.logits, atol=ATOL, rtol=0)
        sc_logits = 3 * torch.randn(1, 16, 512, generator=g)
        out_sc = ref(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=sc_logits)
        soft = ours.soft_embeddings(torch.softmax(sc_logits, -1))
        got_sc = ours.logits(ours.denoise(canvas, PrefixBatch([mine]), soft))
        torch.testing.assert_close(got_sc, out_sc.logits, atol=ATOL, rtol=0)
        assert (got_sc - got).abs().max() > 1e-3  # self-conditioning really changes the output
        positions = torch.arange(pos, pos + 16)[None]
        enc = ref.model.encoder(input_ids=canvas, past_key_values=cache, position_ids=positions)
        hidden = ours.encode(TokenBatch.from_lists([canvas[0].tolist()], [pos], 0), [mine])
        torch.testing.assert_close(hidden, enc.last_hidden_state, atol=ATOL, rtol=0)
        pos += 16


@torch.no_grad()
def test_batched_rows_with_different_prefixes_match_single_rows(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 21, 9)]
    singles, caches = [], []
    for p in prompts:
        c = ours.new_cache()
        singles.append(ours.encode(TokenBatch.from_lists([p], [0], 0), [c])[0, : len(p)])
        caches.append(c)
    batch_caches = [ours.new_cache() for _ in prompts]
    batched = ours.encode(TokenBatch.from_lists(prompts, [0, 0, 0], 0), batch_caches)
    for i, p in enumerate(prompts):  # bit-identical, not just close: outputs must not depend on batch-mates
        assert torch.equal(batched[i, : len(p)], singles[i])
    canvas = torch.randint(0, 512, (3, 16), generator=g)
    together = ours.denoise(canvas, PrefixBatch(batch_caches))
    for i in range(3):
        alone = ours.denoise(canvas[i : i + 1], PrefixBatch([caches[i]]))
        assert torch.equal(together[i : i + 1], alone)


def _reference_tokens(ref, prompt, params: SamplingParams, seed: int, eos: int | None):
    seq = reference_generate(ref, prompt, params, seed, eos)
    if eos is not None and eos in seq:
        return seq[: seq.index(eos)]
    return seq[: params.max_new_tokens]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "prompt_len,max_new,steps,confidence,stability",
    [
        (5, 16, 10, 0.005, 1),
        (21, 40, 8, 0.005, 1),
        (3, 7, 12, 10.0, 0),
        (12, 33, 20, 10.0, 1),
        (4, 20, 9, 10.0, 2),
    ],
)
def test_generate_reference_rng_is_token_identical(
    pair, seed, prompt_len, max_new, steps, confidence, stability
):
    ref, ours = pair
    prompt = torch.randint(3, 512, (prompt_len,), generator=torch.Generator().manual_seed(seed + 50)).tolist()
    params = SamplingParams(
        max_new_tokens=max_new,
        max_denoising_steps=steps,
        entropy_bound=0.5,
        confidence_threshold=confidence,
        stability_threshold=stability,
    )
    expected = _reference_tokens(ref, prompt, params, seed, eos=1)
    got = generate(ours, prompt, params, seed=seed, rng="reference")
    assert got.token_ids == expected
    if stability == 0 and confidence == 10.0:  # confident at once: every canvas stops after one step
        assert got.steps_per_canvas == [1] * len(got.steps_per_canvas)


def test_generate_stops_at_eos_like_the_reference(pair):
    ref, ours = pair
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_new_tokens=48, max_denoising_steps=6, entropy_bound=0.5)
    original = ours.config
    try:
        ours.config = dataclasses.replace(original, eos_token_ids=())
        probe = generate(ours, prompt, params, seed=3, rng="reference")
        eos = probe.token_ids[20]  # a token the second canvas really produces becomes the EOS id
        cut = probe.token_ids.index(eos)
        ours.config = dataclasses.replace(original, eos_token_ids=(eos,))
        got = generate(ours, prompt, params, seed=3, rng="reference")
    finally:
        ours.config = original
    assert got.finish_reason == "eos"
    assert got.token_ids == probe.token_ids[:cut]
    assert got.token_ids == _reference_tokens(ref, prompt, params, 3, eos=eos)


def test_fast_rng_returns_exactly_max_new_tokens_and_is_seeded(pair):
    _, ours = pair
    params = SamplingParams(max_new_tokens=37, max_denoising_steps=4)
    a = generate(ours, [4, 5, 6], params, seed=11)
    b = generate(ours, [4, 5, 6], params, seed=11)
    c = generate(ours, [4, 5, 6], params, seed=12)
    assert len(a.token_ids) == 37 and a.finish_reason == "length"
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert a.steps_per_canvas == [4, 4, 4]
    assert a.tokens_per_forward == pytest.approx(37 / 12)
