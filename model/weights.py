"""Load and save DiffusionGemma checkpoints in the published (transformers) safetensors layout.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensor names are the ones `DiffusionGemmaForBlockDiffusion.save_pretrained`
writes: the decoder copy `model.decoder.*` carries the shared weights (the encoder's are tied to it and may be
absent), each encoder layer has its own `layer_scalar`, the LM head is tied to the embeddings, and the vision
tower is skipped (we serve text).

Partial loads read only the bytes they need through safetensors slices: `experts=range(a, b)` reads experts
[a, b) of every layer (plus, for `load_model`, the non-expert weights), `experts=range(0)` none at all.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.layers import rope_inv_freq
from model.moe import ExpertBank
from model.transformer import DiffusionGemma

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
GENERATION_DEFAULTS = {
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


class TensorSource:
    """Name -> lazily sliced tensor over one or several safetensors files."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        elif (path / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
        self._stack = ExitStack()
        self._handles = {f: self._stack.enter_context(safe_open(path / f, "pt")) for f in files}
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        self.weight_map = weight_map

    def close(self) -> None:
        self._stack.close()

    def resolve(self, suffix: str, encoder_only: bool = False) -> str:
        """Full name of a shared weight: the decoder copy, else the (tied) encoder copy."""
        candidates = [ENCODER + suffix] if encoder_only else [DECODER + suffix, ENCODER + suffix]
        for name in candidates:
            if name in self.weight_map:
                return name
        raise CheckpointError(f"checkpoint {self.path} is missing tensor {candidates[0]!r}")

    def get(self, name: str, shape: tuple[int, ...], rows: range | None = None) -> torch.Tensor:
        handle = self._handles[self.weight_map[name]]
        sl = handle.get_slice(name)
        full = tuple(sl.get_shape())
        if full != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(full)}, config expects {list(shape)}")
        return sl[rows.start : rows.stop] if rows is not None else sl[:]


def _target_name(param_name: str) -> tuple[str, bool]:
    """Our parameter name -> (checkpoint suffix, is an encoder-only tensor)."""
    if param_name.endswith("encoder_scalar"):
        return param_name.replace("encoder_scalar", "layer_scalar"), True
    name = param_name.replace("decoder_scalar", "layer_scalar")
    name = name.replace("self_conditioning.mlp.", "self_conditioning.")
    return name, False


def _check_range(config: ModelConfig, experts: range) -> None:
    if (
        experts.step != 1
        or experts.start < 0
        or experts.stop > config.num_experts
        or experts.start > experts.stop
    ):
        raise CheckpointError(
            f"experts={experts} is out of bounds: the model has experts 0..{config.num_experts - 1}; "
            f"pass range(a, b) with 0 <= a <= b <= {config.num_experts}"
        )


def _expected_full_shape(param_name: str, tensor: torch.Tensor, config: ModelConfig) -> tuple[int, ...]:
    if param_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return (config.num_experts, *tensor.shape[1:])
    return tuple(tensor.shape)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    experts: range | None = None,
) -> DiffusionGemma:
    """Load a DiffusionGemma checkpoint. `experts` restricts which experts this process holds."""
    path = Path(path)
    config = ModelConfig.from_file(path)
    experts = range(config.num_experts) if experts is None else experts
    _check_range(config, experts)
    with torch.device("meta"):
        model = DiffusionGemma(config, experts=experts)
    model = model.to(dtype).to_empty(device=device)
    source = TensorSource(path)
    try:
        with torch.no_grad():
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if name.endswith("inv_freq"):
                    continue
                suffix, enc_only = _target_name(name)
                full = source.resolve(suffix, encoder_only=enc_only)
                rows = (
                    experts if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name else None
                )
                src = source.get(full, _expected_full_shape(name, tensor, config), rows)
                tensor.copy_(src.to(dtype))
    finally:
        source.close()
    for layer in model.layers:
        layer.self_attn.inv_freq = rope_inv_freq(layer.spec).to(device)
    return model.eval()


def load_expert_banks(
    path: str | Path,
    experts: range,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[ModelConfig, list[ExpertBank]]:
    """Only experts [a, b) of every layer (what an ExpertShard holds); reads nothing else."""
    path = Path(path)
    config = ModelConfig.from_file(path)
    _check_range(config, experts)
    banks = []
    source = TensorSource(path)
    try:
        for i in range(config.num_layers):
            bank = ExpertBank(config.hidden_size, config.moe_intermediate_size, experts.start, len(experts))
            bank = bank.to(dtype=dtype, device=device)
            with torch.no_grad():
                for pname in ("gate_up_proj", "down_proj"):
                    tensor = getattr(bank, pname)
                    full = source.resolve(f"layers.{i}.experts.{pname}")
                    shape = (config.num_experts, *tensor.shape[1:])
                    tensor.copy_(source.get(full, shape, experts).to(dtype))
            banks.append(bank.eval())
    finally:
        source.close()
    return config, banks


def state_dict_hf(model: DiffusionGemma) -> dict[str, torch.Tensor]:
    """Our weights under the published names (decoder copy + per-encoder-layer scalars)."""
    if len(model.expert_range) != model.config.num_experts:
        raise CheckpointError("save a model that holds every expert (this one holds a shard)")
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq"):
            continue
        suffix, enc_only = _target_name(name)
        out[(ENCODER if enc_only else DECODER) + suffix] = tensor.detach().contiguous().clone()
    return out


def save_model(model: DiffusionGemma, path: str | Path, generation: dict | None = None) -> None:
    """Write config.json, model.safetensors and generation_config.json in the published layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    save_file(state_dict_hf(model), path / "model.safetensors", metadata={"format": "pt"})
    gen = {**GENERATION_DEFAULTS, **(generation or {})}
    gen.update(
        pad_token_id=cfg.pad_token_id, eos_token_id=list(cfg.eos_token_ids), bos_token_id=cfg.bos_token_id
    )
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def init_random(model: DiffusionGemma, seed: int, std: float = 0.02) -> DiffusionGemma:
    """Deterministic random weights (norm weights at 1, as transformers initialises them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def checkpoint_problems(path: str | Path) -> list[str]:
    """What keeps `path` from loading, read from metadata only (config, tokenizer file, safetensors index and
    headers; no tensor data): one message per problem, naming the missing file or tensor. [] = loadable."""
    path = Path(path)
    if not (path / "config.json").exists():
        return [f"{path} has no config.json (not a checkpoint directory)"]
    try:
        config = ModelConfig.from_file(path)
    except Exception as e:
        return [f"{path / 'config.json'} does not parse: {e}"]
    problems = [] if (path / "tokenizer.json").exists() else [f"{path} has no tokenizer.json"]
    try:
        source = TensorSource(path)
    except Exception as e:
        return problems + [f"weights: {e}"]
    try:
        with torch.device("meta"):
            model = DiffusionGemma(config)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("inv_freq"):
                continue
            suffix, enc_only = _target_name(name)
            try:
                full = source.resolve(suffix, encoder_only=enc_only)
                shape = tuple(source._handles[source.weight_map[full]].get_slice(full).get_shape())
                want = _expected_full_shape(name, tensor, config)
                if shape != tuple(want):
                    problems.append(f"tensor {full!r} has shape {list(shape)}, config expects {list(want)}")
            except CheckpointError as e:
                problems.append(str(e))
            if len(problems) >= 10:
                problems.append("(more problems not listed)")
                break
    finally:
        source.close()
    return problems
