"""Dense building blocks of DiffusionGemma: RMSNorm, RoPE (default and proportional), attention, gated MLP.

Shape legend: B rows, T query tokens, S key tokens, H heads, G kv heads, d head dim, D hidden.

Numerics follow transformers' Gemma-4 / DiffusionGemma modules (norms in fp32, attention scale 1.0 because
q and k are RMS-normed, keys reused as values on full-attention layers) so fp32 logits match the reference
to ~1e-5. Masks are built from absolute positions, which is what lets one batched call serve rows with
different prefix lengths in both encoder (causal, windowed) and decoder (bidirectional) mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LayerSpec, ModelConfig
from model.kv_cache import LayerPrefix


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


# CPU GEMM kernels round differently for fewer than 4 rows (measured: n = 1..3 differ from the same rows
# inside a larger product, n >= 4 match bit for bit). On CPU, products are padded to at least this many rows so a
# token's result never depends on how many other tokens shared its matmul: batch-invariant outputs. GPU GEMMs
# choose algorithms by shape in other ways, so the padding would only cost time there and is not applied.
MIN_GEMM_ROWS = 8


def min_gemm_rows(device: torch.device) -> int:
    """Rows a GEMM is padded to on this device (1: no padding)."""
    return MIN_GEMM_ROWS if device.type == "cpu" else 1


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T, batch-invariant on CPU (see MIN_GEMM_ROWS)."""
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    pad = min_gemm_rows(flat.device) - n
    if pad > 0:
        out = F.linear(F.pad(flat, (0, 0, 0, pad)), weight)[:n]
    else:
        out = F.linear(flat, weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear without bias whose product is batch-invariant."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner)
        self.up_proj = Linear(hidden, inner)
        self.down_proj = Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(spec: LayerSpec) -> torch.Tensor:
    """Inverse frequencies, length d/2. Proportional RoPE rotates only the first fraction; the rest get 0."""
    d = spec.head_dim
    rope = spec.rope
    if rope.rope_type == "default":
        inv = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    else:
        angles = int(rope.partial_rotary_factor * d // 2)
        rotated = 1.0 / (rope.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / d))
        inv = torch.cat([rotated, torch.zeros(d // 2 - angles)])
    return inv / rope.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, T, d] for absolute positions [B, T]."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d]; rotate-half convention (pairs i and i + d/2)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.num_heads = config.num_heads
        d, D = spec.head_dim, config.hidden_size
        self.q_proj = Linear(D, config.num_heads * d)
        self.k_proj = Linear(D, spec.num_kv_heads * d)
        self.v_proj = Linear(D, spec.num_kv_heads * d) if spec.has_v_proj else None
        self.o_proj = Linear(config.num_heads * d, D)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """q [B, H, T, d], and the new tokens' k, v [B, G, T, d] as they are stored in the cache."""
        B, T, _ = x.shape
        d = self.spec.head_dim
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, d)), cos, sin)
        k_raw = self.k_proj(x).view(B, T, -1, d)
        v = self.v_proj(x).view(B, T, -1, d) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        v = self.v_norm(v)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        spans: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """q [B, H, T, d], k/v [B, G, S+T, d] over [padded prefix | new tokens], mask [B, T, S+T] bool -> [B, T, D].

        Rows of a batch are padded to a common length. Each row attends over its own valid queries and keys
        only — exactly the tensors a batch of one would see — so padding cannot change a row's rounding and a
        request's output does not depend on its batch-mates (varlen attention does the same on GPUs).
        `spans` gives each row's (valid prefix keys, valid new tokens) from host-side lengths, so selecting
        them needs no host sync; without it the valid entries are read from the mask (one sync per row)."""
        B, H, T, d = q.shape
        if B == 1:
            out = self._sdpa(q, k, v, mask)
        else:
            out = q.new_zeros(B, H, T, d)
            s_max = k.shape[2] - T
            for b in range(B):
                if spans is not None:  # slices of host-known sizes: no sync, no index upload
                    s, n = spans[b]
                    kb, vb = (_prefix_and_new(t[b : b + 1], s, s_max, n) for t in (k, v))
                    sub = torch.cat([mask[b, :n, :s], mask[b, :n, s_max : s_max + n]], dim=-1)[None]
                    out[b, :, :n] = self._sdpa(q[b : b + 1, :, :n], kb, vb, sub)[0]
                    continue
                qi = mask[b].any(1).nonzero().squeeze(1)  # valid queries  [T_b]
                ki = mask[b].any(0).nonzero().squeeze(1)  # keys some query sees  [S_b]
                sub = mask[b][qi][:, ki][None]
                out[b, :, qi] = self._sdpa(
                    q[b : b + 1, :, qi], k[b : b + 1, :, ki], v[b : b + 1, :, ki], sub
                )[0]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        groups = self.num_heads // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # Queries that see no key at all (pure padding) would produce NaN; give them one harmless key.
        mask = mask | ~mask.any(-1, keepdim=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=1.0)


def _prefix_and_new(t: torch.Tensor, s: int, s_max: int, n: int) -> torch.Tensor:
    """[1, G, S_max+T, d] over [padded prefix | new] -> the row's s valid prefix and n valid new entries."""
    return torch.cat([t[:, :, :s], t[:, :, s_max : s_max + n]], dim=2)


def attention_mask(
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    prefix: LayerPrefix | None,
    new_valid: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """Boolean [B, T, S+T] mask over [cached prefix | new tokens].

    Encoder (causal): a query at position p sees keys at positions in (p - window, p]. Decoder: every cached key
    the row has (the cache already holds only what the window needs) and every canvas position.
    """
    new_pos = q_pos  # new tokens' keys sit at the same positions as the queries
    if prefix is not None:
        k_pos = torch.cat([prefix.positions, new_pos], dim=1)  # [B, S+T]
        k_valid = torch.cat([prefix.valid, new_valid], dim=1)
    else:
        k_pos, k_valid = new_pos, new_valid
    mask = k_valid[:, None, :] & q_valid[:, :, None]  # [B, T, S+T]
    if causal:
        qp, kp = q_pos[:, :, None], k_pos[:, None, :]
        mask = mask & (kp <= qp)
        if window is not None:
            mask = mask & (kp > qp - window)
    return mask
