"""Tiny random DiffusionGemma checkpoints built with transformers (test-only dependency) and saved for real."""

from __future__ import annotations

from pathlib import Path

from model.config import TINY_VISION_CONFIG

SLIDING, FULL = "sliding_attention", "full_attention"


def reference_generate(ref, prompt: list[int], params, seed: int, eos: int | None) -> list[int]:
    """transformers' `generate` (after `torch.manual_seed(seed)`) with our SamplingParams; the tokens after the
    prompt (whole canvases, EOS and padding included)."""
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    torch.manual_seed(seed)
    out = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=params.max_new_tokens,
        max_denoising_steps=params.max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=params.entropy_bound),
        t_min=params.t_min,
        t_max=params.t_max,
        stability_threshold=params.stability_threshold,
        confidence_threshold=params.confidence_threshold,
        eos_token_id=eos,
    )
    return out.sequences[0, len(prompt) :].tolist()


def reference_checkpoint(
    path: Path,
    *,
    layer_types=(SLIDING, SLIDING, FULL),
    top_k: int = 2,
    num_experts: int = 8,
    canvas_length: int = 16,
    sliding_window: int = 8,
    vocab_size: int = 512,
    seed: int = 0,
):
    """Save a random `DiffusionGemmaForBlockDiffusion` with `save_pretrained`; returns the transformers model."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=len(layer_types),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            sliding_window=sliding_window,
            num_experts=num_experts,
            top_k_experts=top_k,
            moe_intermediate_size=32,
            layer_types=list(layer_types),
        ),
        vision_config=TINY_VISION_CONFIG,
        canvas_length=canvas_length,
    )
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():  # non-trivial norms, scales and layer scalars, so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".scale", "per_expert_scale")) and "vision" not in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.8 + 0.4 * torch.rand_like(b))
    model.save_pretrained(path)
    return model


def served_checkpoint(path: Path, *, canvas_length: int = 16, seed: int = 0) -> Path:
    """A complete servable checkpoint (config, safetensors, tokenizer.json) with random weights and a small
    byte-level BPE trained here: what integration tests serve when the trained default model is not used."""
    import dataclasses

    from model.config import from_name
    from model.training import bpe
    from model.transformer import DiffusionGemma
    from model.weights import init_random, save_model

    texts = [_TEXT * 3, _TEXT.upper(), '{"name": "x", "count": 12, "ok": true, "items": [1, 2.5, -3]}']
    tokenizer = bpe.train_bpe(texts, vocab_size=384)
    cfg = dataclasses.replace(
        from_name("tiny-test"),
        vocab_size=tokenizer.get_vocab_size(),
        canvas_length=canvas_length,
        name="served",
    )
    model = init_random(DiffusionGemma(cfg), seed=seed)
    save_model(model, path)
    bpe.save(tokenizer, path / "tokenizer.json")
    return path


_TEXT = """def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } " ' , . : ;
"""
