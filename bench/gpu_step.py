"""The published DiffusionGemma shape on one GPU through the serving engine: ms per step, tokens/s, memory,
bandwidth; and the engine's token-identity checks on that GPU.

Command (on a GPU node, from the repo root; ~3 minutes on an H200, a minute of it building 50 GB of weights):

    .venv/bin/python bench/gpu_step.py                      # checks, then rows 1,4,16,32,64, published shape, bf16
    .venv/bin/python bench/gpu_step.py --rows 1,8 --steps 10 --prefix 2048 --no-checks

No checkpoint is needed: the published shape (30 layers, hidden 2816, 128 experts top-8, vocab 262,144, canvas
256; `model.config` preset `diffusiongemma-26b-a4b`) is built with random bf16 weights directly on the GPU.

1. Checks (tiny random models, seconds): 16 requests of different prompt lengths, seeds and sampling settings
   through an `EngineCore` (a) on the GPU in float32 against the same weights on the CPU, (b) with decoder graphs
   and with whole-step graphs against eager steps, and (c) alone against batched together on the GPU, in
   float32 and in bfloat16 with each GEMM kind (model/gemm.py: the batch-invariant Triton kernel, the
   library's) — each as the share of requests whose delivered tokens are identical. On the CPU (b) is exact by construction (tests pin it); on a GPU it depends on whether the
   GEMM libraries pick the same kernel whatever the batch's row count, which this measures rather than assumes.
   Then, per dtype, where a row's bits first change when it is batched (bench/invariance.py: encoder, decoder
   and sampler, sub-step by sub-step; "no difference" when none does).
2. For each row count: `rows` requests with a `--prefix`-token prompt each go through one `EngineCore`
   (Scheduler + ModelRunner, the serving path: prefill, then denoising steps of every row together, one host
   sync per step). Once every row is denoising, `--steps` iterations are timed, then `--steps` more with the
   decoder forward (as its own graph) and the sampler (`draw_keyed` + `advance_rows`) each bracketed by a device
   sync, to split the step. The engine's defaults apply: on CUDA the decoder forward of a steady batch replays
   as a CUDA graph (`--no-graphs`: eager; `--step-graphs`: the whole step as one graph, still experimental).
   `--gemm batch_invariant,library` times each row count with each GEMM kind, side by side. It prints:
   - ms per step, and tokens/s at the reference's typical ~27 steps per canvas (rows x 256 / (27 x step time));
   - the split: decoder ms (and the host ms spent issuing its kernels: near the total means the forward is bound
     by Python / launch overhead, not the GPU), sampler ms, the rest; host syncs per step;
   - memory: peak allocated (weights included), the step's transient peak above what was allocated before it,
     and the KV bytes admission reserved for these sequences against the pool pages they hold;
   - the memory-bandwidth floor: bytes one step must read (every non-expert weight, the experts the step's tokens
     route to — at 256 tokens x top-8 of 128 nearly all of them — the tied LM head once per sampler row group,
     and the KV prefix), divided by the peak bandwidth (`--peak-tbps`, 4.8 for an H200, 3.35 for an H100), and
     the fraction of that floor the measured step reaches.

Anchor from vLLM (FP8, batch 1, an autoregressive step): ~7 ms per forward on an H200, ~9 ms on an H100.

On a machine without CUDA it says so and exits, unless `--allow-cpu`, which runs the same code paths on CPU (the
CPU test in tests/model/test_gpu_step_bench.py does so on a tiny config so the script cannot rot).
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/invariance.py, imported by `checks`

import deployments.model_runner as runner_mod  # noqa: E402
import model.attention as attention  # noqa: E402
from deployments.engine_core import EngineCore  # noqa: E402
from deployments.scheduler import CanvasEvent, EngineRequest, ErrorEvent, SchedulerLimits  # noqa: E402
from model import gemm  # noqa: E402
from model.config import from_name  # noqa: E402
from model.layers import rope_inv_freq  # noqa: E402
from model.moe import grouped_mm_supported  # noqa: E402
from model.sampling import sampler  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.transformer import DiffusionGemma  # noqa: E402

STEPS_PER_CANVAS = 27  # the reference's typical denoising steps per canvas at its default settings


def build_model(config_name: str, device: torch.device, dtype: torch.dtype, **overrides) -> DiffusionGemma:
    """Random weights allocated and initialised on `device` (never materialised on the host); `overrides`:
    config fields to change from the preset."""
    cfg = from_name(config_name, **overrides)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("_scalar"):
                b.fill_(1.0)
        for layer in model.layers:
            layer.self_attn.inv_freq = rope_inv_freq(layer.spec).to(device)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_bytes(model: DiffusionGemma, rows: int, kv_bytes: int) -> dict[str, float]:
    """Bytes one denoising step of `rows` canvases must read at least (`kv_bytes`: the K/V prefix it reads)."""
    cfg = model.config
    item = torch.empty((), dtype=model.dtype).element_size()
    counts = cfg.parameter_counts()
    tokens = rows * cfg.canvas_length
    # expected share of experts some token routes to, if routing were uniform
    hit = 1 - (1 - cfg.top_k / cfg.num_experts) ** tokens
    experts = counts["experts"] * hit * item
    embed = cfg.vocab_size * cfg.hidden_size * item
    groups = -(
        -rows // max(1, sampler.element_budget(model.device) // (cfg.canvas_length * sampler.VOCAB_CHUNK))
    )
    return {
        "weights": counts["non_expert"] * item - embed + experts,
        "lm_head": embed * groups,  # the tied LM head, read once per sampler row group
        "kv": kv_bytes,
    }


# -- the engine through EngineCore ---------------------------------------------------------------------------
def engine_tokens(
    model: DiffusionGemma, requests: list[tuple], max_rows: int, cuda_graphs: bool = True, whole: bool = False
) -> tuple[dict[str, list[int]], str]:
    """Delivered tokens of each (request id, prompt, params, seed) run through one EngineCore (`whole`: the
    whole step as a graph where it can be, else the decoder alone), and what its graphs did (`graph_use`)."""
    limits = SchedulerLimits(max_rows=max_rows, kv_cache_bytes=1 << 30)
    core = EngineCore(model, limits, cuda_graphs, step_graphs=whole)
    out: dict[str, list[int]] = defaultdict(list)

    def sink_for(rid: str):
        def sink(event) -> None:
            if isinstance(event, ErrorEvent):
                raise RuntimeError(f"{rid}: {event.code} {event.message}")
            if isinstance(event, CanvasEvent):
                out[rid].extend(event.token_ids)

        return sink

    for rid, prompt, params, seed in requests:
        core.submit(EngineRequest(rid, prompt, params, seed=seed), sink_for(rid))
    while core.has_work:
        core.iterate()
    return dict(out), graph_use(core)


def graph_use(core: EngineCore) -> str:
    """'R replays, C captures' of the runner's graphs, and 'OFF' when a failed capture turned them off: a run
    whose batch changed several times must show several captures and stay on (a capture that fails after the
    first batch change leaves the tokens right, only slow, so the tokens alone would not show it)."""
    captures = sum(c for c, _ in core.runner.graph_counts().values())
    kinds = [g for g in (core.runner.graphs, core.runner.step_graphs) if g is not None]
    off = ", OFF after a failed capture" if any(g.disabled for g in kinds) else ""
    return f"{replays(core)} replays, {captures} captures{off}"


def replays(core: EngineCore) -> int:
    """Graph replays so far: whole steps and decoder forwards."""
    return sum(replayed for _, replayed in core.runner.graph_counts().values())


def check_requests(vocab: int, n: int = 16) -> list[tuple]:
    """n requests with different prompt lengths, seeds and sampling settings (two canvases each)."""
    out = []
    for i in range(n):
        prompt = [3 + (11 * i + 5 * j) % (vocab - 3) for j in range(3 + 5 * i)]
        params = SamplingParams(
            max_new_tokens=2 * 64,
            t_min=0.3 + 0.02 * i,
            t_max=0.9,
            entropy_bound=0.05 + 0.03 * (i % 4),
            max_denoising_steps=24,
        )
        out.append((f"q{i}", prompt, params, 1000 + 7 * i))
    return out


def share_identical(a: dict[str, list[int]], b: dict[str, list[int]]) -> str:
    same = sum(a[k] == b.get(k) for k in a)
    return f"{same}/{len(a)}"


def checks(device: torch.device, n: int = 16) -> dict[str, str]:
    """Token identity of the serving engine on `device` for `n` requests (see the module docstring, part 1)."""
    cpu_model = build_model("tiny-test", torch.device("cpu"), torch.float32)
    L = cpu_model.config.canvas_length
    requests = [
        (rid, p, SamplingParams(**{**vars(q), "max_new_tokens": 2 * L}), s)
        for rid, p, q, s in check_requests(cpu_model.config.vocab_size, n)
    ]
    on_cpu, _ = engine_tokens(cpu_model, requests, max_rows=16)
    results = {}
    # bf16 on a GPU once per GEMM kind (model/gemm.py): the batch-invariant kernel, then the library's
    runs = [(torch.float32, None)]
    runs += [(torch.bfloat16, k) for k in gemm.KINDS] if device.type == "cuda" else [(torch.bfloat16, None)]
    for dtype, kind in runs:
        if kind is not None:
            kind = gemm.configure(device, kind)  # what is in effect (a kernel that fails its probe: library)
        model = copy.deepcopy(cpu_model).to(device=device, dtype=dtype)
        batched, replayed = engine_tokens(
            model, requests, max_rows=16
        )  # the defaults: decoder graphs on CUDA
        alone = {}
        for r in requests:
            alone.update(engine_tokens(model, [r], max_rows=1)[0])
        name = str(dtype).removeprefix("torch.") + (f", {kind} GEMMs" if kind else "")
        if dtype == torch.float32:
            results[f"{device.type} {name} vs cpu float32, batched"] = share_identical(on_cpu, batched)
        if device.type == "cuda":
            eager, _ = engine_tokens(model, requests, max_rows=16, cuda_graphs=False)
            results[f"{device.type} {name}: decoder graphs ({replayed}) vs eager, batched"] = share_identical(
                eager, batched
            )
            whole, replayed = engine_tokens(model, requests, max_rows=16, whole=True)
            results[f"{device.type} {name}: whole-step graphs ({replayed}) vs eager, batched"] = (
                share_identical(eager, whole)
            )
        results[f"{device.type} {name}: alone vs batched with {n - 1} others"] = share_identical(
            alone, batched
        )
        # where bits first change when a row is batched, sub-step by sub-step (bench/invariance.py)
        from invariance import locate, prompts, summary

        focus = [0, n // 2, n - 1]
        found = locate(model, prompts(model.config.vocab_size, n), focus)
        for line in summary(found, model.config.num_layers, len(focus)):
            part, _, what = line.partition(": ")
            results[f"{device.type} {name}: batching changes bits in the {part}"] = what
    if device.type == "cuda":
        gemm.configure(device)  # back to the default for what follows
    results[f"torch._grouped_mm used on {device.type} bfloat16 (library GEMMs)"] = str(
        grouped_mm_supported(device, torch.bfloat16)
    )
    return results


@contextmanager
def split_timers(core: EngineCore, device: torch.device, totals: dict[str, float]):
    """Bracket the decoder forward (eager or replayed) and the sampler with device syncs; add up their times."""
    saved = {n: getattr(runner_mod, n) for n in ("draw_keyed", "advance_rows")}
    forward = core.runner.decode

    def decoder(*a, **k):
        _sync(device)
        t0 = time.perf_counter()
        out = forward(*a, **k)
        totals["decoder_host"] += time.perf_counter() - t0
        _sync(device)
        totals["decoder"] += time.perf_counter() - t0
        return out

    def timed(fn):
        def wrapper(*a, **k):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            _sync(device)
            totals["sampler"] += time.perf_counter() - t0
            return out

        return wrapper

    core.runner.decode = decoder
    for n, fn in saved.items():
        setattr(runner_mod, n, timed(fn))
    try:
        yield
    finally:
        del core.runner.decode
        for n, fn in saved.items():
            setattr(runner_mod, n, fn)


def write_profile(core: EngineCore, device: torch.device, path: Path) -> None:
    """Three steps under torch.profiler: the ops' table by device time and by host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            core.iterate()
        _sync(device)
    table = prof.key_averages()
    by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"by {by}\n{table.table(sort_by=by, row_limit=40)}\n\nby self_cpu_time_total\n"
        f"{table.table(sort_by='self_cpu_time_total', row_limit=40)}\n"
    )
    print(f"profile of 3 steps at {core.runner.rows.canvas.shape[0]} rows written to {path}", flush=True)


def print_sync_sites(core: EngineCore, rows: int) -> None:
    """One step under torch.cuda's sync debug mode: each synchronizing call's innermost repo frame, counted."""
    root = str(Path(__file__).resolve().parent.parent)
    sites: dict[str, int] = defaultdict(int)
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if f.filename.startswith(root) and "bench" not in f.filename
        ]
        where = " < ".join(f"{Path(f.filename).relative_to(root)}:{f.lineno}" for f in frames[::-1][:3])
        sites[where or f"{filename}:{lineno}"] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                core.iterate()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    print(f"sync sites of one step at {rows} rows ({sum(sites.values())} syncs):", flush=True)
    for where, n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>5}  {where}", flush=True)


@torch.no_grad()
def measure(
    model: DiffusionGemma,
    rows: int,
    prefix_len: int,
    steps: int,
    peak_tbps: float,
    profile: Path | None = None,
    sync_sites: bool = False,
    cuda_graphs: bool = True,
    step_graphs: bool = False,
) -> dict:
    cfg, device = model.config, model.device
    L = cfg.canvas_length
    # one canvas per request that never stops early: the step is timed at a fixed row count
    params = SamplingParams(max_new_tokens=L, max_denoising_steps=1024, confidence_threshold=1e-9)
    per_sequence = model.kv_reservation_bytes(prefix_len + L, new_tokens=SchedulerLimits.prefill_chunk)
    limits = SchedulerLimits(
        max_rows=rows, kv_cache_bytes=rows * per_sequence + (1 << 20), token_budget=max(8192, 2 * rows * L)
    )
    model.__dict__.pop("_kv_pool", None)  # a pool sized for this row count alone
    gc.collect()  # the previous row count's runner, caches and graphs (they hold reference cycles)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    core = EngineCore(model, limits, cuda_graphs, step_graphs)
    prompt = [3 + (7 * i) % (cfg.vocab_size - 3) for i in range(prefix_len)]
    for r in range(rows):
        core.submit(EngineRequest(f"r{r}", prompt, params, seed=r), lambda e: None)
    for _ in range(64 + 2 * prefix_len // SchedulerLimits.prefill_chunk):  # prefill until every row denoises
        if core.iterate().rows == rows:
            break
    else:
        raise RuntimeError(f"{rows} rows never all denoised together")
    core.iterate()  # the first step with self-conditioning input (eager)
    core.iterate()  # with CUDA graphs: the capture
    _sync(device)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    syncs0, replays0 = core.runner.syncs, replays(core)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        stats = core.iterate()  # ends with the step's one packed host read
        _sync(device)
        times.append(time.perf_counter() - t0)
        if stats.rows != rows:
            raise RuntimeError(f"a step ran {stats.rows} rows, not {rows}")
    syncs = (core.runner.syncs - syncs0) / steps
    replays_timed = replays(core) - replays0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    totals = defaultdict(float)
    if profile is not None:
        write_profile(core, device, profile)
    if sync_sites and device.type == "cuda":
        try:
            print_sync_sites(core, rows)
        except Exception:
            traceback.print_exc()
    # the split: a whole-step graph replays with no Python between its parts, so this pass runs the decoder as
    # its own graph (captured in the first two steps, untimed) and the sampler eagerly, each bracketed by syncs
    if core.runner.step_graphs is not None:
        core.runner.step_graphs.drop()
        core.runner.step_graphs = None
    for _ in range(2):
        core.iterate()
    with split_timers(core, device, totals):
        for _ in range(steps):
            core.iterate()
    step_s = statistics.median(times)
    kv_read = core.runner._prefix.kv_bytes()
    need = floor_bytes(model, rows, kv_read)
    floor_s = sum(need.values()) / (peak_tbps * 1e12)
    result = {
        "rows": rows,
        "ms_per_step": step_s * 1e3,
        "tokens_per_s": rows * L / (STEPS_PER_CANVAS * step_s),
        "decoder_ms": totals["decoder"] / steps * 1e3,
        "decoder_host_ms": totals["decoder_host"] / steps * 1e3,
        "sampler_ms": totals["sampler"] / steps * 1e3,
        "syncs": syncs,
        "replays": replays_timed,
        "peak_gib": peak / 2**30,
        "transient_gib": (peak - allocated) / 2**30,
        "kv_admitted_gib": core.reserved / 2**30,
        "kv_pages_gib": core.runner.kv_bytes() / 2**30,
        "floor_ms": floor_s * 1e3,
        "floor_fraction": floor_s / step_s,
    }
    for request in list(core.active):
        core.cancel(request)
    del core
    return result


def run(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="diffusiongemma-26b-a4b", help="model.config preset")
    ap.add_argument("--rows", default="1,4,16,32,64", help="comma-separated row counts")
    ap.add_argument(
        "--steps", type=int, default=5, help="timed denoising steps per row count (twice: see above)"
    )
    ap.add_argument("--prefix", type=int, default=512, help="prompt tokens per row in the KV cache")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="peak memory bandwidth, TB/s (H200 4.8)")
    ap.add_argument("--no-checks", dest="checks", action="store_false", help="skip the token-identity checks")
    ap.add_argument("--check-requests", type=int, default=16, help="requests in each token-identity check")
    ap.add_argument(
        "--profile", metavar="DIR", help="write torch.profiler tables of 3 steps (see --profile-rows)"
    )
    ap.add_argument("--profile-rows", default="", help="row counts to profile (default: the first)")
    ap.add_argument(
        "--sync-sites", action="store_true", help="list where one step synchronizes with the GPU (CUDA only)"
    )
    ap.add_argument(
        "--no-graphs", dest="graphs", action="store_false", help="run the decoder eagerly (no CUDA graphs)"
    )
    ap.add_argument(
        "--step-graphs",
        action="store_true",
        help="capture the whole step, not the decoder alone (experimental)",
    )
    ap.add_argument(
        "--tf32", action="store_true", help="what-if: let fp32 matrix products use TF32 (changes numerics)"
    )
    ap.add_argument(
        "--vocab-chunk",
        type=int,
        default=0,
        help="what-if: the sampler's vocabulary block (changes every token; default: sampler.VOCAB_CHUNK). "
        "Fewer, larger blocks mean fewer kernels per step for the eager sampler at few rows",
    )
    ap.add_argument(
        "--cublas-no-split-k",
        action="store_true",
        help="what-if for the library GEMMs: cuBLAS without a workspace (so without split-K) and without reduced-"
        "precision reductions, as vLLM's batch-invariant mode sets up Hopper; set before the first product",
    )
    ap.add_argument(
        "--gemm",
        default=gemm.DEFAULT_KIND,
        help=f"comma-separated GEMM kinds to time each row count with ({', '.join(gemm.KINDS)}; model/gemm.py)",
    )
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no GPU (tests)")
    args = ap.parse_args(argv)
    kinds = args.gemm.split(",")
    if bad := set(kinds) - set(gemm.KINDS):
        ap.error(f"--gemm {','.join(sorted(bad))}: use {', '.join(gemm.KINDS)}")
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif args.allow_cpu:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        print("gpu_step: no CUDA device here; this benchmark measures a GPU (use --allow-cpu to smoke-test)")
        return []
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        print("fp32 matrix products may use TF32 (--tf32)")
    if args.vocab_chunk:
        sampler.VOCAB_CHUNK = args.vocab_chunk
        print(
            f"sampler vocabulary block: {args.vocab_chunk} tokens (--vocab-chunk; tokens differ from the default)"
        )
    if args.cublas_no_split_k:
        cublas_without_split_k()
        print(
            "library GEMMs: cuBLAS(Lt) without workspace, no reduced-precision reductions (--cublas-no-split-k)"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    if args.checks:
        t0 = time.perf_counter()
        try:
            for what, share in checks(device, args.check_requests).items():
                print(f"check  {what}: {share}", flush=True)
        except Exception:  # report and go on to the timings: one run on a lent GPU must give all it can
            traceback.print_exc()
        print(f"checks took {time.perf_counter() - t0:.1f} s", flush=True)
    graph_mode = (
        "off" if not args.graphs or device.type != "cuda" else "whole step" if args.step_graphs else "decoder"
    )
    t0 = time.perf_counter()
    model = build_model(args.config, device, dtype)
    print(
        f"{args.config} on {name} ({dtype}), built in {time.perf_counter() - t0:.1f} s; prefix {args.prefix}; "
        f"CUDA graphs: {graph_mode}",
        flush=True,
    )
    head = (
        f"{'gemm':>16} {'rows':>5} {'replays':>7} {'ms/step':>8} {'tok/s@27':>9} {'decoder':>8} {'(host)':>7} {'sampler':>8} {'syncs':>6} "
        f"{'peak GiB':>9} {'step GiB':>9} {'KV adm':>7} {'KV pages':>9} {'floor ms':>9} {'of floor':>9}"
    )
    print(head, flush=True)
    results = []
    for i, rows in enumerate(int(r) for r in args.rows.split(",")):
        chosen = [int(r) for r in args.profile_rows.split(",") if r] or [rows if i == 0 else -1]
        for kind in kinds:
            first = kind == kinds[0]
            profile = (
                Path(args.profile) / f"profile_rows{rows}.txt" if args.profile and rows in chosen else None
            )
            r = _measured(model, rows, args, kind, profile if first else None, args.sync_sites and first)
            if r is not None:
                results.append(r)
    print(f"attention's fp32-output bf16 GEMM (bmm out_dtype) available: {dict(attention._OUT_DTYPE_BMM)}")
    return results


def cublas_without_split_k() -> None:
    """cuBLAS and cuBLASLt with (almost) no workspace, where split-K kernels cannot run; fp32 reductions inside
    bf16/fp16 GEMMs. torch reads the two variables when it first sizes a workspace, so this must come first."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = "1"
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    if torch.cuda.is_available():
        torch.backends.cuda.preferred_blas_library("cublaslt")


def _measured(model, rows: int, args, kind: str, profile: Path | None, sync_sites: bool) -> dict | None:
    """One row count with one GEMM kind (printed as a table row), or None after printing why it failed."""
    kind = gemm.configure(model.device, kind)  # what is in effect: a kernel that fails its probe is not used
    try:
        r = measure(
            model,
            rows,
            args.prefix,
            args.steps,
            args.peak_tbps,
            profile,
            sync_sites,
            args.graphs,
            args.step_graphs,
        )
    except Exception:
        traceback.print_exc()
        return None
    r["gemm"] = kind
    print(
        f"{kind:>16} {r['rows']:>5} {r['replays']:>7} {r['ms_per_step']:>8.2f} {r['tokens_per_s']:>9.0f} "
        f"{r['decoder_ms']:>8.2f} {r['decoder_host_ms']:>7.2f} {r['sampler_ms']:>8.2f} {r['syncs']:>6.1f} "
        f"{r['peak_gib']:>9.2f} {r['transient_gib']:>9.2f} {r['kv_admitted_gib']:>7.2f} "
        f"{r['kv_pages_gib']:>9.2f} {r['floor_ms']:>9.2f} {r['floor_fraction']:>9.1%}",
        flush=True,
    )
    return r


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run()
