"""Serving throughput: gRPC through a real local Ray Serve app beside the in-process Scheduler, in one run.

    .venv/bin/python bench/serve_throughput.py [--model PATH] [--requests-per-client K] [--max-new-tokens N]
        [--torch-threads T] [--stream-drafts] [--timeout-s S]

For each load of 1, 4 and 16 concurrent clients, each client sends K requests one after another (a closed
loop: a client's next request starts when its previous one has finished), on two paths that do identical work:

  gRPC     `GenerateStream` from a grpc.aio client in this process (drafts only with --stream-drafts, then on
           both paths: one more event per denoising step, which measures per-event costs), through Ray Serve's gRPC
           proxy, the Router and the Engine replica of an app this script starts (cluster/app.py) on a local
           Ray cluster bound to loopback (cluster/env.py). Only 127.0.0.1 is targeted.
  in-proc  the same requests, tokenized and validated by the Router's own `prepare()` before timing, driven
           straight through `deployments.engine_core.EngineCore` (no Ray, no gRPC, no threads): N requests are
           kept in flight, and when one finishes its client's next one is submitted before the next iteration.

Every request has a fixed seed and fixed sampling settings (all of them sent explicitly), so both paths
produce the same tokens; the script checks this per request and prints how many matched.

Columns of the table:
  clients        concurrent clients (requests in flight)
  reqs           requests per path at this load (clients x K)
  agg tok/s      aggregate throughput: completion tokens delivered by all requests / wall time of the load
  req tok/s      per-request throughput: mean over requests of (its completion tokens / its latency), latency
                 measured from sending the request to receiving its final event
  rows/fwd       mean rows per batched decoder forward during the load (gRPC: delta of the Engine's
                 `stats()`; in-proc: the Scheduler's counters)
  overhead       serving overhead: in-proc tok/s / gRPC tok/s, aggregate and per-request (1.0 = free)
  batch gain     batching gain: aggregate tok/s at this load / aggregate tok/s at 1 client, per path
Second table (where the time went):
  wall s         wall time of the load on each path
  ms/forward     wall time / decoder forwards run during the load (idle gaps between requests included)
  mean latency   per request, ms: gRPC as the client saw it; engine = the same requests inside the Engine
                 (Final.stats.total_time_s: submit to final event), so gRPC - engine is the cost of the proxy,
                 the Router and Ray's transport; in-proc = submit to final event in the bare Scheduler
  tokens         completion tokens delivered; identical outputs = requests whose tokens matched across paths

Tokens are completion tokens delivered to the client (canvas events; EOS and max_new_tokens trimming included).
The machine is shared, so absolute figures are noisy; the ratios within one run are what matter.

Torch runs `--torch-threads` intra-op threads on both paths (default 1). One is what an Engine replica gets anyway
with `engine.torch_threads: 0`: Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPU (`num_cpus: 0`,
ray/_private/utils.py `set_omp_num_threads_if_unset`), while a plain process would take torch's default (all
cores). On a 2-core machine shared with other work, two intra-op threads made an iteration 15-60x slower.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/serve_throughput.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench._cluster import serving  # noqa: E402

LOADS = (1, 4, 16)
PROMPTS = (
    "def fibonacci(n):",
    "class Point:",
    "import os\n",
    "The quick brown fox",
    "for i in range(10):",
    "# a helper that",
    "x = [1, 2, 3]\n",
    "while True:",
)


@dataclass
class BenchSettings:
    model_path: Path | None  # None: the shipped default if present, else a random servable checkpoint
    requests_per_client: int = 6
    max_new_tokens: int = 64
    max_denoising_steps: int = 12
    torch_threads: int = 1
    stream_drafts: bool = False  # both paths: a draft event per denoising step (per-event costs)
    timeout_s: float = 300.0  # whole run, startup included


@dataclass
class RequestResult:
    tokens: list[int]
    seconds: float  # client-observed: request sent -> final event received
    engine_seconds: float  # inside the engine: submit -> final event (gRPC: Final.stats.total_time_s)


@dataclass
class PhaseResult:
    clients: int
    wall_s: float
    results: dict[tuple[int, int], RequestResult]
    forwards: int
    rows_per_forward: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results.values())

    @property
    def aggregate_tps(self) -> float:
        return self.completion_tokens / self.wall_s

    def mean_ms(self, engine: bool = False) -> float:
        seconds = [r.engine_seconds if engine else r.seconds for r in self.results.values()]
        return 1e3 * sum(seconds) / len(seconds)

    @property
    def per_request_tps(self) -> float:
        return sum(len(r.tokens) / r.seconds for r in self.results.values()) / len(self.results)


@dataclass
class LoadResult:
    grpc: PhaseResult
    inproc: PhaseResult
    differing: list[tuple[int, int]] = field(init=False)  # (client, k) of requests whose tokens differ

    def __post_init__(self):
        inproc = self.inproc.results
        self.differing = sorted(k for k, r in self.grpc.results.items() if inproc[k].tokens != r.tokens)

    @property
    def matched(self) -> int:
        return len(self.grpc.results) - len(self.differing)

    def describe_differences(self) -> list[str]:
        """Where outputs diverged: (client, k), request index, token counts, first differing position."""
        out = []
        for key in self.differing:
            g, i = self.grpc.results[key].tokens, self.inproc.results[key].tokens
            first = next(
                (n for n, (x, y) in enumerate(zip(g, i, strict=False)) if x != y), min(len(g), len(i))
            )
            index = key[0] * len(self.grpc.results) // self.grpc.clients + key[1]
            out.append(
                f"clients={self.grpc.clients} client {key[0]} request {key[1]} (index {index}): gRPC "
                f"{len(g)} tokens, in-proc {len(i)}, first difference at token {first}"
            )
        return out


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the benchmark ran past --timeout-s while {what}; raise it or lower -K")
        return left


# -- requests ----------------------------------------------------------------------------------------------
def make_request(index: int, s: BenchSettings):
    """Request `index` of a load: fixed prompt, seed and every sampling field (the server defaults play no part)."""
    from protos.blockserve.v1 import blockserve_pb2 as pb

    req = pb.GenerateRequest(
        prompt=PROMPTS[index % len(PROMPTS)],
        max_new_tokens=s.max_new_tokens,
        seed=1000 + index,
        stream_drafts=s.stream_drafts,
    )
    sampling = dict(
        max_denoising_steps=s.max_denoising_steps,
        entropy_bound=0.1,
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
    )
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    return req


def requests_for(clients: int, s: BenchSettings) -> dict[tuple[int, int], object]:
    k = s.requests_per_client
    return {(c, i): make_request(c * k + i, s) for c in range(clients) for i in range(k)}


# -- the gRPC path -----------------------------------------------------------------------------------------
async def _stream_one(stub, request, deadline: Deadline) -> RequestResult:
    t0 = time.perf_counter()
    tokens: list[int] = []
    result = None
    # read to the end of the stream (its status), but the clock stops at the final event
    async for event in stub.GenerateStream(request, timeout=deadline.remaining("streaming over gRPC")):
        kind = event.WhichOneof("event")
        if kind == "canvas":
            tokens.extend(event.canvas.token_ids)
        elif kind == "final":
            result = RequestResult(tokens, time.perf_counter() - t0, event.final.stats.total_time_s)
            if event.final.usage.completion_tokens != len(tokens):
                raise RuntimeError(
                    f"final usage says {event.final.usage.completion_tokens} tokens, canvases carried {len(tokens)}"
                )
    if result is None:
        raise RuntimeError("a GenerateStream ended without a final event")
    return result


async def _grpc_phase(address: str, requests: dict, clients: int, k: int, deadline: Deadline):
    import grpc

    from protos.blockserve.v1 import blockserve_pb2 as pb
    from protos.blockserve.v1.blockserve_pb2_grpc import BlockDiffusionStub

    results: dict[tuple[int, int], RequestResult] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = BlockDiffusionStub(channel)
        await stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)  # connect before the clock starts

        async def client(c: int) -> None:
            for i in range(k):
                results[(c, i)] = await _stream_one(stub, requests[(c, i)], deadline)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return time.perf_counter() - t0, results


def engine_rows(handle) -> tuple[float, float]:
    """(forwards, rows forwarded) so far, from the Engine replica's stats."""
    st = handle.stats.remote().result()
    return st["forwards"], st["rows_per_forward"] * st["forwards"]


def run_grpc(loop, address: str, engine, clients: int, s: BenchSettings, deadline: Deadline) -> PhaseResult:
    f0, r0 = engine_rows(engine)
    reqs = requests_for(clients, s)
    wall, results = loop.run_until_complete(
        _grpc_phase(address, reqs, clients, s.requests_per_client, deadline)
    )
    f1, r1 = engine_rows(engine)
    forwards = round(f1 - f0)
    return PhaseResult(clients, wall, results, forwards, (r1 - r0) / max(1, forwards))


# -- the in-process path -----------------------------------------------------------------------------------
@dataclass
class _InFlight:
    key: tuple[int, int]
    t0: float
    tokens: list[int] = field(default_factory=list)
    seconds: float | None = None


def run_inproc(model, limits, prepared: dict, clients: int, s: BenchSettings, deadline: Deadline):
    from deployments.engine_core import EngineCore
    from deployments.scheduler import CanvasEvent, ErrorEvent, FinalEvent

    sched = EngineCore(model, limits)
    k = s.requests_per_client
    next_i = [0] * clients
    done: list[_InFlight] = []
    results: dict[tuple[int, int], RequestResult] = {}

    def submit(c: int) -> None:
        key = (c, next_i[c])
        next_i[c] += 1
        rec = _InFlight(key, time.perf_counter())

        def sink(ev) -> None:
            if isinstance(ev, CanvasEvent):
                rec.tokens.extend(ev.token_ids)
            elif isinstance(ev, FinalEvent):
                rec.seconds = time.perf_counter() - rec.t0
                done.append(rec)
            elif isinstance(ev, ErrorEvent):
                raise RuntimeError(f"in-process request {key} failed: {ev.code}: {ev.message}")

        sched.submit(
            dataclasses.replace(prepared[key], request_id=f"bench-{clients}-{key[0]}-{key[1]}"), sink
        )

    t0 = time.perf_counter()
    for c in range(clients):
        submit(c)
    while sched.has_work:
        deadline.remaining("iterating the in-process scheduler")
        sched.iterate()
        for rec in done:
            results[rec.key] = RequestResult(rec.tokens, rec.seconds, rec.seconds)
            if next_i[rec.key[0]] < k:
                submit(rec.key[0])
        done.clear()
    wall = time.perf_counter() - t0
    return PhaseResult(clients, wall, results, sched.forwards, sched.rows_forwarded / max(1, sched.forwards))


def prepare_all(router, clients: int, s: BenchSettings) -> dict:
    """EngineRequests exactly as the Router builds them (same tokenization, float32 sampling fields, seeds)."""
    from deployments.requests import prepare

    st = router.settings
    return {
        key: prepare(req, router.tokenizer, router.config, st.defaults, st.limits, "bench").engine
        for key, req in requests_for(clients, s).items()
    }


# -- report ------------------------------------------------------------------------------------------------
def _pair(width: int, *names: str) -> str:
    return " ".join(f"{n:>{width}}" for n in names)


def format_table(loads: list[LoadResult]) -> str:
    """The side-by-side table (throughput and ratios), then where the time went."""
    base_g, base_i = loads[0].grpc.aggregate_tps, loads[0].inproc.aggregate_tps
    paths = _pair(8, "gRPC", "in-proc")
    head = [
        f"{'':>12} | {'agg tok/s':^17} | {'req tok/s':^17} | {'rows/fwd':^17} | {'overhead':^17} | "
        f"{'batch gain':^17}",
        f"{'clients reqs':>12} | {paths} | {paths} | {paths} | {_pair(8, 'agg', 'req')} | {paths}",
    ]
    lines = [*head, "-" * len(head[1])]
    for lr in loads:
        g, i = lr.grpc, lr.inproc
        cells = [
            (g.aggregate_tps, i.aggregate_tps),
            (g.per_request_tps, i.per_request_tps),
            (g.rows_per_forward, i.rows_per_forward),
            (i.aggregate_tps / g.aggregate_tps, i.per_request_tps / g.per_request_tps),
            (g.aggregate_tps / base_g, i.aggregate_tps / base_i),
        ]
        fmt = [".1f", ".1f", ".2f", ".2f", ".2f"]
        row = " | ".join(f"{x:>8{f}} {y:>8{f}}" for (x, y), f in zip(cells, fmt, strict=True))
        lines.append(f"{g.clients:>7} {len(g.results):>4} | {row}")
    head = [
        f"{'':>7} | {'wall s':^17} | {'ms/forward':^17} | {'mean latency ms':^26} | {'tokens':^17} | identical",
        f"{'clients':>7} | {paths} | {paths} | {_pair(8, 'gRPC', 'engine', 'in-proc')} | {paths} | outputs",
    ]
    lines += ["", *head, "-" * len(head[1])]
    for lr in loads:
        g, i = lr.grpc, lr.inproc
        lines.append(
            f"{g.clients:>7} | {g.wall_s:>8.2f} {i.wall_s:>8.2f} | "
            f"{1e3 * g.wall_s / max(1, g.forwards):>8.1f} {1e3 * i.wall_s / max(1, i.forwards):>8.1f} | "
            f"{g.mean_ms():>8.1f} {g.mean_ms(engine=True):>8.1f} {i.mean_ms():>8.1f} | "
            f"{g.completion_tokens:>8} {i.completion_tokens:>8} | {lr.matched}/{len(g.results)}"
        )
    differences = [line for lr in loads for line in lr.describe_differences()]
    if differences:  # batch composition differs between the paths; see bench/README_serve.md
        lines += ["", "outputs that differ between the paths:", *differences]
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------------------------------
@dataclass
class Paths:
    """What the two paths need: the gRPC client's loop and address, the Engine handle (stats), and the
    in-process model, scheduler limits and Router (for its tokenizer and validation only)."""

    loop: asyncio.AbstractEventLoop
    address: str
    engine: object
    model: object
    limits: object
    router: object

    def grpc(self, clients: int, s: BenchSettings, deadline: Deadline) -> PhaseResult:
        return run_grpc(self.loop, self.address, self.engine, clients, s, deadline)

    def inproc(self, clients: int, s: BenchSettings, deadline: Deadline) -> PhaseResult:
        prepared = prepare_all(self.router, clients, s)
        return run_inproc(self.model, self.limits, prepared, clients, s, deadline)


def measure(paths: Paths, s: BenchSettings, deadline: Deadline) -> list[LoadResult]:
    # One request per client at the top load first, on both paths: first-call costs (Ray's handle and
    # streaming setup, torch allocations for the largest batch) stay out of the figures.
    warm = dataclasses.replace(s, requests_per_client=1)
    paths.grpc(max(LOADS), warm, deadline)
    paths.inproc(max(LOADS), warm, deadline)
    loads = []
    for clients in LOADS:  # the two paths back to back at each load, so machine noise hits both alike
        g = paths.grpc(clients, s, deadline)
        i = paths.inproc(clients, s, deadline)
        loads.append(LoadResult(g, i))
        print(f"  {clients:>2} clients: gRPC {g.wall_s:.1f}s, in-proc {i.wall_s:.1f}s", flush=True)
    return loads


# -- setup -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> BenchSettings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint directory (default: shipped tiny model)"
    )
    p.add_argument("--requests-per-client", "-K", type=int, default=BenchSettings.requests_per_client)
    p.add_argument("--max-new-tokens", type=int, default=BenchSettings.max_new_tokens)
    p.add_argument("--torch-threads", type=int, default=BenchSettings.torch_threads, help="on both paths")
    p.add_argument("--stream-drafts", action="store_true", help="ask both paths for a draft every step")
    p.add_argument("--timeout-s", type=float, default=BenchSettings.timeout_s, help="whole-run time limit")
    a = p.parse_args(argv)
    if min(a.requests_per_client, a.max_new_tokens, a.torch_threads) < 1:
        p.error("--requests-per-client, --max-new-tokens and --torch-threads must be >= 1")
    return BenchSettings(
        a.model, a.requests_per_client, a.max_new_tokens, 12, a.torch_threads, a.stream_drafts, a.timeout_s
    )


def main(argv=None) -> None:
    s = parse_args(argv)
    deadline = Deadline(s.timeout_s)
    sections = {
        "model": {"name": "bench"},
        "engine": {"max_rows": max(64, max(LOADS)), "torch_threads": s.torch_threads},
    }
    t0 = time.perf_counter()
    with serving(sections, model=s.model_path, timeout_s=deadline.remaining("starting")) as server:
        print(f"Ray Serve app up on {server.address} in {time.perf_counter() - t0:.1f}s", flush=True)
        _measure(server, s, deadline)


def _measure(server, s: BenchSettings, deadline: Deadline) -> None:
    import torch

    from deployments.engine import resolve_dtype
    from deployments.router import Router
    from model.weights import load_model

    config = server.config
    engine_settings = config.to_engine_settings()
    torch.set_num_threads(s.torch_threads)
    model = load_model(
        engine_settings.model_path,
        dtype=resolve_dtype(engine_settings.dtype, engine_settings.device),
        device=engine_settings.device,
    )
    router = Router(None, config.to_router_settings())  # only its tokenizer and config: no engine calls
    c = model.config
    print(
        f"model {server.model_path} ({c.num_layers} layers, hidden {c.hidden_size}, canvas {c.canvas_length}, "
        f"vocab {c.vocab_size}); max_new_tokens {s.max_new_tokens}, max_denoising_steps "
        f"{s.max_denoising_steps}, K={s.requests_per_client} requests/client, torch threads "
        f"{torch.get_num_threads()}, stream_drafts {s.stream_drafts}"
    )
    engine = server.engine()
    loop = asyncio.new_event_loop()  # one loop for the run: grpc.aio binds its poller to the first one
    try:
        paths = Paths(loop, server.address, engine, model, engine_settings.limits, router)
        loads = measure(paths, s, deadline)
        overall = engine.stats.remote().result()
        print()
        print(format_table(loads))
        print(
            f"engine stats over the whole run (warm-up included): rows_per_forward "
            f"{overall['rows_per_forward']:.2f}, max_rows_per_forward {overall['max_rows_per_forward']:.0f}, "
            f"forwards {overall['forwards']:.0f}"
        )
    finally:
        loop.close()


if __name__ == "__main__":
    main()
