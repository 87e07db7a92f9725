"""Fairness: latency of a normal request while a long prompt prefills, without and with the token budget.

    .venv/bin/python bench/fairness.py [--prompt-tokens 16384] [--at 0.9] [--chunks 512]
        [--budgets 1073741824,8192] [--time-shares 1,0.5] [--piece-works 0,2097152] [--normal 3]
        [--setup-chunk N] [--reuse-setup] [--model PATH]
    .venv/bin/python bench/fairness.py --piece-costs [--contexts 30000,100000] [--pieces 8,64,512]

In-process `deployments.engine_core.EngineCore` (no Ray, no gRPC) on the default model: first `--normal` normal
requests (a 16-token prompt, 32 new tokens, 8 denoising steps) one after another on an idle engine; then one
long prompt of `--prompt-tokens` tokens (1 new token) is prefilled up to `--at` of its length (the late chunks
attend to the longest context, the worst case) and the same normal requests run one after another while the
rest of it prefills. Settings are every pair of `--chunks` (`prefill_chunk`: prompt tokens per iteration; 0 =
the whole prompt in one iteration, a [T, T] mask: only for short prompts) and `--budgets` (`token_budget`:
tokens one iteration may process; 2**30 = no budget, the scheduler before the budget landed) and
`--time-shares` (`prefill_time_share`: the share of the engine's time prompt prefill may take while streams
denoise; 1 = no limit, the scheduler before that rule landed) and `--piece-works` (`prefill_piece_work`:
query-key pairs one prompt piece may read, so pieces shrink deep into a long prompt; 0 = off, the scheduler
before that rule landed); `--setup-chunk` sets the pieces of the
unmeasured prefill up to `--at` (e.g. 512 when measuring 32-token pieces on a 100k prompt), and
`--reuse-setup` measures every setting on one prefilled prompt. Prints mean latency of the normal requests per
setting and the ratio to idle (the goal: within 2x of idle); each busy request is followed by one on the idle
engine, and the ratio to those interleaved idle requests is printed too (a shared machine's load drifts during a
long run; the interleaved ratio cancels most of it), then idle again at the end.

With `--prefill-alone` it instead times the long prompt's whole prefill on an idle engine per `--piece-works`
value (what shrinking pieces costs the long prompt itself). With `--piece-costs` it instead times what one prefill piece costs deep into a long prompt: one `model.encode`
of `--pieces` tokens on one sequence holding `--contexts` cached tokens (the cache's pages are filled with
random K/V and its length set directly: the cost depends on how many keys the piece attends to, not on their
values, and filling 100k tokens through the encoder would take longer than the measurement), against one
denoising step of a normal request (16-token prompt); best of `--repeats`, 1 thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
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


def engine(model, setup_chunk: int, prompt_tokens: int, at: float):
    """An EngineCore and its finish times; with `prompt_tokens`, a long prompt prefilled up to `at` in pieces of
    `setup_chunk` tokens (the normal requests then meet a long context: the worst case)."""
    limits = SchedulerLimits(
        max_rows=8,
        max_queue=64,
        kv_cache_bytes=8 << 30,
        prefill_chunk=setup_chunk or 1 << 30,
        prefill_piece_work=0,  # the setup's pieces: as given
    )
    sched = EngineCore(model, limits)
    done: dict[str, float] = {}
    if prompt_tokens:
        long = EngineRequest(
            "long", [5 + i % 200 for i in range(prompt_tokens)], SamplingParams(max_new_tokens=1), 0
        )
        sched.submit(long, _sink(done, "long"))
        sched.iterate()  # the long prompt is admitted and its prefill has begun
        while len(sched.active["long"].pending_encode or ()) > prompt_tokens * (1 - at):
            sched.iterate()
    return sched, limits, done


def _sink(done: dict, rid: str):
    return lambda ev: done.__setitem__(rid, time.perf_counter()) if isinstance(ev, FinalEvent) else None


def measure(
    sched, limits, done, chunk: int, budget: int, share: float, normals: int, work: int = 0
) -> list[float]:
    """Latency of `normals` normal requests, one after another, under these settings (the scheduler reads its
    limits every iteration)."""
    limits.prefill_chunk, limits.token_budget, limits.prefill_time_share = chunk or 1 << 30, budget, share
    limits.prefill_piece_work = work
    out = []
    for i in range(normals):
        rid = f"n{len(done)}"
        t0 = time.perf_counter()
        sched.submit(EngineRequest(rid, list(range(5, 21)), NORMAL, seed=i), _sink(done, rid))
        while rid not in done:
            sched.iterate()
        out.append(done[rid] - t0)
        if "long" in done:
            print(f"  (the long prompt finished before normal request {i + 1}: lower --at)", flush=True)
    return out


def prefilled_fraction(sched, prompt_tokens: int) -> float:
    seq = sched.active.get("long")
    return 1.0 if seq is None else 1 - len(seq.pending_encode or ()) / prompt_tokens


def prefill_alone(model, prompt_tokens: int, chunk: int, works: list[int]) -> None:
    """Seconds and iterations to prefill the long prompt alone on an idle engine, per prefill_piece_work: what
    smaller pieces deep into the prompt cost the prompt itself."""
    print(f"{'piece work':>12} {'iterations':>10} {'prefill s':>10}")
    for work in works:
        sched, limits, _ = engine(model, chunk, 0, 0.0)
        limits.prefill_piece_work = work
        prompt = [5 + i % 200 for i in range(prompt_tokens)]
        sched.submit(EngineRequest("long", prompt, SamplingParams(max_new_tokens=1), 0), lambda ev: None)
        t0, n = time.perf_counter(), 0
        while sched.active.get("long") is None or sched.active["long"].pending_encode:
            sched.iterate()
            n += 1
        print(f"{work or 'off':>12} {n:>10} {time.perf_counter() - t0:10.1f}", flush=True)


def _filled_cache(model, tokens: int, room: int):
    """A sequence cache holding `tokens` cached tokens of random K/V, with room for `room` more."""
    cache = model.new_cache(tokens + room)
    pool = cache.pool
    g = torch.Generator().manual_seed(0)
    for store in (*pool.keys, *pool.values):  # every page of the pool (this cache's and the free ones)
        store.copy_(torch.randn(store.shape, generator=g, dtype=torch.float).to(store.dtype))
    cache.advance(tokens)
    return cache


def _best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def piece_costs(model, contexts: list[int], pieces: list[int], repeats: int) -> None:
    from model.transformer import TokenBatch

    normal = model.new_cache(16 + model.config.canvas_length)
    with torch.no_grad():
        model.encode(TokenBatch.from_lists([list(range(5, 21))], [0], 0), [normal])
        canvas = torch.full((1, model.config.canvas_length), 7, dtype=torch.long)
        step = _best_of(repeats, lambda: model.denoise(canvas, model.prefix([normal])))
    print(f"one denoising step of a normal request (16-token prompt, 1 row): {step * 1e3:.1f} ms")
    print(f"{'cached tokens':>13} {'piece tokens':>12} {'encode s':>9} {'x denoise step':>14}")
    for ctx in contexts:
        cache = _filled_cache(model, ctx, max(pieces))
        for n in pieces:
            cost = _best_of(repeats, partial(_encode_piece, model, cache, ctx, n))
            print(f"{ctx:>13} {n:>12} {cost:9.3f} {cost / step:14.1f}", flush=True)
        cache.release()


def _encode_piece(model, cache, ctx: int, n: int) -> None:
    """One prompt piece of n tokens after ctx cached ones; the cache is rewound so the next call repeats it."""
    from model.transformer import TokenBatch

    batch = TokenBatch.from_lists([[5 + i % 200 for i in range(n)]], [ctx], 0)
    with torch.no_grad():
        model.encode(batch, [cache])
    cache.length = ctx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=16_384,
        help="the issue's case is 100000 (about 30 min per setting on 2 CPU cores)",
    )
    p.add_argument(
        "--chunks",
        default=str(SchedulerLimits.prefill_chunk),
        help="prefill_chunk values; 0 = whole prompt at once (a [T, T] mask: only for short prompts)",
    )
    p.add_argument(
        "--budgets",
        default=f"{1 << 30},{SchedulerLimits.token_budget}",
        help=f"token_budget values; {1 << 30} = no budget (the scheduler before the budget landed)",
    )
    p.add_argument(
        "--at", type=float, default=0.9, help="fraction of the long prompt prefilled before measuring"
    )
    p.add_argument(
        "--time-shares",
        default=f"1,{SchedulerLimits.prefill_time_share}",
        help="prefill_time_share values; 1 = no limit on prefill's share of the time while streams denoise",
    )
    p.add_argument(
        "--piece-works",
        default=f"0,{SchedulerLimits.prefill_piece_work}",
        help="prefill_piece_work values (query-key pairs a prompt piece may read); 0 = off (fixed pieces)",
    )
    p.add_argument("--normal", type=int, default=3)
    p.add_argument(
        "--setup-chunk",
        type=int,
        default=0,
        help="prefill_chunk for the unmeasured prefill up to --at (0 = each setting's own); a large one saves "
        "setup time when measuring small pieces on a long prompt (only the context they meet matters)",
    )
    p.add_argument(
        "--reuse-setup",
        action="store_true",
        help="prefill the long prompt once and measure every setting on it in turn (each setting's pieces move "
        "it on a little; the fraction reached is printed): saves the setup per setting on a 100k prompt",
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument(
        "--piece-costs", action="store_true", help="time single prefill pieces instead (see above)"
    )
    p.add_argument(
        "--prefill-alone",
        action="store_true",
        help="time the long prompt's whole prefill alone per --piece-works (one --chunks value) instead",
    )
    p.add_argument("--contexts", default="30000,100000", help="--piece-costs: cached tokens")
    p.add_argument("--pieces", default="8,64,512", help="--piece-costs: piece sizes in tokens")
    p.add_argument("--repeats", type=int, default=3, help="--piece-costs: best of this many calls")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    if args.prefill_alone:
        print(
            f"model {args.model}; a {args.prompt_tokens}-token prompt prefilled alone, prefill_chunk {args.chunks}"
        )
        prefill_alone(
            model, args.prompt_tokens, int(args.chunks), [int(w) for w in args.piece_works.split(",")]
        )
        return
    if args.piece_costs:
        ints = [[int(x) for x in a.split(",")] for a in (args.contexts, args.pieces)]
        print(
            f"model {args.model}; one model.encode per piece on one sequence, best of {args.repeats}, 1 thread"
        )
        piece_costs(model, *ints, args.repeats)
        return
    print(
        f"model {args.model}; long prompt {args.prompt_tokens} tokens, measured from {args.at:.0%} prefilled; "
        f"{args.normal} normal requests each"
    )
    idle_engine = engine(model, 0, 0, 0.0)
    measure(*idle_engine, 512, SchedulerLimits.token_budget, 1.0, 1)  # warm-up
    idle = statistics.mean(measure(*idle_engine, 512, SchedulerLimits.token_budget, 1.0, args.normal))
    print(f"{'setting':<72} {'mean latency s':>14} {'x idle':>7}")
    print(f"{'idle engine':<72} {idle:14.2f} {1.0:7.2f}", flush=True)
    shared = engine(model, args.setup_chunk, args.prompt_tokens, args.at) if args.reuse_setup else None
    settings = [
        (int(c), int(b), float(x), int(w))
        for c in args.chunks.split(",")
        for b in args.budgets.split(",")
        for x in args.time_shares.split(",")
        for w in args.piece_works.split(",")
    ]
    for chunk, budget, share, work in settings:
        busy = shared or engine(model, args.setup_chunk or chunk, args.prompt_tokens, args.at)
        at = prefilled_fraction(busy[0], args.prompt_tokens)
        lat, paired = [], []
        for _ in range(
            args.normal
        ):  # each busy request followed by one on the idle engine: load drift cancels
            lat += measure(*busy, chunk, budget, share, 1, work)
            paired += measure(*idle_engine, 512, SchedulerLimits.token_budget, 1.0, 1)
        mean = statistics.mean(lat)
        name = (
            f"chunk {chunk or 'whole'}, budget {budget if budget < 1 << 30 else 'none'}, share {share:g}, "
            f"piece work {work or 'off'} (from {at:.1%})"
        )
        each = " ".join(f"{x:.2f}" for x in lat)
        print(f"{name:<72} {mean:14.2f} {mean / idle:7.2f}  [{each}]", flush=True)
        interleaved = statistics.mean(paired)
        print(
            f"{'  x the idle requests interleaved with these (' + f'{interleaved:.2f} s)':<72} {'':14} "
            f"{mean / interleaved:7.2f}",
            flush=True,
        )
    again = statistics.mean(measure(*idle_engine, 512, SchedulerLimits.token_budget, 1.0, args.normal))
    print(f"{'idle engine again (the machine load may have changed)':<72} {again:14.2f} {again / idle:7.2f}")


if __name__ == "__main__":
    main()
