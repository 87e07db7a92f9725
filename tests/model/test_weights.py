"""Checkpoint loading: expert shards that add up to the whole model, sharded files, clear errors, round trip.

The checkpoints are real files: tiny random `DiffusionGemmaForBlockDiffusion` models written by transformers'
`save_pretrained` (tests/tiny.py), and ours written by `save_model` and read back by transformers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import weights as weights_mod
from model.config import ConfigError, from_name
from model.kv_cache import PrefixBatch
from model.transformer import DiffusionGemma, TokenBatch
from model.weights import CheckpointError, init_random, load_expert_banks, load_model, save_model
from tests.tiny import reference_checkpoint

transformers = pytest.importorskip("transformers")

ATOL = 2e-5
E = 8  # experts in the tiny checkpoints
EXPERT_TENSOR = ".experts."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    reference_checkpoint(path, top_k=3, num_experts=E)
    return path


@pytest.fixture(scope="module")
def full(ckpt) -> DiffusionGemma:
    return load_model(ckpt)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _write(dst: Path, tensors: dict[str, torch.Tensor], config_from: Path | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    if config_from is not None:
        shutil.copy(config_from / "config.json", dst / "config.json")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@torch.no_grad()
def _run(model: DiffusionGemma, seed: int = 0):
    """Encoder hidden of a prompt longer than the window, then decoder logits of a canvas with and without
    self-conditioning, each as the model computes them (every layer's MoE goes through `moe_backend`)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 512, (21,), generator=g).tolist()
    cache = model.new_cache()
    enc = model.encode(TokenBatch.from_lists([prompt], [0], 0), [cache])
    canvas = torch.randint(0, 512, (1, 16), generator=g)
    plain = model.logits(model.denoise(canvas, PrefixBatch([cache])))
    soft = model.soft_embeddings(torch.softmax(3 * torch.randn(1, 16, 512, generator=g), -1))
    sc = model.logits(model.denoise(canvas, PrefixBatch([cache]), soft))
    return enc, plain, sc


def _summed_backend(banks_per_layer: list[list]):
    """moe_backend that adds the partial outputs of several banks per layer (what the Engine does with the
    replies of its ExpertShards)."""

    def backend(layer: int, x, w, ids):
        parts = [bank(x, w, ids) for bank in banks_per_layer[layer]]
        return torch.stack(parts).sum(0)

    return backend


# -- expert halves --------------------------------------------------------------------------------------------


def test_half_loads_hold_their_expert_slices_and_the_same_shared_weights(ckpt, full):
    lo, hi = load_model(ckpt, experts=range(0, 4)), load_model(ckpt, experts=range(4, 8))
    full_sd = full.state_dict()
    for half, rows in ((lo, slice(0, 4)), (hi, slice(4, 8))):
        assert half.expert_range in (range(0, 4), range(4, 8))
        for name, t in half.state_dict().items():
            want = full_sd[name][rows] if EXPERT_TENSOR in name else full_sd[name]
            assert torch.equal(t, want), name
        assert half.layers[0].experts.first == rows.start and half.layers[0].experts.count == 4


@torch.no_grad()
def test_two_halves_reproduce_the_full_moe_output_and_logits(ckpt, full):
    lo, hi = load_model(ckpt, experts=range(0, 4)), load_model(ckpt, experts=range(4, 8))
    # every MoE call of the full model, checked against the two halves' partial sums
    calls = []

    def recording(layer, x, w, ids):
        out = full.layers[layer].experts(x, w, ids)
        calls.append((layer, x, w, ids, out))
        return out

    full.moe_backend = recording
    try:
        want = _run(full)
    finally:
        full.moe_backend = None
    assert {c[0] for c in calls} == set(range(full.config.num_layers))
    for layer, x, w, ids, out in calls:
        a, b = lo.layers[layer].experts(x, w, ids), hi.layers[layer].experts(x, w, ids)
        assert a.abs().max() > 0 and b.abs().max() > 0  # both halves really contribute
        torch.testing.assert_close(a + b, out, atol=1e-6, rtol=1e-5)

    lo.moe_backend = _summed_backend([[lo.layers[i].experts, hi.layers[i].experts] for i in range(3)])
    got = _run(lo)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    # and without the second half the output really differs (the backend is not bypassed)
    lo.moe_backend = None
    assert (_run(lo)[1] - want[1]).abs().max() > 1e-3


@torch.no_grad()
def test_attention_only_model_plus_uneven_expert_banks_reproduce_logits(ckpt, full):
    """The disaggregated layout: an Engine with no experts (`range(0)`) and shards of 3 and 5 experts."""
    engine = load_model(ckpt, experts=range(0))
    assert all(layer.experts.count == 0 for layer in engine.layers)
    cfg_a, banks_a = load_expert_banks(ckpt, range(0, 3))
    cfg_b, banks_b = load_expert_banks(ckpt, range(3, 8))
    assert cfg_a == cfg_b == full.config
    engine.moe_backend = _summed_backend(list(zip(banks_a, banks_b, strict=True)))
    for g, w in zip(_run(engine, seed=5), _run(full, seed=5), strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_load_expert_banks_needs_only_the_expert_tensors(ckpt, full, tmp_path):
    only_experts = {k: v for k, v in _tensors(ckpt).items() if EXPERT_TENSOR in k}
    assert len(only_experts) == 2 * full.config.num_layers
    copy = _write(tmp_path / "experts-only", only_experts, config_from=ckpt)
    _, banks = load_expert_banks(copy, range(2, 7))
    for i, bank in enumerate(banks):
        assert (bank.first, bank.count) == (2, 5)
        assert torch.equal(bank.gate_up_proj, full.layers[i].experts.gate_up_proj[2:7])
        assert torch.equal(bank.down_proj, full.layers[i].experts.down_proj[2:7])
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_model(copy)  # the full model does need the rest


def test_partial_loads_read_only_the_rows_they_hold(ckpt, full, monkeypatch):
    """What each load pulls out of the files, counted at the one place tensors are read (safetensors slices)."""
    read: list[tuple[str, int]] = []
    original = weights_mod.TensorSource.get

    def counting(self, name, shape, rows=None):
        t = original(self, name, shape, rows)
        read.append((name, t.numel()))
        return t

    monkeypatch.setattr(weights_mod.TensorSource, "get", counting)
    sd = full.state_dict()
    expert_elems = sum(t.numel() for n, t in sd.items() if EXPERT_TENSOR in n)
    shared_elems = sum(t.numel() for n, t in sd.items() if EXPERT_TENSOR not in n and "inv_freq" not in n)

    load_model(ckpt, experts=range(1, 3))
    assert sum(n for _, n in read) == shared_elems + expert_elems * 2 // E
    read.clear()
    load_model(ckpt, experts=range(0))
    assert sum(n for name, n in read if EXPERT_TENSOR in name) == 0
    read.clear()
    load_expert_banks(ckpt, range(5, 8))
    assert all(EXPERT_TENSOR in name for name, _ in read)
    assert sum(n for _, n in read) == expert_elems * 3 // E


# -- sharded checkpoints ---------------------------------------------------------------------------------------


def _shard(ckpt: Path, dst: Path) -> Path:
    """The same tensors split over two files (layer 0's experts in one, the rest in the other) plus the index."""
    tensors = _tensors(ckpt)
    names = sorted(tensors)
    first = set(names[::2]) | {n for n in names if "layers.0.experts" in n}
    files = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": set(names) - first,
    }
    dst.mkdir()
    shutil.copy(ckpt / "config.json", dst / "config.json")
    weight_map = {}
    for fname, keys in files.items():
        save_file({k: tensors[k] for k in sorted(keys)}, dst / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_sharded_checkpoint_gives_identical_weights_and_logits(ckpt, full, tmp_path):
    sharded = _shard(ckpt, tmp_path / "sharded")
    assert not (sharded / "model.safetensors").exists()
    model = load_model(sharded)
    full_sd = full.state_dict()
    assert all(torch.equal(t, full_sd[n]) for n, t in model.state_dict().items())
    for g, w in zip(_run(model, seed=3), _run(full, seed=3), strict=True):
        assert torch.equal(g, w)
    _, banks = load_expert_banks(sharded, range(3, 6))
    assert torch.equal(banks[0].down_proj, full.layers[0].experts.down_proj[3:6])


# -- bad input ---------------------------------------------------------------------------------------------


def test_unknown_architecture_names_model_type(ckpt, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        load_model(bad)
    with pytest.raises(ConfigError, match="model_type='llama'"):
        load_expert_banks(bad, range(0, 2))


@pytest.mark.parametrize(
    "missing",
    [
        "model.decoder.layers.1.mlp.up_proj.weight",
        "model.decoder.embed_tokens.weight",
        "model.encoder.language_model.layers.2.layer_scalar",
        "model.decoder.layers.2.experts.down_proj",
    ],
)
def test_missing_tensor_is_named(ckpt, tmp_path, missing):
    tensors = _tensors(ckpt)
    del tensors[missing]
    bad = _write(tmp_path / "missing", tensors, config_from=ckpt)
    with pytest.raises(CheckpointError, match=f"missing tensor '{missing}'"):
        load_model(bad)
    if EXPERT_TENSOR in missing:
        with pytest.raises(CheckpointError, match=f"missing tensor '{missing}'"):
            load_expert_banks(bad, range(0, 1))


@pytest.mark.parametrize(
    "name,shape,want",
    [
        ("model.decoder.layers.0.self_attn.q_proj.weight", (64, 63), [64, 64]),
        ("model.decoder.layers.2.self_attn.k_proj.weight", (64, 64), [32, 64]),  # full layer: 1 kv head of 32
        (
            "model.decoder.layers.1.experts.gate_up_proj",
            (7, 64, 64),
            [8, 64, 64],
        ),  # fewer experts than config
    ],
)
def test_shape_mismatch_names_tensor_and_both_shapes(ckpt, tmp_path, name, shape, want):
    tensors = _tensors(ckpt)
    tensors[name] = torch.zeros(shape)
    bad = _write(tmp_path / "shape", tensors, config_from=ckpt)
    msg = rf"tensor '{name}' has shape \[{', '.join(map(str, shape))}\], config expects \[{', '.join(map(str, want))}\]"
    with pytest.raises(CheckpointError, match=msg):
        load_model(bad)
    if EXPERT_TENSOR in name:
        with pytest.raises(CheckpointError, match=msg):
            load_expert_banks(bad, range(0, 2))


@pytest.mark.parametrize("experts", [range(6, 9), range(5, 3), range(-1, 2), range(0, 8, 2)])
def test_expert_range_out_of_bounds_names_the_bound(ckpt, experts):
    pattern = re.escape(f"experts={experts!r} is out of bounds") + ".*" + re.escape("0 <= a <= b <= 8")
    with pytest.raises(CheckpointError, match=pattern):
        load_model(ckpt, experts=experts)
    with pytest.raises(CheckpointError, match=pattern):
        load_expert_banks(ckpt, experts)


def test_missing_config_json(ckpt, tmp_path):
    bad = tmp_path / "noconfig"
    bad.mkdir()
    shutil.copy(ckpt / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(bad)


def test_missing_safetensors(ckpt, tmp_path):
    bad = tmp_path / "noweights"
    bad.mkdir()
    shutil.copy(ckpt / "config.json", bad / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_expert_banks(bad, range(0, 2))


# -- round trip through transformers ---------------------------------------------------------------------------


@torch.no_grad()
def test_save_model_loads_in_transformers_with_matching_logits(tmp_path):
    from transformers.cache_utils import DynamicCache

    ours = init_random(DiffusionGemma(from_name("tiny-test")), seed=7, std=0.05)
    g = torch.Generator().manual_seed(8)
    for name, p in ours.named_parameters():  # non-trivial norms and scales, so a swapped tensor cannot hide
        if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
            p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    for name, b in ours.named_buffers():
        if name.endswith("_scalar"):
            b.copy_(0.8 + 0.4 * torch.rand(b.shape, generator=g))
    save_model(ours, tmp_path)
    ref, info = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(
        tmp_path, output_loading_info=True
    )
    ref.eval()
    text = {k: [n for n in v if "vision" not in n] for k, v in info.items() if k != "error_msgs"}
    assert text == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert info["error_msgs"] == []

    prompt = torch.randint(3, 512, (1, 21), generator=g)  # longer than the window (8)
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    enc = ref.model.encoder(input_ids=prompt, past_key_values=cache)
    mine = ours.new_cache()
    hidden = ours.encode(TokenBatch.from_lists([prompt[0].tolist()], [0], 0), [mine])
    torch.testing.assert_close(hidden, enc.last_hidden_state, atol=ATOL, rtol=0)
    canvas = torch.randint(0, 512, (1, 16), generator=g)
    want = ref(decoder_input_ids=canvas, past_key_values=cache).logits
    got = ours.logits(ours.denoise(canvas, PrefixBatch([mine])))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert want.std() > 0.1  # the comparison is not between two near-constant outputs
    # and load_model reads back exactly what was saved
    again = load_model(tmp_path)
    assert all(torch.equal(t, ours.state_dict()[n]) for n, t in again.state_dict().items())


def test_saving_a_shard_is_refused(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="holds a shard"):
        save_model(load_model(ckpt, experts=range(0, 4)), tmp_path)


def test_broken_shard_index_is_a_checkpoint_error(tmp_path):
    from model.transformer import DiffusionGemma
    from model.weights import CheckpointError, init_random, save_model

    save_model(init_random(DiffusionGemma(from_name("tiny-test")), seed=0), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "part-1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(tmp_path)
    index.write_text(json.dumps({"weight_map": {"model.decoder.norm.weight": "part-2.safetensors"}}))
    with pytest.raises(CheckpointError, match="part-2.safetensors"):
        load_model(tmp_path)
