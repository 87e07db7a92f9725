"""KV memory of one engine: what admission reserves against what the KV path really holds at its peak.

Command (from the repo root; about a minute on a busy 2-core machine):

    .venv/bin/python bench/kv_memory.py                 # rows 1,16,64
    .venv/bin/python bench/kv_memory.py --rows 4 --threads 2
    .venv/bin/python bench/kv_memory.py --rows 1,4 --prompt-tokens 48,3000   # long rows: the largest key groups

Same checkpoint shape and load as bench/engine_step.py (vocab 4096, hidden 128, 3 sliding + 1 full layers,
window 128, canvas 64; prompt 48 tokens (`--prompt-tokens`), 2 canvases, 16 denoising steps, random weights). For each row count, one
EngineCore runs that many requests to the end under `torch.profiler` with memory profiling, and the bench prints:

- reserved: the most admission had reserved at once (`Scheduler.reserved`: pool pages + per-row attention
  workspace, model/kv_cache.py `reservation_bytes`);
- pages: the most pool pages the live caches held at once;
- attention: the largest transient the attention layer allocated inside one call (peak of the running sum of
  the profiler's allocation and free events between the call's entry and exit), over every encoder and decoder
  call of the run;
- KV peak = pages + attention, and peak / reserved (<= 1 means admission counts every byte the KV path uses);
- step: all transient bytes of the largest iteration (activations of the MLP, MoE and sampler too), for scale;
- the pool's size (it grows by doubling here, as nothing sized it; a server sizes it once with
  `KVPool.reserve_for(budget, rows)`).

Each row count gets a fresh model, so the pool starts empty.

With `--baseline PATH` (a checkout of another revision, e.g. `git worktree add /tmp/base main`) it instead times
one decoder forward (prefix 112 tokens, canvas 64) at each row count in this checkout and in PATH, each in a fresh
subprocess, and prints both and the ratio — the attention path before and after, side by side:

    .venv/bin/python bench/kv_memory.py --baseline /tmp/base --rows 1,16,64 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
if (
    __name__ == "__main__"
):  # imported (by engine_step.py, or a --baseline subprocess): the caller set the path
    sys.path.insert(0, str(ROOT))

from deployments.engine_core import EngineCore  # noqa: E402
from deployments.scheduler import EngineRequest, SchedulerLimits  # noqa: E402
from model import layers as layers_mod  # noqa: E402
from model.config import build_config  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.transformer import DiffusionGemma  # noqa: E402
from model.weights import init_random  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"
RANGE = "kv_attention"


def bench_model() -> DiffusionGemma:
    config = build_config(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        layer_types=[SLIDING] * 3 + [FULL],
        num_heads=4,
        head_dim=32,
        num_kv_heads=2,
        global_head_dim=64,
        num_global_kv_heads=1,
        sliding_window=128,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=64,
        canvas_length=64,
        name="bench-kv",
    )
    return init_random(DiffusionGemma(config), seed=0).eval()


@contextmanager
def attention_ranges():
    """Mark every attention call with a profiler range (the model code has none)."""
    original = layers_mod.blocked_attention

    def marked(*a, **k):
        with record_function(RANGE):
            return original(*a, **k)

    layers_mod.blocked_attention = marked
    try:
        yield
    finally:
        layers_mod.blocked_attention = original


def transient_peaks(prof) -> tuple[int, int]:
    """(largest transient inside one attention call, largest transient of the whole profiled span)."""
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    ranges = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == RANGE)
    attention, step, live, i = 0, 0, 0, 0
    for _, n in memory:
        live += n
        step = max(step, live)
    for start, end in ranges:
        while i < len(memory) and memory[i][0] < start:
            i += 1
        running = 0
        while i < len(memory) and memory[i][0] <= end:
            running += memory[i][1]
            attention = max(attention, running)
            i += 1
    return attention, step


def run(model: DiffusionGemma, rows: int, params: SamplingParams, prompts: list[list[int]]) -> dict:
    """Row i gets prompts[i % len(prompts)]."""
    sched = EngineCore(model, SchedulerLimits(max_rows=rows, kv_cache_bytes=1 << 34))
    for i in range(rows):
        sched.submit(EngineRequest(f"r{i}", prompts[i % len(prompts)], params, seed=i), lambda e: None)
    reserved = pages = attention = step = 0
    watch = True  # profile the iterations whose shapes are new: the first, and each after a canvas finished
    with attention_ranges():
        while sched.has_work:
            if watch:
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    stats = sched.iterate()
                a, s = transient_peaks(prof)
                attention, step = max(attention, a), max(step, s)
            else:
                stats = sched.iterate()
            watch = stats.finished_canvases > 0 or stats.encoded_rows > 0
            pages = max(pages, sched.runner.kv_bytes())  # the pool pages the live caches hold
            reserved = max(reserved, sched.reserved)
    return {
        "reserved": reserved,
        "pages": pages,
        "attention": attention,
        "step": step,
        "pool": model.kv_pool.nbytes(),
    }


def denoise_ms(rows: int, steps: int) -> float:
    """Median ms of one decoder forward over `rows` rows with 112-token prefixes, through the public interface
    only (new_cache, encode, PrefixBatch, denoise), so it runs on any checkout of the repo."""
    from model.kv_cache import PrefixBatch
    from model.transformer import TokenBatch

    model = bench_model()
    caches = [model.new_cache() for _ in range(rows)]
    prompt = [(7 * i) % 4000 + 3 for i in range(112)]
    with torch.no_grad():
        model.encode(TokenBatch.from_lists([prompt] * rows, [0] * rows, 0), caches)
        prefix = PrefixBatch(caches)
        canvas = torch.randint(3, 4096, (rows, 64), generator=torch.Generator().manual_seed(0))
        times = []
        for i in range(steps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            model.denoise(canvas, prefix)
            if i:
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def compare_step_time(baseline: str, rows: list[int], steps: int, threads: int) -> None:
    """Decoder forward time of this checkout against `baseline` (another checkout, e.g. main), each in a fresh
    subprocess with that checkout's `model` package first on the path."""
    print(f"decoder forward, prefix 112, canvas 64, median of {steps}: this checkout vs {baseline}")
    print(f"{'rows':>5} {'this ms':>9} {'baseline ms':>12} {'baseline/this':>14}")
    for r in rows:
        got = {}
        for name, root in (("this", str(ROOT)), ("baseline", baseline)):
            code = (
                f"import sys; sys.path.insert(0, {root!r}); sys.path.insert(1, {str(ROOT / 'bench')!r}); "
                f"import torch; torch.set_num_threads({threads}); import kv_memory; "
                f"import model; assert model.__file__.startswith({root!r}); print(kv_memory.denoise_ms({r}, {steps}))"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            got[name] = float(out.stdout.strip().splitlines()[-1])
        print(f"{r:>5} {got['this']:>9.1f} {got['baseline']:>12.1f} {got['baseline'] / got['this']:>13.2f}x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--prompt-tokens",
        default="48",
        help="prompt lengths, given to the rows in turn; e.g. 48,3000: long contexts read the largest key groups",
    )
    ap.add_argument("--baseline", help="another checkout (e.g. of main): compare decoder forward time only")
    ap.add_argument("--steps", type=int, default=5, help="timed forwards per row count with --baseline")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.baseline:
        compare_step_time(args.baseline, [int(r) for r in args.rows.split(",")], args.steps, args.threads)
        return
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in lengths]
    params = SamplingParams(max_new_tokens=128, max_denoising_steps=16)
    print(
        f"random checkpoint: vocab 4096, hidden 128, 3 sliding + 1 full layers, canvas 64; prompts {lengths} "
        f"(round-robin over rows); {params}"
    )
    mib = 2**20
    print(
        f"{'rows':>5} {'reserved':>10} {'pages':>9} {'attention':>10} {'KV peak':>9} {'peak/res':>9} {'step':>9}"
    )
    for rows in (int(r) for r in args.rows.split(",")):
        r = run(bench_model(), rows, params, prompts)
        peak = r["pages"] + r["attention"]
        print(
            f"{rows:>5} {r['reserved'] / mib:>8.2f}Mi {r['pages'] / mib:>7.2f}Mi {r['attention'] / mib:>8.2f}Mi "
            f"{peak / mib:>7.2f}Mi {peak / r['reserved']:>9.3f} {r['step'] / mib:>7.2f}Mi"
        )
        print(
            f"      bytes: reserved {r['reserved']}, KV peak {peak} (attention {r['attention']}); "
            f"pool grown on demand to {r['pool'] / mib:.2f}Mi (an engine sizes it once: KVPool.reserve_for)"
        )
    print("MiB; KV peak = pool pages held + the largest attention transient (profiler allocation events)")


if __name__ == "__main__":
    main()
