"""Pieces of exact categorical draws shared by the sampler (model/sampling/sampler.py) and the joint
constraints (model/structured/decode.py): one home for the exp floor and for the inverse-CDF pick.

Shape legend: K weights of one draw; `...` any leading shape.
"""

from __future__ import annotations

import torch

# float32 exp(x) of x below ~-87.3 (a subnormal or zero result) leaves the vectorised CPU kernel: measured
# 20-50x slower per element, and a peaked distribution puts most of the vocabulary there.
EXP_FLOOR = -87.0  # e^-87 ~ 1.6e-38, the smallest normal float32 is ~1.2e-38
_EXP_AT_FLOOR: list[float] = []


def exp_at_floor() -> float:
    """float32 exp(EXP_FLOOR) as the CPU's vectorised exp computes it (made once). exp is increasing and its
    float32 results for EXP_FLOOR and the next float above it differ (by ~7.6e-6 relative, far more than exp's
    1-ulp error), so after clamping x to EXP_FLOOR, exp(x) <= this value exactly where x was clamped."""
    if not _EXP_AT_FLOOR:
        _EXP_AT_FLOOR.append(torch.exp(torch.full((64,), EXP_FLOOR))[0].item())
    return _EXP_AT_FLOOR[0]


def pick_from_cdf(cdf: torch.Tensor, target: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """Index [..., 1] of the first entry of the cumulative sums cdf [..., K] (non-decreasing, total last) that
    exceeds target [..., 1] (uniform x total). An entry of zero weight owns an empty interval, so it is never
    picked; a target rounded up to the total itself is clamped to the last entry with weight. `total`: the
    caller's contiguous copy of cdf[..., -1:], when it has one (saves making another)."""
    pick = torch.searchsorted(cdf, target, right=True)
    total = cdf[..., -1:].contiguous() if total is None else total
    last = torch.searchsorted(cdf, total, right=False)  # the first index reaching the total
    return torch.minimum(pick, last)
