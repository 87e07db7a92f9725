"""ModelConfig against transformers' own reading of the same config.json, the published preset's size, and errors.

Ground truth for the per-layer facts is the transformers model built from the same dict: its attention modules'
head_dim, KV heads and (absent) v_proj, and its rotary embedding's inverse frequencies per layer type.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.config import FULL, SLIDING, TINY_VISION_CONFIG, ConfigError, ModelConfig, from_name
from model.layers import rope_inv_freq
from model.transformer import DiffusionGemma

transformers = pytest.importorskip("transformers")


def _text(**overrides):
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=8,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        layer_types=[SLIDING, FULL, SLIDING, SLIDING],  # last one is forced to full, as transformers does
    )
    text.update(overrides)
    return text


def _hf(text: dict, canvas_length: int = 16):
    """(config.json dict as save_pretrained writes it, the transformers model built from it)."""
    cfg = transformers.DiffusionGemmaConfig(
        text_config=text, vision_config=TINY_VISION_CONFIG, canvas_length=canvas_length
    )
    torch.manual_seed(0)
    return cfg.to_dict(), transformers.DiffusionGemmaForBlockDiffusion(cfg)


RESHAPES = {
    "mixed": {},
    "default-pattern-7": dict(num_hidden_layers=7, layer_types=None),  # 5 sliding : 1 full, last forced full
    "mha-sliding": dict(num_key_value_heads=4, num_global_key_value_heads=2, global_head_dim=32),
    "custom-rope": dict(
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 5000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 20000.0},
        }
    ),
}


@pytest.mark.parametrize("case", sorted(RESHAPES))
def test_from_hf_matches_transformers_per_layer(case):
    config_json, ref = _hf(_text(**RESHAPES[case]), canvas_length=24)
    ours = ModelConfig.from_hf(config_json)
    ref_layers = ref.model.decoder.layers
    assert ours.num_layers == len(ref_layers)
    assert ours.canvas_length == 24
    assert ours.vocab_size == 128 and ours.hidden_size == 32 and ours.num_heads == 4
    assert ours.num_experts == 4 and ours.top_k == 2 and ours.moe_intermediate_size == 16
    assert ours.layers[-1].kind == FULL
    rotary = ref.model.decoder.rotary_emb
    for i, (spec, layer) in enumerate(zip(ours.layers, ref_layers, strict=True)):
        attn = layer.self_attn
        assert spec.kind == ref.config.text_config.layer_types[i], i
        assert spec.head_dim == attn.head_dim, i
        assert spec.num_kv_heads == attn.k_proj.out_features // attn.head_dim, i
        assert spec.has_v_proj == (attn.v_proj is not None), i
        assert spec.is_sliding == (spec.kind == SLIDING)
        ref_inv = getattr(rotary, f"{spec.kind}_inv_freq")
        mine = rope_inv_freq(spec)
        # proportional RoPE: our table pads the non-rotated half of the pairs with frequency 0
        torch.testing.assert_close(mine[: len(ref_inv)], ref_inv, atol=0, rtol=1e-6)
        assert (mine[len(ref_inv) :] == 0).all()
    kinds = {s.kind for s in ours.layers}
    assert kinds == {SLIDING, FULL}


def test_from_hf_without_per_layer_config_derives_it_like_transformers():
    """Configs written without `per_layer_config` carry global_head_dim / num_global_key_value_heads instead."""
    config_json, ref = _hf(_text())
    legacy = copy.deepcopy(config_json)
    del legacy["text_config"]["per_layer_config"]
    legacy["text_config"].update(global_head_dim=16, num_global_key_value_heads=1)
    assert ModelConfig.from_hf(legacy).layers == ModelConfig.from_hf(config_json).layers


def test_to_hf_round_trips_and_transformers_reads_it():
    cfg = from_name("tiny-test")
    again = ModelConfig.from_hf(cfg.to_hf(), name="tiny-test")
    assert again == cfg
    hf = transformers.DiffusionGemmaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    assert ModelConfig.from_hf(hf.to_dict(), name="tiny-test") == cfg


def test_published_preset_sizes():
    cfg = from_name("diffusiongemma-26b-a4b")
    counts = cfg.parameter_counts()
    assert abs(counts["total"] - 25.2e9) <= 0.1e9, counts
    assert abs(counts["active"] - 3.8e9) <= 0.1e9, counts
    assert cfg.num_layers == 30 and cfg.hidden_size == 2816 and cfg.num_heads == 16
    assert (
        cfg.vocab_size == 262_144 and cfg.num_experts == 128 and cfg.top_k == 8 and cfg.canvas_length == 256
    )
    assert [s.kind for s in cfg.layers].count(FULL) == 5


@pytest.mark.parametrize("name", ["tiny-test", "diffusiongemma-26b-a4b"])
def test_parameter_counts_equal_the_built_models_matrices(name):
    """The formula against the module tree (on the meta device: no memory). Vectors (norms, scales) are left
    out of the count by design, so compare against every parameter with two or more dimensions."""
    cfg = from_name(name)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    counts = cfg.parameter_counts()
    assert counts["total"] == matrices
    per_expert = sum(
        layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel() for layer in model.layers
    )
    assert counts["per_expert_all_layers"] == per_expert
    assert counts["active"] == matrices - (cfg.num_experts - cfg.top_k) * per_expert


def _valid_json() -> dict:
    return from_name("tiny-test").to_hf()


def test_unknown_model_type_names_it():
    bad = _valid_json()
    bad["model_type"], bad["architectures"] = "llama", ["LlamaForCausalLM"]
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ModelConfig.from_hf(bad)


def test_missing_text_config_names_it():
    bad = _valid_json()
    del bad["text_config"]
    with pytest.raises(ConfigError, match="text_config"):
        ModelConfig.from_hf(bad)


def test_bidirectional_encoder_is_refused():
    bad = _valid_json()
    bad["text_config"]["use_bidirectional_attention"] = "all"
    with pytest.raises(ConfigError, match="use_bidirectional_attention='all'"):
        ModelConfig.from_hf(bad)


@pytest.mark.parametrize("top_k", [0, 9, -1])
def test_bad_top_k_names_the_field_and_bound(top_k):
    bad = _valid_json()
    bad["text_config"]["top_k_experts"] = top_k
    with pytest.raises(ConfigError, match=rf"top_k_experts={top_k} must be in \[1, num_experts=8\]"):
        ModelConfig.from_hf(bad)


@pytest.mark.parametrize("field", ["vocab_size", "num_experts", "moe_intermediate_size", "hidden_size"])
def test_missing_required_field_names_it(field):
    bad = _valid_json()
    del bad["text_config"][field]
    with pytest.raises(ConfigError, match=f"text_config.{field}"):
        ModelConfig.from_hf(bad)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny-test"):
        from_name("gpt-7")
