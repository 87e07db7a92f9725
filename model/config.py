"""Model configuration for DiffusionGemma (block-diffusion Gemma-4 MoE).

`ModelConfig.from_hf()` reads a checkpoint's `config.json` (`model_type: diffusion_gemma`, with its
`text_config`) the way transformers' `DiffusionGemmaTextConfig.__post_init__` interprets it, and derives
everything per layer into `LayerSpec`s so the model code never re-derives a size (gpt-fast's
`ModelArgs.__post_init__` habit). Presets cover the published shape (for planning and memory math) and small
shapes for tests and CPU benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A checkpoint config that this implementation cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type: `default` rotates all dims, `proportional` only a fraction."""

    rope_type: str  # "default" | "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # SLIDING | FULL
    head_dim: int
    num_kv_heads: int
    has_v_proj: bool  # full-attention layers reuse the (un-normed) keys as values
    rope: RopeSpec

    @property
    def is_sliding(self) -> bool:
        return self.kind == SLIDING


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    canvas_length: int = 256
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    bos_token_id: int | None = 2
    hidden_activation: str = "gelu_pytorch_tanh"
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.layers) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layers)} entries but num_hidden_layers={self.num_layers}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k_experts={self.top_k} must be in [1, num_experts={self.num_experts}]")
        for i, spec in enumerate(self.layers):
            if self.num_heads % spec.num_kv_heads:
                raise ConfigError(
                    f"layer {i}: num_attention_heads={self.num_heads} is not a multiple of "
                    f"num_key_value_heads={spec.num_kv_heads}"
                )
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ConfigError(
                f"hidden_activation={self.hidden_activation!r}: only 'gelu_pytorch_tanh' is supported"
            )

    # -- derived sizes -------------------------------------------------------------------------------------
    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V one token adds to a full-attention cache (sliding layers are bounded)."""
        return sum(2 * s.num_kv_heads * s.head_dim * dtype_bytes for s in self.layers if not s.is_sliding)

    def sliding_kv_bytes(self, dtype_bytes: int = 2) -> int:
        """Fixed bytes of the sliding-window layers' caches of one sequence (window - 1 tokens)."""
        per_tok = sum(2 * s.num_kv_heads * s.head_dim * dtype_bytes for s in self.layers if s.is_sliding)
        return per_tok * (self.sliding_window - 1)

    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token-active parameters (embeddings counted once: the LM head is tied)."""
        d = self.hidden_size
        attn = 0
        for s in self.layers:
            q = d * self.num_heads * s.head_dim
            kv = d * s.num_kv_heads * s.head_dim * (2 if s.has_v_proj else 1)
            attn += 2 * q + kv
        dense = self.num_layers * 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        experts_total = self.num_layers * self.num_experts * expert
        experts_active = self.num_layers * self.top_k * expert
        embed = self.vocab_size * d
        self_cond = 3 * d * self.intermediate_size
        routers = self.num_layers * (self.num_experts * d)
        shared = embed + attn + dense + self_cond + routers
        return {
            "total": shared + experts_total,
            "active": shared + experts_active,
            "experts": experts_total,
            "non_expert": shared,
            "per_expert_all_layers": self.num_layers * expert,
        }

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict[str, Any], name: str = "checkpoint") -> ModelConfig:
        """Build from a DiffusionGemma `config.json` dict (top level with `text_config`)."""
        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        if model_type != "diffusion_gemma" and ARCHITECTURE not in archs:
            raise ConfigError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                f"blockserve serves model_type 'diffusion_gemma' ({ARCHITECTURE})"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(
                "config.json has no 'text_config' object (DiffusionGemma keeps the LM config there)"
            )
        return _text_config_to_model_config(text, canvas_length=config.get("canvas_length") or 256, name=name)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"no config.json at {file}")
        return cls.from_hf(json.loads(file.read_text()), name=path.name)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers writes for this shape (so from_pretrained can load it)."""
        layer_types = [s.kind for s in self.layers]
        per_layer = {}
        base = next((s for s in self.layers if s.is_sliding), self.layers[0])
        for i, s in enumerate(self.layers):
            if s.head_dim != base.head_dim or s.num_kv_heads != base.num_kv_heads:
                per_layer[str(i)] = {"head_dim": s.head_dim, "num_key_value_heads": s.num_kv_heads}
        full = next((s for s in self.layers if not s.is_sliding), None)
        rope = {SLIDING: _rope_dict(base.rope)}
        if full is not None:
            rope[FULL] = _rope_dict(full.rope)
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": base.num_kv_heads,
            "head_dim": base.head_dim,
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids[0]
            if len(self.eos_token_ids) == 1
            else list(self.eos_token_ids),
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
            "rope_parameters": rope,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "sliding_window": self.sliding_window,
            "layer_types": layer_types,
            "final_logit_softcapping": self.final_logit_softcapping,
            "use_bidirectional_attention": None,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "per_layer_config": per_layer,
            "initializer_range": 0.02,
        }
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": True,
            "text_config": text,
            "vision_config": TINY_VISION_CONFIG,
        }


# A minimal vision tower config so transformers can instantiate the class; blockserve serves text and skips it.
TINY_VISION_CONFIG = {
    "model_type": "gemma4_vision",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def _rope_dict(rope: RopeSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    if rope.factor != 1.0:
        out["factor"] = rope.factor
    return out


def _require(text: dict[str, Any], key: str) -> Any:
    if text.get(key) is None:
        raise ConfigError(f"text_config.{key} is missing; DiffusionGemma needs it")
    return text[key]


def _rope_spec(params: dict[str, Any] | None, kind: str) -> RopeSpec:
    defaults = {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    p = (params or {}).get(kind) or defaults[kind]
    rope_type = p.get("rope_type", "default")
    if rope_type not in ("default", "proportional"):
        raise ConfigError(
            f"text_config.rope_parameters.{kind}.rope_type={rope_type!r}: use default or proportional"
        )
    spec = RopeSpec(
        rope_type=rope_type,
        theta=float(p.get("rope_theta", defaults[kind]["rope_theta"])),
        partial_rotary_factor=float(p.get("partial_rotary_factor", 1.0)),
        factor=float(p.get("factor", 1.0)),
    )
    if spec.rope_type == "default" and (spec.partial_rotary_factor != 1.0 or spec.factor != 1.0):
        raise ConfigError(
            f"text_config.rope_parameters.{kind}: partial/scaled 'default' RoPE is not supported"
        )
    return spec


def _layer_types(text: dict[str, Any], num_layers: int) -> list[str]:
    types = text.get("layer_types")
    if types is None:  # transformers' default pattern: 5 sliding then 1 full
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    types = list(types)
    bad = [t for t in types if t not in (SLIDING, FULL)]
    if bad:
        raise ConfigError(f"text_config.layer_types has unknown entries {sorted(set(bad))}")
    if types and types[-1] != FULL:  # transformers forces the last layer to full attention
        types[-1] = FULL
    return types


def _text_config_to_model_config(text: dict[str, Any], canvas_length: int, name: str) -> ModelConfig:
    if text.get("use_bidirectional_attention") not in (None,):
        raise ConfigError(
            f"text_config.use_bidirectional_attention={text['use_bidirectional_attention']!r}: "
            "only causal encoders (null) are supported"
        )
    if text.get("attention_bias"):
        raise ConfigError("text_config.attention_bias=true is not supported")
    num_layers = int(_require(text, "num_hidden_layers"))
    num_heads = int(_require(text, "num_attention_heads"))
    types = _layer_types(text, num_layers)
    head_dim = int(text.get("head_dim") or _require(text, "hidden_size") // num_heads)
    kv_heads = int(text.get("num_key_value_heads") or num_heads)
    per_layer = text.get("per_layer_config")
    if per_layer is None:  # config written before per_layer_config: derive it as transformers does
        overrides = {"head_dim": int(text.get("global_head_dim", 512))}
        if text.get("num_global_key_value_heads") is not None:
            overrides["num_key_value_heads"] = int(text["num_global_key_value_heads"])
        per_layer = {str(i): overrides for i, t in enumerate(types) if t == FULL}
    layers = []
    for i, kind in enumerate(types):
        o = per_layer.get(str(i)) or per_layer.get(i) or {}
        layers.append(
            LayerSpec(
                kind=kind,
                head_dim=int(o.get("head_dim", head_dim)),
                num_kv_heads=int(o.get("num_key_value_heads", kv_heads)),
                has_v_proj=kind == SLIDING,
                rope=_rope_spec(text.get("rope_parameters"), kind),
            )
        )
    eos = text.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=int(_require(text, "vocab_size")),
        hidden_size=int(_require(text, "hidden_size")),
        intermediate_size=int(_require(text, "intermediate_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        layers=tuple(layers),
        sliding_window=int(text.get("sliding_window", 512)),
        num_experts=int(_require(text, "num_experts")),
        top_k=int(_require(text, "top_k_experts")),
        moe_intermediate_size=int(_require(text, "moe_intermediate_size")),
        canvas_length=int(canvas_length),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
        max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
        pad_token_id=int(text.get("pad_token_id") if text.get("pad_token_id") is not None else 0),
        eos_token_ids=eos_ids,
        bos_token_id=text.get("bos_token_id", 2),
        hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
        name=name,
    )


def _pattern(num_layers: int, every: int) -> list[str]:
    types = [SLIDING if (i + 1) % every else FULL for i in range(num_layers)]
    types[-1] = FULL
    return types


def build_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    layer_types: list[str],
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    global_head_dim: int,
    num_global_kv_heads: int,
    sliding_window: int,
    num_experts: int,
    top_k: int,
    moe_intermediate_size: int,
    canvas_length: int,
    name: str,
) -> ModelConfig:
    """Assemble a config from the handful of numbers that define a DiffusionGemma shape."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": len(layer_types),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "num_global_key_value_heads": num_global_kv_heads,
        "layer_types": layer_types,
        "sliding_window": sliding_window,
        "num_experts": num_experts,
        "top_k_experts": top_k,
        "moe_intermediate_size": moe_intermediate_size,
    }
    return _text_config_to_model_config(text, canvas_length=canvas_length, name=name)


def _presets() -> dict[str, ModelConfig]:
    return {
        # The published shape. Published: 30 layers, hidden 2816, 16 heads, vocab 262,144, 128 experts top-8,
        # canvas 256, 25.2B total / 3.8B active. Derived (not published here): head_dim 256 with 8 KV heads on
        # sliding layers, 512 with 2 KV heads on full layers (transformers' EP-plan comment says 2 global KV
        # heads), dense MLP 2112 and expert MLP 704 — the only integer sizes that reproduce both totals
        # (parameter_counts(): 25.2B total, 3.8B active); window 1024 as in Gemma-4.
        "diffusiongemma-26b-a4b": build_config(
            vocab_size=262_144,
            hidden_size=2816,
            intermediate_size=2112,
            layer_types=_pattern(30, 6),
            num_heads=16,
            head_dim=256,
            num_kv_heads=8,
            global_head_dim=512,
            num_global_kv_heads=2,
            sliding_window=1024,
            num_experts=128,
            top_k=8,
            moe_intermediate_size=704,
            canvas_length=256,
            name="diffusiongemma-26b-a4b",
        ),
        # Unit-test scale: every feature (both layer kinds, GQA, k=v, partial RoPE, MoE) in milliseconds.
        "tiny-test": build_config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            layer_types=[SLIDING, SLIDING, FULL],
            num_heads=4,
            head_dim=16,
            num_kv_heads=2,
            global_head_dim=32,
            num_global_kv_heads=1,
            sliding_window=8,
            num_experts=8,
            top_k=2,
            moe_intermediate_size=32,
            canvas_length=16,
            name="tiny-test",
        ),
        # CPU benchmark scale: the published vocabulary and canvas with a thin body, so sampler costs are real.
        "small-cpu": build_config(
            vocab_size=262_144,
            hidden_size=128,
            intermediate_size=256,
            layer_types=_pattern(6, 6),
            num_heads=4,
            head_dim=32,
            num_kv_heads=2,
            global_head_dim=64,
            num_global_kv_heads=1,
            sliding_window=128,
            num_experts=16,
            top_k=4,
            moe_intermediate_size=64,
            canvas_length=256,
            name="small-cpu",
        ),
    }


PRESETS = _presets()


def from_name(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
