"""Mixture-of-Experts as route -> dispatch -> experts -> combine (vLLM `fused_moe/modular_kernel.py` seams).

Shape legend: T tokens, K top-k, E experts held here, D hidden, I expert inner size.

- route:    router logits -> softmax -> top-k -> renormalise -> per-expert scale   ([T, K] weights and ids)
- dispatch: group the (token, slot) pairs by expert id, for the experts in one contiguous range
- experts:  gated GELU MLP of each hit expert over its tokens only
- combine:  weighted scatter-add back to [T, D]; partial sums from several ranges simply add up

`ExpertBank` holds experts [first, first + E) of one layer. A bank holding every expert is the fused mode; banks
on other processes (the ExpertShard deployment) each return a partial [T, D] that the caller sums — the seam
where a GPU kernel (vLLM `fused_experts`) can replace `ExpertBank.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.layers import Linear, RMSNorm, gelu_tanh, linear


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.scalar_root = hidden**-0.5
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.proj = Linear(hidden, num_experts)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] (the un-normed residual stream) -> weights [T, K] (fp32), ids [T, K]."""
        h = self.norm(x) * self.scale * self.scalar_root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # [T, E_all]
        weights, ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


@dataclass
class Dispatch:
    """(token, slot) pairs sorted by expert, restricted to one expert range."""

    token: torch.Tensor  # [N] token index of each pair
    slot: torch.Tensor  # [N] which of the K choices
    expert_counts: list[int]  # pairs per local expert, in order
    first: int


def dispatch(ids: torch.Tensor, first: int, count: int) -> Dispatch:
    """Group the top-k choices ids [T, K] that fall in experts [first, first + count)."""
    flat = ids.reshape(-1)  # [T*K]
    local = (flat >= first) & (flat < first + count)
    pair = local.nonzero().squeeze(-1)
    experts = flat[pair] - first
    order = torch.argsort(experts, stable=True)
    pair = pair[order]
    counts = torch.bincount(experts, minlength=count).tolist()
    K = ids.shape[1]
    return Dispatch(token=pair // K, slot=pair % K, expert_counts=counts, first=first)


class ExpertBank(nn.Module):
    """Experts [first, first + count) of one layer."""

    def __init__(self, hidden: int, inner: int, first: int, count: int):
        super().__init__()
        self.first, self.count, self.inner = first, count, inner
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * inner, hidden))  # [E, 2I, D]
        self.down_proj = nn.Parameter(torch.empty(count, hidden, inner))  # [E, D, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Partial MoE output [T, D] of this bank's experts for normed tokens x [T, D]."""
        d = dispatch(ids, self.first, self.count)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(d.expert_counts):
            if n == 0:
                continue
            tok = d.token[start : start + n]
            slot = d.slot[start : start + n]
            start += n
            gate, up = linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            y = linear(gelu_tanh(gate) * up, self.down_proj[e])  # [n, D]
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out


def moe_reference(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, bank: ExpertBank
) -> torch.Tensor:
    """Plain per-token loop over the top-k choices: the slow reference the tests hold `ExpertBank` to."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k]) - bank.first
            if not 0 <= e < bank.count:
                continue
            gate, up = (x[t] @ bank.gate_up_proj[e].T).chunk(2, dim=-1)
            out[t] += (gelu_tanh(gate) * up) @ bank.down_proj[e].T * weights[t, k]
    return out
