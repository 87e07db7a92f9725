"""Placement of expert shards on GPUs, and the roofline model behind `blockserve plan`.

Sizes come from the checkpoint's shapes (`ModelConfig.parameter_counts()`): bytes per expert (all layers),
bytes of everything else (embeddings, attention, dense MLPs, routers), and the KV/activation reserve the Engine
keeps. One GPU runs the Engine (attention, dense MLP, routers, KV cache); the other GPUs run ExpertShards. The
Engine's GPU may also hold a shard when it has room: the split is then uneven, chosen so that every GPU reads
about the same bytes per step.

Roofline model of one denoising step (stated so its numbers can be checked; no measurement behind them):
- A step runs B rows x L canvas tokens = T tokens through every layer. With top-k of E experts and T >= E, every
  expert of every layer is touched each step, so each GPU reads all the weights it holds once per step.
- Per GPU: time = max(bytes read / memory bandwidth, FLOPs / peak FLOP rate) (weights dominate at small B).
- Transfer: per layer each token goes to the shards its k choices fall in (S * (1 - (1 - 1/S)^k) of S even
  shards on average) and comes back: 2 * hidden * activation bytes per token and shard, over the link bandwidth.
- With two micro-batches in flight the Engine, the shards and the links work at the same time, so a step takes
  the slowest of the three plus one hop latency per layer per micro-batch (the pipeline's fill, never hidden).
- Fused (one GPU holds everything): time = max(all bytes / bandwidth, all FLOPs / peak).

`replication_plan` is the EPLB-style extension (DeepSeek's expert-parallel load balancer): from measured tokens
per expert, which hot experts to copy onto which shards so every shard serves about the same number of tokens.
The Engine does not route to replicas yet; the plan is advice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import ModelConfig


class PlacementError(ValueError):
    """A split or a set of GPUs that cannot hold the model; the message says what to change."""


def even_split(num_experts: int, shards: int) -> list[int]:
    """Experts per shard, as even as possible (the first shards take the remainder)."""
    if shards > num_experts:
        raise PlacementError(
            f"experts.shards={shards} is more than the model's {num_experts} experts; use at most {num_experts}"
        )
    base, extra = divmod(num_experts, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def ranges(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


@dataclass
class Hardware:
    gpus: int
    gpu_mem_bytes: float
    hbm_bytes_per_s: float = 3.35e12  # H100 SXM HBM3
    flops_per_s: float = 989e12  # H100 SXM dense bf16
    link_bytes_per_s: float = 450e9  # NVLink 4, one direction
    hop_latency_s: float = 20e-6  # one small GPU-to-GPU message (NCCL over NVLink), order of magnitude


@dataclass
class Workload:
    rows: int = 1  # canvases denoised together
    weight_bytes: float = 2.0  # bf16 = 2, fp8 = 1
    act_bytes: float = 2.0  # activations sent between GPUs
    kv_reserve_bytes: float = 16e9  # KV cache + activations kept free on the Engine's GPU
    shard_reserve_bytes: float = 4e9  # activations and workspace on a shard GPU


@dataclass
class GpuPlan:
    gpu: int
    role: str  # "engine", "engine+shard" or "shard"
    experts: range
    weight_bytes: float
    step_s: float


@dataclass
class Plan:
    config: ModelConfig
    hw: Hardware
    work: Workload
    gpus: list[GpuPlan] = field(default_factory=list)
    transfer_s: float = 0.0
    latency_s: float = 0.0
    step_s: float = 0.0
    fused_step_s: float | None = None  # None when the model does not fit one GPU

    @property
    def split(self) -> list[int]:
        return [len(g.experts) for g in self.gpus if len(g.experts)]


def _sizes(config: ModelConfig, work: Workload) -> tuple[float, float]:
    counts = config.parameter_counts()
    return counts["per_expert_all_layers"] * work.weight_bytes, counts["non_expert"] * work.weight_bytes


def _flops(config: ModelConfig, tokens: int, experts: int) -> tuple[float, float]:
    """(Engine FLOPs, FLOPs of `experts` experts) for one step of `tokens` tokens (2 per multiply-add)."""
    counts = config.parameter_counts()
    embed = config.vocab_size * config.hidden_size
    engine = 2 * tokens * (counts["non_expert"] - embed) + 2 * tokens * embed  # the LM head reads embed once
    pairs = tokens * config.top_k * experts / config.num_experts
    return engine, 2 * pairs * counts["per_expert_all_layers"]


def _gpu_time(hw: Hardware, bytes_read: float, flops: float) -> float:
    return max(bytes_read / hw.hbm_bytes_per_s, flops / hw.flops_per_s)


def _balance(config: ModelConfig, hw: Hardware, work: Workload) -> list[int]:
    """Experts on the Engine GPU (first) and each shard GPU, so that each reads about the same bytes."""
    E = config.num_experts
    expert_b, engine_b = _sizes(config, work)
    shard_gpus = hw.gpus - 1
    engine_room = int((hw.gpu_mem_bytes - engine_b - work.kv_reserve_bytes) // expert_b)
    if engine_room < 0:
        raise PlacementError(
            f"the Engine needs {(engine_b + work.kv_reserve_bytes) / 1e9:.1f} GB (weights + KV reserve) but a GPU "
            f"has {hw.gpu_mem_bytes / 1e9:.1f} GB; use larger GPUs, fp8 weights or a smaller KV reserve"
        )
    shard_room = int((hw.gpu_mem_bytes - work.shard_reserve_bytes) // expert_b)
    target = (engine_b + E * expert_b) / hw.gpus  # equal bytes per GPU
    on_engine = min(engine_room, max(0, round((target - engine_b) / expert_b)))
    if shard_gpus == 0:
        on_engine = E
    rest = E - on_engine
    sizes = even_split(rest, shard_gpus) if shard_gpus and rest else [0] * shard_gpus
    if on_engine > engine_room or any(n > shard_room for n in sizes):
        raise PlacementError(
            f"{E} experts of {expert_b / 1e9:.2f} GB do not fit {hw.gpus} GPUs of {hw.gpu_mem_bytes / 1e9:.0f} GB "
            f"(room for {shard_room} per shard GPU, {engine_room} beside the Engine); add GPUs or use fp8"
        )
    return [on_engine, *sizes]


def plan(config: ModelConfig, hw: Hardware, work: Workload | None = None) -> Plan:
    work = work or Workload()
    if hw.gpus < 1:
        raise PlacementError(f"--gpus={hw.gpus}: need at least one GPU")
    expert_b, engine_b = _sizes(config, work)
    tokens = work.rows * config.canvas_length
    sizes = _balance(config, hw, work)
    out = Plan(config, hw, work)
    start = 0
    for gpu, n in enumerate(sizes):
        held = range(start, start + n)
        start += n
        engine_flops, expert_flops = _flops(config, tokens, n)
        if gpu == 0:
            role = "engine+shard" if n else "engine"
            bytes_read, flops = engine_b + n * expert_b, engine_flops + expert_flops
        else:
            role, bytes_read, flops = "shard", n * expert_b, expert_flops
        out.gpus.append(GpuPlan(gpu, role, held, bytes_read, _gpu_time(hw, bytes_read, flops)))
    shards = len([n for n in sizes if n])
    remote = len([n for n in sizes[1:] if n])
    if remote:
        k = config.top_k
        per_token = shards * (1 - (1 - 1 / shards) ** k) * remote / shards  # remote shards hit per token
        moved = 2 * tokens * per_token * config.hidden_size * work.act_bytes * config.num_layers
        out.transfer_s = moved / hw.link_bytes_per_s
        out.latency_s = 2 * config.num_layers * hw.hop_latency_s  # two micro-batches, one hop per layer each
    out.step_s = max(max(g.step_s for g in out.gpus), out.transfer_s) + out.latency_s
    total_b = engine_b + config.num_experts * expert_b
    if total_b + work.kv_reserve_bytes <= hw.gpu_mem_bytes:
        engine_flops, expert_flops = _flops(config, tokens, config.num_experts)
        out.fused_step_s = _gpu_time(hw, total_b, engine_flops + expert_flops)
    return out


def format_plan(p: Plan) -> str:
    c, hw, w = p.config, p.hw, p.work
    expert_b, engine_b = _sizes(c, w)
    lines = [
        f"model {c.name}: {c.num_experts} experts x {c.num_layers} layers, {expert_b / 1e6:.1f} MB per expert "
        f"(all layers), {engine_b / 1e9:.2f} GB non-expert, weights {w.weight_bytes:g} B/param",
        f"hardware: {hw.gpus} GPUs x {hw.gpu_mem_bytes / 1e9:.0f} GB, {hw.hbm_bytes_per_s / 1e12:.2f} TB/s, "
        f"{hw.flops_per_s / 1e12:.0f} TFLOP/s, link {hw.link_bytes_per_s / 1e9:.0f} GB/s, "
        f"hop {hw.hop_latency_s * 1e6:.0f} us; {w.rows} row(s) x {c.canvas_length} canvas tokens per step",
        "",
        "gpu  role          experts      weights GB  step ms",
    ]
    for g in p.gpus:
        held = f"[{g.experts.start}, {g.experts.stop})" if len(g.experts) else "-"
        lines.append(
            f"{g.gpu:<4} {g.role:<13} {held:<12} {g.weight_bytes / 1e9:>10.2f}  {g.step_s * 1e3:>7.3f}"
        )
    lines += [
        "",
        f"experts.split: {p.split}",
        f"transfer per step: {p.transfer_s * 1e3:.3f} ms (hidden behind compute with 2 micro-batches in flight)",
        f"hop latency per step: {p.latency_s * 1e3:.3f} ms",
        f"estimated step (disaggregated): {p.step_s * 1e3:.3f} ms",
    ]
    if p.fused_step_s is not None:
        lines.append(
            f"estimated step (fused, one GPU): {p.fused_step_s * 1e3:.3f} ms -> "
            f"{p.fused_step_s / p.step_s:.2f}x faster disaggregated"
        )
    else:
        lines.append("fused on one GPU: does not fit")
    return "\n".join(lines)


@dataclass
class Replica:
    layer: int
    expert: int
    home: int  # shard that holds the expert
    to: int  # shard that would hold the copy


def replication_plan(load: list[list[int]], sizes: list[int], spare_per_shard: int = 1) -> list[Replica]:
    """EPLB-style: per layer, copy the hottest experts of the busiest shards onto the least busy ones (at most
    `spare_per_shard` copies per shard per layer), assuming a copied expert's tokens then split evenly."""
    bounds = ranges(sizes)
    out: list[Replica] = []
    for layer, counts in enumerate(load):
        shard_load = [float(sum(counts[r.start : r.stop])) for r in bounds]
        room = [spare_per_shard] * len(bounds)
        hot = sorted(range(len(counts)), key=lambda e: -counts[e])
        for e in hot:
            home = next(i for i, r in enumerate(bounds) if e in r)
            candidates = [i for i in range(len(bounds)) if i != home and room[i] > 0]
            if not candidates:
                break
            to = min(candidates, key=lambda i: shard_load[i])
            moved = counts[e] / 2
            if shard_load[to] + moved >= shard_load[home]:  # no longer helps the busiest shard
                continue
            shard_load[home] -= moved
            shard_load[to] += moved
            room[to] -= 1
            out.append(Replica(layer, e, home, to))
    return out
