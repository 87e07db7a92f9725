"""The engine's step on CPU: batch-1 speed against transformers, batching gain, where a step's time goes.

Command (from the repo root; about 2 minutes on a busy 2-core machine):

    .venv/bin/python bench/engine_step.py                     # rows 1,4,16,64
    .venv/bin/python bench/engine_step.py --rows 1,4 --threads 2

One run, one small random checkpoint (built and saved by transformers: vocab 4096, hidden 128, 4 layers, canvas
64 — the speed checkpoint of bench/model_vs_reference.py), printed side by side:

1. batch 1: delivered tokens/s of our `generate` (rng="fast", the serving sampler) against transformers'
   `generate`, same prompt and settings, and the ratio;
2. batching: aggregate delivered tokens/s of one Scheduler running 1 / 4 / 16 / 64 requests at once (each
   request 2 canvases of 64 tokens, 16 denoising steps, distinct seeds), and the gain over 1 row;
3. per denoising iteration at each row count: wall time, the part spent inside the model (forward passes) and
   the sampler, the rest (Python bookkeeping), and the host syncs counted by wrapping `Tensor.item`, `tolist`,
   `__bool__`, `__int__`, `__float__` and `nonzero`;
4. KV memory: what admission reserved against the largest amount the caches and the per-step padded prefix
   copy really held at once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # repo packages and tests
sys.path.insert(0, str(ROOT / "bench"))  # the checkpoint recipe of model_vs_reference.py

import model_vs_reference as mvr  # noqa: E402

from deployments.scheduler import EngineRequest, Scheduler, SchedulerLimits  # noqa: E402
from model.sampling import sampler as sampler_mod  # noqa: E402
from model.sampling.generate import generate  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.weights import load_model  # noqa: E402
from tests.tiny import reference_generate  # noqa: E402

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


class Counters:
    def __init__(self):
        self.syncs = 0
        self.model_s = 0.0


@contextmanager
def instrumented(model, counters: Counters):
    """Count host syncs and time the model and sampler calls while inside."""
    saved = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

    def counting(name):
        original = saved[name]

        def wrapper(self, *a, **k):
            counters.syncs += 1
            return original(self, *a, **k)

        return wrapper

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                counters.model_s += time.perf_counter() - t0

        return wrapper

    patched = {"denoise": model.denoise, "encode": model.encode}
    draw, advance = sampler_mod.draw_fast, sampler_mod.advance
    import deployments.scheduler as sched_mod

    try:
        for m in SYNC_METHODS:
            setattr(torch.Tensor, m, counting(m))
        for name, fn in patched.items():
            setattr(model, name, timed(fn))
        sched_mod.draw_fast, sched_mod.advance = timed(draw), timed(advance)
        yield
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)
        for name in patched:
            delattr(model, name)
        sched_mod.draw_fast, sched_mod.advance = draw, advance


def batch_one(ref, ours, prompt, params, repeats: int) -> dict:
    rates = {"ours": [], "transformers": []}
    generate(ours, prompt, SamplingParams(max_new_tokens=64, max_denoising_steps=2), seed=99)  # warm-up
    for seed in range(repeats):
        t0 = time.perf_counter()
        n = len(generate(ours, prompt, params, seed=seed).token_ids)
        rates["ours"].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.no_grad():
            n = len(reference_generate(ref, prompt, params, seed, eos=None)[: params.max_new_tokens])
        rates["transformers"].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def engine_run(model, prompt, params, rows: int) -> dict:
    sched = Scheduler(model, SchedulerLimits(max_rows=rows, kv_cache_bytes=1 << 34))
    delivered = []
    for i in range(rows):
        sched.submit(EngineRequest(f"r{i}", prompt, params, seed=i), delivered.append)
    counters = Counters()
    iterations, peak_kv, reserved = [], 0, 0
    t_start = time.perf_counter()
    with instrumented(model, counters):
        while sched.has_work:
            before = (counters.syncs, counters.model_s)
            t0 = time.perf_counter()
            stats = sched.iterate()
            wall = time.perf_counter() - t0
            if stats.rows:
                iterations.append((wall, counters.model_s - before[1], counters.syncs - before[0]))
            caches = sum(s.cache.nbytes() for s in sched.active.values())
            prefix = sched._prefix  # the padded copy the denoise step reads
            copy = sum(lp.keys.nbytes + lp.values.nbytes for lp in prefix.layers) if prefix is not None else 0
            peak_kv = max(peak_kv, caches + copy)
            reserved = max(reserved, sched.reserved)
    total = time.perf_counter() - t_start
    tokens = sum(len(e.token_ids) for e in delivered if hasattr(e, "token_ids") and hasattr(e, "last"))
    walls, models, syncs = zip(*iterations, strict=True)
    return {
        "rows": rows,
        "tokens_per_s": tokens / total,
        "step_ms": 1e3 * statistics.median(walls),
        "model_ms": 1e3 * statistics.median(models),
        "python_ms": 1e3 * statistics.median(w - m for w, m in zip(walls, models, strict=True)),
        "syncs": statistics.median(syncs),
        "kv_reserved": reserved,
        "kv_peak": peak_kv,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=3, help="batch-1 runs (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = mvr._reference_model(4096, 128, [mvr.SLIDING] * 3 + [mvr.FULL], canvas=64, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_model(mvr._save(ref, Path(tmp) / "m"))
    prompt = torch.randint(3, 4096, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=128, max_denoising_steps=16)
    print(
        f"checkpoint: vocab 4096, hidden 128, 4 layers, canvas 64; prompt 48; {params}; threads {args.threads}"
    )
    one = batch_one(ref, ours, prompt, params, args.repeats)
    print(
        f"batch 1: ours {one['ours']:.0f} tok/s, transformers {one['transformers']:.0f} tok/s, "
        f"ratio {one['ours'] / one['transformers']:.2f}x"
    )
    print(
        f"{'rows':>5} {'tok/s':>8} {'gain':>6} {'step ms':>8} {'model ms':>9} {'python ms':>10} {'syncs':>6} "
        f"{'KV reserved':>12} {'KV peak':>10}"
    )
    base = None
    for rows in (int(r) for r in args.rows.split(",")):
        r = engine_run(ours, prompt, params, rows)
        base = base or r["tokens_per_s"]
        print(
            f"{rows:>5} {r['tokens_per_s']:>8.0f} {r['tokens_per_s'] / base:>5.1f}x {r['step_ms']:>8.1f} "
            f"{r['model_ms']:>9.1f} {r['python_ms']:>10.1f} {r['syncs']:>6.0f} "
            f"{r['kv_reserved'] / 2**20:>10.2f}Mi {r['kv_peak'] / 2**20:>8.2f}Mi"
        )
    print("syncs: per denoising iteration (median); KV peak: caches + the padded prefix copy the step reads")


if __name__ == "__main__":
    main()
