"""Fairness: latency of a normal request while a long prompt prefills, with and without chunked prefill.

    .venv/bin/python bench/fairness.py [--prompt-tokens 16384] [--chunks 4096,512] [--normal 4] [--model PATH]

In-process `deployments.engine_core.EngineCore` (no Ray, no gRPC) on the default model: first `--normal` normal
requests (a 16-token prompt, 32 new tokens, 8 denoising steps) one after another on an idle engine; then the same
requests submitted right after one long prompt of `--prompt-tokens` tokens (1 new token) has started to prefill.
Each `--chunks` value is the scheduler's `prefill_chunk` (tokens prefilled per iteration; 0 = the whole prompt
in one iteration, i.e. no chunking). Prints mean latency of the normal requests per setting and the ratio to
idle. The issue's case is a 100k-token prompt (`--prompt-tokens 100000`; with `--chunks 0` that would build a
[T, T] attention mask, tens of GB: keep chunks on). This measures what the scheduler has today (chunked prefill); a per-iteration token budget shared
between prefill and denoising is the engine-core work this figure should be rerun against.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cluster.env import DEFAULT_MODEL_PATH  # noqa: E402
from deployments.engine_core import EngineCore  # noqa: E402
from deployments.scheduler import EngineRequest, FinalEvent, SchedulerLimits  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.weights import load_model  # noqa: E402

NORMAL = SamplingParams(max_new_tokens=32, max_denoising_steps=8)


def run(model, chunk: int, prompt_tokens: int, normals: int) -> list[float]:
    limits = SchedulerLimits(max_rows=8, max_queue=64, kv_cache_bytes=8 << 30, prefill_chunk=chunk or 1 << 30)
    sched = EngineCore(model, limits)
    done: dict[str, float] = {}

    def sink_for(rid):
        return lambda ev: done.__setitem__(rid, time.perf_counter()) if isinstance(ev, FinalEvent) else None

    if prompt_tokens:
        long = EngineRequest(
            "long", [5 + i % 200 for i in range(prompt_tokens)], SamplingParams(max_new_tokens=1), 0
        )
        sched.submit(long, sink_for("long"))
        sched.iterate()  # the long prompt is admitted and its prefill has begun
    out = []
    for i in range(normals):
        rid = f"n{i}"
        t0 = time.perf_counter()
        sched.submit(EngineRequest(rid, list(range(5, 21)), NORMAL, seed=i), sink_for(rid))
        while rid not in done:
            sched.iterate()
        out.append(done[rid] - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=16_384)
    p.add_argument(
        "--chunks",
        default="4096,512",
        help="prefill_chunk values; 0 = whole prompt at once (a [T, T] mask: only for short prompts)",
    )
    p.add_argument("--normal", type=int, default=4)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    print(f"model {args.model}; long prompt {args.prompt_tokens} tokens; {args.normal} normal requests each")
    idle = sum(run(model, 512, 0, args.normal)) / args.normal
    print(f"{'setting':<28} {'mean latency s':>14} {'x idle':>7}")
    print(f"{'idle engine':<28} {idle:14.2f} {1.0:7.2f}")
    for chunk in (int(c) for c in args.chunks.split(",")):
        lat = run(model, chunk, args.prompt_tokens, args.normal)
        mean = sum(lat) / len(lat)
        name = f"prefill_chunk {chunk or 'whole prompt'}"
        print(f"{name:<28} {mean:14.2f} {mean / idle:7.2f}", flush=True)


if __name__ == "__main__":
    main()
