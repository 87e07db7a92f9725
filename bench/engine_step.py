"""The engine's step on CPU: batch-1 speed against transformers, batching gain, where a step's time goes.

Command (from the repo root; about 2 minutes on a busy 2-core machine):

    .venv/bin/python bench/engine_step.py                     # rows 1,4,16,64
    .venv/bin/python bench/engine_step.py --rows 1,4 --threads 2
    .venv/bin/python bench/engine_step.py --config small-cpu  # the published vocabulary and canvas (~3 min)

One run, one random checkpoint built and saved by transformers, printed side by side. `--config tiny` (default):
vocab 4096, hidden 128, 4 layers, canvas 64 — the speed checkpoint of bench/model_vs_reference.py.
`--config small-cpu`: the `small-cpu` preset of model/config.py (vocab 262,144, canvas 256, 6 thin layers), where
the vocabulary-wide work of sampling dominates a step on both sides; its defaults are one canvas, rows 1 and
one repeat, to stay short.

1. batch 1: delivered tokens/s of one request through the serving engine (EngineCore) and through our plain
   `generate` loop (rng="fast"), against transformers' `generate`, same prompt and settings, and the ratios —
   per wall-clock second and per second of the process's CPU time (the same runs; on a shared machine other
   processes stretch wall time far more than CPU time);
2. batching: aggregate delivered tokens/s of one EngineCore (Scheduler + ModelRunner) running 1 / 4 / 16 / 64 requests at once (each
   request 2 canvases by default, 16 denoising steps, distinct seeds), and the gain over 1 row;
3. per denoising iteration at each row count: wall time, the part spent inside the model's forward passes
   (encode + denoise), the part in the sampler step (`draw_keyed` + `advance_rows`), the rest ("python":
   planning, events, the runner's slot-buffer gathers / write-backs and its small [R, L] keyed re-noise — host
   work and the few tensor ops around the model), and the host syncs counted by wrapping `Tensor.item`,
   `tolist`, `__bool__`, `__int__`, `__float__` and `nonzero`;
4. KV memory: what admission reserved against the largest amount the caches and the per-step padded prefix
   copy really held at once.
"""

from __future__ import annotations

import argparse
import os
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

import deployments.model_runner as runner_mod  # noqa: E402
from deployments.engine_core import EngineCore  # noqa: E402
from deployments.scheduler import EngineRequest, SchedulerLimits  # noqa: E402
from model.sampling.generate import generate  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.weights import load_model  # noqa: E402
from tests.tiny import reference_generate  # noqa: E402

SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")


class Counters:
    def __init__(self):
        self.syncs = 0
        self.model_s = 0.0
        self.sampler_s = 0.0


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

    def timed(fn, field):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(counters, field, getattr(counters, field) + time.perf_counter() - t0)

        return wrapper

    patched = {"denoise": model.denoise, "encode": model.encode}
    draw, advance = runner_mod.draw_keyed, runner_mod.advance_rows
    try:
        for m in SYNC_METHODS:
            setattr(torch.Tensor, m, counting(m))
        for name, fn in patched.items():
            setattr(model, name, timed(fn, "model_s"))
        runner_mod.draw_keyed, runner_mod.advance_rows = timed(draw, "sampler_s"), timed(advance, "sampler_s")
        yield
    finally:
        for m, fn in saved.items():
            setattr(torch.Tensor, m, fn)
        for name in patched:
            delattr(model, name)
        runner_mod.draw_keyed, runner_mod.advance_rows = draw, advance


def engine_once(model, prompt, params, seed: int) -> int:
    """One request through an EngineCore alone: tokens delivered."""
    core = EngineCore(model, SchedulerLimits(max_rows=1))
    delivered = []
    core.submit(EngineRequest("one", prompt, params, seed=seed), delivered.append)
    while core.has_work:
        core.iterate()
    return sum(len(e.token_ids) for e in delivered if hasattr(e, "token_ids") and hasattr(e, "last"))


def batch_one(ref, ours, prompt, params, repeats: int) -> dict:
    """Median delivered tokens/s of the serving engine, the plain loop and transformers, one request each."""
    steps = {"generate": 0, "transformers": 0}  # denoising steps run (the engine's equal the plain loop's)

    def ours_generate(seed):
        out = generate(ours, prompt, params, seed=seed)
        steps["generate"] += sum(out.steps_per_canvas)
        return len(out.token_ids)

    def reference(seed):
        denoise = ref._denoising_step  # one call per denoising step of transformers' loop

        def counted(*a, **k):
            steps["transformers"] += 1
            return denoise(*a, **k)

        ref._denoising_step = counted
        try:
            return len(reference_generate(ref, prompt, params, seed, eos=None)[: params.max_new_tokens])
        finally:
            del ref._denoising_step

    runs = {
        "engine": lambda seed: engine_once(ours, prompt, params, seed),
        "generate": ours_generate,
        "transformers": reference,
    }
    warm = SamplingParams(max_new_tokens=ours.config.canvas_length, max_denoising_steps=2)
    generate(ours, prompt, warm, seed=99)
    engine_once(ours, prompt, warm, 99)
    rates = {k: [] for k in runs}
    cpu_rates = {k: [] for k in runs}
    step_ms = {k: [] for k in steps}
    for seed in range(repeats):
        for name, run in runs.items():  # interleaved, so a load spike on the shared machine hits all three
            before = steps.get(name, 0)
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                n = run(seed)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates[name].append(n / wall)
            cpu_rates[name].append(n / cpu)
            if name in steps:
                step_ms[name].append(1e3 * wall / max(1, steps[name] - before))
    out = {k: statistics.median(v) for k, v in rates.items()}
    # the same runs per second of this process's CPU time: on a shared machine, other processes' load
    # stretches wall time far more than it stretches CPU time (one thread on both sides)
    out["cpu"] = {k: statistics.median(v) for k, v in cpu_rates.items()}
    out["step_ms"] = {k: statistics.median(v) for k, v in step_ms.items()}  # medians, as the rates
    out["steps"] = {k: steps[k] / repeats for k in steps}
    return out


def engine_run(model, prompt, params, rows: int) -> dict:
    sched = EngineCore(model, SchedulerLimits(max_rows=rows, kv_cache_bytes=1 << 34))
    delivered = []
    for i in range(rows):
        sched.submit(EngineRequest(f"r{i}", prompt, params, seed=i), delivered.append)
    counters = Counters()
    iterations, peak_kv, reserved = [], 0, 0
    t_start = time.perf_counter()
    with instrumented(model, counters):
        while sched.has_work:
            before = (counters.syncs, counters.model_s, counters.sampler_s)
            t0 = time.perf_counter()
            stats = sched.iterate()
            wall = time.perf_counter() - t0
            if stats.rows:
                spent = (counters.model_s - before[1], counters.sampler_s - before[2])
                iterations.append((wall, *spent, counters.syncs - before[0]))
            peak_kv = max(peak_kv, sched.runner.kv_bytes())  # caches + the padded prefix copy the step reads
            reserved = max(reserved, sched.reserved)
    total = time.perf_counter() - t_start
    tokens = sum(len(e.token_ids) for e in delivered if hasattr(e, "token_ids") and hasattr(e, "last"))
    walls, models, samplers, syncs = zip(*iterations, strict=True)
    return {
        "rows": rows,
        "tokens_per_s": tokens / total,
        "step_ms": 1e3 * statistics.median(walls),
        "model_ms": 1e3 * statistics.median(models),
        "sampler_ms": 1e3 * statistics.median(samplers),
        "python_ms": 1e3
        * statistics.median(w - m - s for w, m, s in zip(walls, models, samplers, strict=True)),
        "syncs": statistics.median(syncs),
        "kv_reserved": reserved,
        "kv_peak": peak_kv,
    }


# --config: (transformers reference builder, defaults for --rows, --repeats, --canvases)
CONFIGS = {
    "tiny": (
        lambda: mvr._reference_model(4096, 128, [mvr.SLIDING] * 3 + [mvr.FULL], canvas=64, seed=0),
        "1,4,16,64",
        3,
        2,
    ),
    "small-cpu": (lambda: mvr.reference_from_preset("small-cpu", seed=0), "1", 1, 1),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="checkpoint shape")
    ap.add_argument("--rows", default=None, help="engine row counts (default: per config)")
    ap.add_argument("--repeats", type=int, default=None, help="batch-1 runs (median; default: per config)")
    ap.add_argument("--canvases", type=int, default=None, help="canvases per request (default: per config)")
    ap.add_argument("--steps", type=int, default=16, help="max denoising steps per canvas")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    build, rows_default, repeats_default, canvases_default = CONFIGS[args.config]
    args.rows = args.rows or rows_default
    args.repeats = args.repeats or repeats_default
    torch.set_num_threads(args.threads)
    ref = build()
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_model(mvr._save(ref, Path(tmp) / "m"))
    c = ours.config
    prompt = torch.randint(3, c.vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    canvases = args.canvases or canvases_default
    params = SamplingParams(max_new_tokens=canvases * c.canvas_length, max_denoising_steps=args.steps)
    print(
        f"checkpoint {args.config}: vocab {c.vocab_size}, hidden {c.hidden_size}, {c.num_layers} layers, canvas "
        f"{c.canvas_length}; prompt 48; {params}; threads {args.threads}; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    one = batch_one(ref, ours, prompt, params, args.repeats)
    tf = one["transformers"]
    print(
        f"batch 1: engine {one['engine']:.3g} tok/s ({one['engine'] / tf:.2f}x), plain loop "
        f"{one['generate']:.3g} tok/s ({one['generate'] / tf:.2f}x), transformers {tf:.3g} tok/s"
    )
    cpu = one["cpu"]
    print(
        f"batch 1 per CPU second: engine {cpu['engine']:.3g} tok/s ({cpu['engine'] / cpu['transformers']:.2f}x), "
        f"plain loop {cpu['generate']:.3g} tok/s ({cpu['generate'] / cpu['transformers']:.2f}x), transformers "
        f"{cpu['transformers']:.3g} tok/s"
    )
    ms, steps = one["step_ms"], one["steps"]
    print(
        f"batch 1 per denoising step: plain loop {ms['generate']:.1f} ms ({steps['generate']:.1f} steps per run), "
        f"transformers {ms['transformers']:.1f} ms ({steps['transformers']:.1f} steps per run): "
        f"{ms['transformers'] / ms['generate']:.2f}x"
    )
    print(
        f"{'rows':>5} {'tok/s':>8} {'gain':>6} {'step ms':>8} {'model ms':>9} {'sampler ms':>11} {'python ms':>10} "
        f"{'syncs':>6} {'KV reserved':>12} {'KV peak':>10}"
    )
    base = None
    for rows in (int(r) for r in args.rows.split(",")):
        r = engine_run(ours, prompt, params, rows)
        base = base or r["tokens_per_s"]
        print(
            f"{rows:>5} {r['tokens_per_s']:>8.3g} {r['tokens_per_s'] / base:>5.1f}x {r['step_ms']:>8.1f} "
            f"{r['model_ms']:>9.1f} {r['sampler_ms']:>11.1f} {r['python_ms']:>10.1f} {r['syncs']:>6.0f} "
            f"{r['kv_reserved'] / 2**20:>10.2f}Mi {r['kv_peak'] / 2**20:>8.2f}Mi"
        )
    print("syncs: per denoising iteration (median); KV peak: caches + the padded prefix copy the step reads")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
