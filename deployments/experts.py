"""Experts on other processes: the `ExpertShard` (holds experts [a, b) of every layer) and the Engine's side of
the split, `ShardedExperts` (a `moe_backend` for model/transformer.py).

Shape legend: T tokens of one MoE call, T_s tokens routed to one shard, K top-k, D hidden, E experts.

The MoE pipeline of model/moe.py (route -> dispatch -> experts -> combine) is cut between dispatch and
experts: the Engine routes, sends each shard only the tokens with at least one choice in its range (all shards
at once), and sums the partial outputs. Each shard runs the same `ExpertBank.forward` the fused model runs, so
a token's contribution from each expert is computed bit for bit as in fused mode. The partial sums are added in
shard order, which reproduces fused mode's accumulation exactly when a token's choices are at most two (top-2,
as in the test and default models); with top-k > 2 two choices on one shard are summed before a third from
another, so outputs may differ from fused mode at float rounding.

Plain classes: no Ray here. The transport (a Ray actor call or a Serve handle call per shard per layer) is a
`ShardClient` given by the caller (deployments/shard_client.py); cluster/ applies Serve.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from model import gemm
from model.kv_cache import PrefixBatch
from model.moe import counting
from model.weights import load_expert_banks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExpertShardSettings:
    model_path: str
    first: int  # experts [first, stop) of every layer
    stop: int
    shard: int = 0  # index of this shard in the plan (names, stats)
    dtype: str = "float32"
    device: str = "cpu"
    torch_threads: int = 0  # 0: leave torch's default
    gemm_kernels: str = "batch_invariant"  # model/gemm.py KINDS


def _tensor(a: np.ndarray) -> torch.Tensor:
    # Ray hands numpy arguments over as read-only zero-copy views; they are only read here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _wire(t: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array a shard call carries. numpy has no bfloat16: a bf16 tensor travels as its
    16-bit patterns (int16), which `_unwire` reads back as bf16 (both ends run the model in the same dtype)."""
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _unwire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A `_wire` array back as a tensor of the receiver's model `dtype` (bf16 from its int16 patterns)."""
    t = _tensor(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 and t.dtype == torch.int16 else t


class ExpertShard:
    """Experts [first, stop) of every layer; stateless apart from load statistics, so replicas are
    interchangeable and may be added or removed at any time."""

    def __init__(self, settings: ExpertShardSettings):
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        gemm.configure(settings.device, settings.gemm_kernels)  # before the first product (model/gemm.py)
        self.experts = range(settings.first, settings.stop)
        self.config, self.banks = load_expert_banks(
            settings.model_path, self.experts, dtype=DTYPES[settings.dtype], device=settings.device
        )
        self.load = torch.zeros(self.config.num_layers, len(self.experts), dtype=torch.long)  # [layers, E]
        self.calls = 0
        self.tokens = 0
        self.compute_s = 0.0
        self._lock = threading.Lock()

    @torch.no_grad()
    def forward(
        self, layer: int, x: np.ndarray, weights: np.ndarray, ids: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """Partial MoE output [T_s, D] of this shard's experts for normed tokens x [T_s, D] with routing
        weights / global expert ids [T_s, K]; also the seconds spent computing (for the step-time split)."""
        t0 = time.perf_counter()
        bank = self.banks[layer]
        device = bank.down_proj.device
        x_t = _unwire(x, bank.down_proj.dtype).to(device)
        ids_t = _tensor(ids).to(device=device, dtype=torch.long)
        out = _wire(bank(x_t, _tensor(weights).to(device), ids_t))  # [T_s, D]
        seconds = time.perf_counter() - t0  # the copy back waited for the device: compute included
        # the load is counted from the host's copy of the ids: no device work and no extra sync
        local = ids.astype(np.int64, copy=False) - self.experts.start
        counts = np.bincount(local[(local >= 0) & (local < len(self.experts))], minlength=len(self.experts))
        with self._lock:
            self.load[layer] += torch.from_numpy(counts)
            self.calls += 1
            self.tokens += x.shape[0]
            self.compute_s += seconds
        return out, seconds

    def ready(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"shard": self.settings.shard, "first": self.experts.start, "stop": self.experts.stop}

    def stats(self) -> dict[str, Any]:
        """Running totals, and tokens routed to each expert of each layer (`expert_load[layer][e - first]`)."""
        with self._lock:
            return {
                "shard": self.settings.shard,
                "first": self.experts.start,
                "stop": self.experts.stop,
                "calls": self.calls,
                "tokens": self.tokens,
                "compute_s": self.compute_s,
                "expert_load": self.load.tolist(),
            }


class ShardClient(Protocol):
    """One shard's transport: start a call, then wait for it (calls to different shards run concurrently)."""

    def submit(self, layer: int, x: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> Any: ...

    def result(self, call: Any) -> tuple[np.ndarray, float]: ...

    def ready(self) -> bool: ...


class ShardsUnavailable(RuntimeError):
    """No replica of a shard answered in time; requests in flight should fail with UNAVAILABLE."""


@dataclass
class StepTimes:
    """Seconds spent in each part of the disaggregated MoE, summed over calls (micro-batches overlap, so the
    parts of concurrent calls add up to more than the wall time)."""

    dispatch: float = 0.0  # Engine: pick each shard's tokens, hand them to the transport
    wait: float = 0.0  # Engine: waiting for the shards (their compute + the transfer both ways)
    expert_compute: float = 0.0  # shards: ExpertBank.forward (the slowest shard of each call)
    combine: float = 0.0  # Engine: add the partial outputs
    calls: int = 0  # MoE calls (one per layer per micro-batch)
    hops: int = 0  # shard round trips

    @property
    def transfer(self) -> float:
        return max(0.0, self.wait - self.expert_compute)

    def as_dict(self) -> dict[str, float]:
        return {
            "dispatch_s": self.dispatch,
            "expert_compute_s": self.expert_compute,
            "transfer_s": self.transfer,
            "combine_s": self.combine,
            "moe_calls": float(self.calls),
            "shard_hops": float(self.hops),
        }


@dataclass
class ShardedExperts:
    """The Engine's MoE backend in disaggregated mode: (layer, x [T, D], weights [T, K], ids [T, K]) -> [T, D]."""

    ranges: list[range]
    clients: list[ShardClient]
    num_layers: int
    times: StepTimes = field(default_factory=StepTimes)

    def __post_init__(self):
        E = self.ranges[-1].stop
        self.load = torch.zeros(self.num_layers, E, dtype=torch.long)  # [layers, E] tokens routed per expert
        self._lock = threading.Lock()
        # per shard: [calls, tokens sent, seconds computing], running totals (read by traced steps)
        self._per_shard = [[0, 0, 0.0] for _ in self.ranges]

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        counts = torch.bincount(ids.reshape(-1), minlength=self.load.shape[1]).cpu()
        x_np, w_np, ids_np = _wire(x), _wire(weights), ids.cpu().int().numpy()
        calls = []
        for shard, (r, client) in enumerate(zip(self.ranges, self.clients, strict=True)):
            hit = ((ids >= r.start) & (ids < r.stop)).any(-1).nonzero().squeeze(-1).cpu()  # [T_s]
            if hit.numel():
                sel = hit.numpy()
                calls.append((shard, hit, client, client.submit(layer, x_np[sel], w_np[sel], ids_np[sel])))
        t1 = time.perf_counter()
        results = [(shard, hit, client.result(call)) for shard, hit, client, call in calls]
        t2 = time.perf_counter()
        out = torch.zeros_like(x)
        for _, hit, (partial, _) in results:  # shard order == expert order: see the module docstring
            out.index_add_(0, hit.to(x.device), _unwire(partial, x.dtype).to(device=x.device, dtype=x.dtype))
        t3 = time.perf_counter()
        with self._lock:
            self.load[layer] += counts
            tm = self.times
            tm.dispatch += t1 - t0
            tm.wait += t2 - t1
            tm.expert_compute += max((seconds for _, _, (_, seconds) in results), default=0.0)
            tm.combine += t3 - t2
            tm.calls += 1
            tm.hops += len(calls)
            for shard, hit, (_, seconds) in results:
                totals = self._per_shard[shard]
                totals[0] += 1
                totals[1] += hit.numel()
                totals[2] += seconds
        return out

    def shard_totals(self) -> list[tuple[int, int, int, int, float]]:
        """Per shard (first expert, stop, calls, tokens sent, seconds computing), running totals."""
        with self._lock:
            return [(r.start, r.stop, *t) for r, t in zip(self.ranges, self._per_shard, strict=True)]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.times.as_dict(), "expert_load": self.load.tolist()}


class LocalExperts:
    """Fused mode's MoE backend: the model's own expert banks, plus the same per-expert load counts the
    disaggregated backend keeps (so expert load is observable in both modes)."""

    def __init__(self, model: torch.nn.Module):
        self.banks = [layer.experts for layer in model.layers]
        E = model.config.num_experts
        # counted on the model's device: a step reads nothing back for it (and a CUDA graph replays the count)
        self.load = torch.zeros(len(self.banks), E, dtype=torch.long, device=model.device)  # [layers, E]

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        self.load[layer].index_add_(0, flat, counting(flat.shape[0], flat.device, ones=True))
        return self.banks[layer](x, weights, ids)

    def stats(self) -> dict[str, Any]:
        return {"expert_load": self.load.tolist()}  # a snapshot; a step in flight may be partly counted


class _MicroBatches:
    """`model.denoise` over row micro-batches run concurrently, so while one micro-batch waits for the shards
    (the thread sleeps in the transport, the GIL released) another computes attention. Rows are independent and
    the kernels batch-invariant, so the output equals one call over all rows."""

    def __init__(self, denoise, parts: int):
        self.denoise, self.parts = denoise, parts
        self.pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="blockserve-microbatch")
        self._key: tuple | None = None
        self._prefixes: list = []

    def _split_prefix(self, prefix, bounds: list[tuple[int, int]]) -> list:
        # the prefix a micro-batch would get from the scheduler: built from its rows' caches, cached per batch
        key = (id(prefix), tuple(bounds))
        if key != self._key:
            self._key = key
            self._prefixes = [PrefixBatch(prefix.caches[a:b]) for a, b in bounds]
        return self._prefixes

    def _run(self, canvas, prefix, soft):
        with torch.no_grad():  # grad mode is per thread
            return self.denoise(canvas, prefix, soft)

    def __call__(self, canvas: torch.Tensor, prefix, soft: torch.Tensor | None = None) -> torch.Tensor:
        B = canvas.shape[0]
        n = min(self.parts, B)
        if n < 2 or not hasattr(prefix, "caches"):
            return self.denoise(canvas, prefix, soft)
        edges = [B * i // n for i in range(n + 1)]
        bounds = list(itertools.pairwise(edges))
        prefixes = self._split_prefix(prefix, bounds)
        jobs = [
            (canvas[a:b], p, soft[a:b] if soft is not None else None)
            for (a, b), p in zip(bounds, prefixes, strict=True)
        ]
        futures = [self.pool.submit(self._run, *job) for job in jobs[1:]]
        first = self._run(*jobs[0])
        return torch.cat([first] + [f.result() for f in futures])  # [B, L, D]


def micro_batched(model: torch.nn.Module, parts: int) -> None:
    """Make `model.denoise` run `parts` row micro-batches in flight (no-op for parts < 2)."""
    if parts >= 2:
        model.denoise = _MicroBatches(model.denoise, parts)
