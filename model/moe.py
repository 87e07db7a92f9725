"""Mixture-of-Experts as route -> dispatch -> experts -> combine (vLLM `fused_moe/modular_kernel.py` seams).

Shape legend: T tokens, K top-k, P = T*K (token, choice) pairs, E experts held here, D hidden, I expert inner
size, N rows of the expert-sorted (padded) layout.

- route:    router logits -> softmax -> top-k -> renormalise -> per-expert scale   ([T, K] weights and ids)
- dispatch: sort the pairs by expert id into one row layout, each expert's rows contiguous (`GroupedLayout`);
            pairs routed outside this bank's range go to a dump row and contribute exactly zero
- experts:  gated GELU MLP of every expert over its rows at once: one grouped GEMM per projection
            (`torch._grouped_mm`) where the device supports it, else one GEMM per non-empty expert
- combine:  each pair's output times its weight, summed over the K choices in a fixed order; partial sums from
            several banks (ExpertShards) simply add up

No Python loop over experts and no host sync on the grouped path: the layout is built with device ops and an
upper bound on its size. On CPU every non-empty expert's group is padded to a multiple of `MIN_GEMM_ROWS` rows,
because CPU GEMMs round rows that end up in a block of 1-3 rows differently from the same rows inside a larger
product (model/layers.py); with the padding a token's result does not depend on how many other tokens chose its
expert (batch-invariant outputs).

`ExpertBank` holds experts [first, first + E) of one layer. A bank holding every expert is the fused mode; banks
on other processes (the ExpertShard deployment) each return a partial [T, D] that the caller sums.
`ExpertBank.forward` (or `grouped_experts`) is the seam where a GPU kernel (vLLM `fused_experts`) can replace it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import gemm
from model.layers import Linear, RMSNorm, gelu_tanh, min_gemm_rows

log = logging.getLogger("blockserve.moe")


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
    """(token, slot) pairs sorted by expert, restricted to one expert range (host-side view, for inspection)."""

    token: torch.Tensor  # [N] token index of each pair
    slot: torch.Tensor  # [N] which of the K choices
    expert_counts: list[int]  # pairs per local expert, in order
    first: int


def dispatch(ids: torch.Tensor, first: int, count: int) -> Dispatch:
    """Group the top-k choices ids [T, K] that fall in experts [first, first + count). Syncs with the host;
    the serving path uses `grouped_layout` instead."""
    flat = ids.reshape(-1)  # [P]
    local = (flat >= first) & (flat < first + count)
    pair = local.nonzero().squeeze(-1)
    experts = flat[pair] - first
    order = torch.argsort(experts, stable=True)
    pair = pair[order]
    counts = torch.bincount(experts, minlength=count).tolist()
    K = ids.shape[1]
    return Dispatch(token=pair // K, slot=pair % K, expert_counts=counts, first=first)


@dataclass
class GroupedLayout:
    """Where each (token, choice) pair sits in the expert-sorted row layout. Built without host syncs."""

    source: torch.Tensor  # [N + 1] token feeding each row; T (a zero row) for padding and the dump row
    row_of_pair: torch.Tensor  # [P] the row holding each pair's output; the dump row N for other banks' pairs
    local: torch.Tensor | None  # [P] bool: the pair chose one of this bank's experts; None: every pair did
    offsets: torch.Tensor  # [E] int32 cumulative row ends of each expert's group (torch._grouped_mm `offs`)


# Largest pairs x groups for which the layout ranks pairs with a [P, E + 1] running count instead of a sort: a
# handful of ops instead of a couple dozen (each op costs microseconds on CPU). Both give the same integers.
COUNTING_LAYOUT_ELEMENTS = 1 << 16


def grouped_layout(
    ids: torch.Tensor, first: int, count: int, min_rows: int, whole: bool = False
) -> GroupedLayout:
    """Sort pairs ids [T, K] by expert; each non-empty group is padded to a multiple of `min_rows` rows. `whole`: the
    bank holds every expert the router can choose (no pair goes elsewhere)."""
    T, K = ids.shape
    P = T * K
    e = ids.reshape(-1) - first if first else ids.reshape(-1)  # [P]
    local = None if whole else (e >= 0) & (e < count)
    if local is not None:
        e = torch.where(local, e, count)  # other banks' pairs sort after every local group
    groups = count + (local is not None)
    rows = P + count * (min_rows - 1)  # upper bound on the padded layout; row `rows` is the dump row
    if P * groups <= COUNTING_LAYOUT_ELEMENTS:
        row_of_pair, ends = _counted_rows(e, groups, count, min_rows)
    else:
        row_of_pair, ends = _sorted_rows(e, groups, count, min_rows)
    if local is not None:
        row_of_pair = torch.where(local, row_of_pair, rows)
    source = torch.full((rows + 1,), T, dtype=torch.long, device=ids.device)
    source[row_of_pair] = counting(P, ids.device, K)  # pair p comes from token p // K
    if local is not None:
        source[rows] = T  # several foreign pairs may have written the dump row: it reads the zero row
    return GroupedLayout(source, row_of_pair, local, ends[:count].to(torch.int32))


def _padded_sizes(counts: torch.Tensor, count: int, min_rows: int) -> torch.Tensor:
    """Rows of each group [groups]: its pairs, padded to a multiple of `min_rows`; none for foreign pairs."""
    if min_rows == 1:
        padded = counts.clone()  # written below: never the caller's tensor
    else:
        padded = (counts + (min_rows - 1)).div(min_rows, rounding_mode="floor") * min_rows
    if padded.shape[0] > count:
        padded[count] = 0
    return padded


def _counted_rows(e: torch.Tensor, groups: int, count: int, min_rows: int):
    """(row of each pair [P], group row ends [groups]) from a running count of each group's pairs."""
    seen = (e[:, None] == torch.arange(groups, device=e.device)).cumsum(0)  # [P, groups] pairs so far
    padded = _padded_sizes(seen[-1], count, min_rows)
    ends = torch.cumsum(padded, 0)
    # a pair's rank among its group's pairs in pair (token) order, from the group's first row
    first_row = ends - padded - 1
    return first_row[e] + seen.gather(1, e[:, None])[:, 0], ends


def _sorted_rows(e: torch.Tensor, groups: int, count: int, min_rows: int):
    """(row of each pair [P], group row ends [groups]) from a stable sort of the pairs by group."""
    P = e.shape[0]
    order = torch.argsort(e, stable=True)  # [P] pair ids, grouped by expert, token order within a group
    # counted by a scatter-add, not bincount: bincount reads its input's max back to the host (a device sync)
    counts = torch.zeros(groups, dtype=torch.long, device=e.device).index_add_(
        0, e, counting(P, e.device, ones=True)
    )  # [groups]
    padded = _padded_sizes(counts, count, min_rows)
    ends = torch.cumsum(padded, 0)
    # the pair at sorted position i of group g goes to row (ends[g] - padded[g]) + (i - where g's pairs start in
    # `order`, cumsum(counts)[g] - counts[g]): i plus a per-group shift (integers, exact in any order)
    shift = ends - padded - torch.cumsum(counts, 0) + counts  # [groups]
    row_sorted = counting(P, e.device) + shift[e[order]]
    return torch.empty_like(row_sorted).scatter_(0, order, row_sorted), ends


# Index constants of the layout (0, 1, 2, ...; p // K; ones; the Engine's expert-load count uses the ones too), one
# tensor per device and kind grown as needed and sliced: made once instead of by a kernel or two per layer per step. A grown tensor keeps the one before it
# alive, so a CUDA graph captured while reading it never reads freed memory.
_COUNTING: dict[tuple, list[torch.Tensor]] = {}


def counting(n: int, device: torch.device, per: int = 1, ones: bool = False) -> torch.Tensor:
    """[n] long: 0, 1, ..., n - 1 floor-divided by `per` (or all ones), a view of a kept tensor."""
    key = (str(device), per, ones)
    kept = _COUNTING.setdefault(key, [])
    if not kept or kept[-1].shape[0] < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # captured, the kernels that fill it would not run until a replay: an eager read would see garbage
            raise RuntimeError(
                "MoE index constants grow outside a CUDA graph capture (an eager step comes first)"
            )
        size = max(n, 2 * kept[-1].shape[0] if kept else 1 << 14)
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            if ones:
                kept.append(torch.ones(size, dtype=torch.long, device=device))
            else:
                kept.append(torch.div(torch.arange(size, device=device), per, rounding_mode="floor"))
    return kept[-1][:n]


def syncless(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the experts of a `dtype` model on `device` run without reading group sizes back to the host (one
    grouped kernel per projection, the invariant one or `torch._grouped_mm`): what a CUDA graph can hold."""
    return gemm.kernel_for(device, dtype) or grouped_mm_supported(device, dtype)


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs here and agrees with a plain GEMM (checked once per device and dtype).
    CUDA kernels need sm90 (H100/H200) and bfloat16; torch 2.13 also runs it on CPU for fp32 and bf16."""
    key = (str(device), dtype)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(torch.device(device), dtype)
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda" and (
        torch.cuda.get_device_capability(device) < (9, 0) or dtype != torch.bfloat16
    ):
        return False
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, 32, generator=g).to(device, dtype)
        w = torch.randn(2, 16, 32, generator=g).to(device, dtype)
        offs = torch.tensor([8, 24], dtype=torch.int32, device=device)
        got = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        want = torch.cat([x[:8] @ w[0].T, x[8:] @ w[1].T])
        return bool(torch.allclose(got.float(), want.float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, grouped: bool
) -> torch.Tensor:
    """Rows x [N, Din] of expert groups ending at offsets [E] times weight [E, Dout, Din].T -> [N, Dout].
    Rows past the last group are left undefined (the caller never reads them)."""
    if gemm.invariant(x):  # a GPU's batch-invariant grouped kernel (model/gemm.py)
        return gemm.grouped(x, weight, offsets)
    if grouped:
        try:
            return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        except torch.cuda.OutOfMemoryError:
            raise  # memory, not a shape: the step fails and the engine reports it; the kernel stays in use
        except RuntimeError as e:  # a shape the kernel rejects (alignment): fall back from now on, and say so
            _GROUPED_MM_OK[(str(x.device), x.dtype)] = False
            log.warning("torch._grouped_mm failed (%s); using one GEMM per expert", e)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):  # fallback: one host sync, one GEMM per non-empty expert
        if end > start:
            out[start:end] = F.linear(x[start:end], weight[e])
        start = end
    return out


def grouped_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    first: int,
    whole: bool = False,
) -> torch.Tensor:
    """One bank's weighted expert outputs [T, D] for tokens x [T, D] with routing weights / ids [T, K]; experts
    [first, first + E) with gate_up_proj [E, 2I, D] and down_proj [E, D, I]. Pairs routed elsewhere add 0.
    `whole`: the bank holds every expert (no pair goes elsewhere: the masking of foreign pairs is skipped)."""
    T, D = x.shape
    K = ids.shape[1]
    count = gate_up_proj.shape[0]
    if count == 0 or T == 0:
        return torch.zeros_like(x)
    layout = grouped_layout(ids, first, count, min_gemm_rows(x.device), whole)
    grouped = not gemm.invariant(x) and grouped_mm_supported(x.device, x.dtype)
    rows = F.pad(x, (0, 0, 0, 1)).index_select(0, layout.source)  # [N + 1, D]; row T is the zero row
    gate, up = _grouped_linear(rows, gate_up_proj, layout.offsets, grouped).chunk(2, dim=-1)  # [N + 1, I]
    y = _grouped_linear(gelu_tanh(gate) * up, down_proj, layout.offsets, grouped)  # [N + 1, D]
    per_pair = y.index_select(0, layout.row_of_pair) * weights.reshape(-1, 1)  # [P, D] fp32
    if layout.local is not None:
        # `where`, not a product: rows outside every group are uninitialised and may hold NaN
        per_pair = torch.where(layout.local[:, None], per_pair, 0.0)
    out = per_pair.view(T, K, D).sum(1)  # combine in a fixed order: choice 0, 1, ...
    return out if out.dtype == x.dtype else out.to(x.dtype)


class ExpertBank(nn.Module):
    """Experts [first, first + count) of one layer. `total`: how many experts the router chooses from, when
    known (a bank holding all of them skips the masking of pairs routed elsewhere)."""

    def __init__(self, hidden: int, inner: int, first: int, count: int, total: int | None = None):
        super().__init__()
        self.first, self.count, self.inner = first, count, inner
        self.whole = total is not None and first == 0 and count == total
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * inner, hidden))  # [E, 2I, D]
        self.down_proj = nn.Parameter(torch.empty(count, hidden, inner))  # [E, D, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Partial MoE output [T, D] of this bank's experts for normed tokens x [T, D]."""
        return grouped_experts(x, weights, ids, self.gate_up_proj, self.down_proj, self.first, self.whole)


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
