"""Tracing overhead: tokens/s through a real local Ray Serve app with tracing off and on (every request traced).

    .venv/bin/python bench/tracing_overhead.py [--clients N] [--requests-per-client K] [--max-new-tokens N]
        [--max-denoising-steps S] [--rounds R] [--model PATH] [--timeout-s S]

Ray Serve reads its tracing variables only when a Ray process starts, so each mode runs in its own
subprocess with its own Ray cluster on loopback (cluster/env.py): `off` with no tracing variables (what a
cluster without `telemetry.otlp_endpoint` runs), `on` with cluster/telemetry.py's environment at sampling
ratio 1.0, exporting over OTLP/gRPC to a real receiver this script runs on 127.0.0.1 (it counts the spans, so
the table shows tracing really ran). With R rounds the modes alternate (off, on, off, on, ...) so a shared
machine's drift hits both.

In each run, N clients each send K `GenerateStream` requests one after another (closed loop; fixed prompts,
seeds and sampling settings), after one warm-up request per client. Columns:
  agg tok/s   completion tokens of all requests / wall time of the load
  req tok/s   mean over requests of completion tokens / client-observed latency
  p50 ms      median client-observed latency
  CPU ms/tok  CPU time (user + system) of every process of the run (driver, Ray, proxy, replicas) during
              the load, per completion token: the cost of serving, much less disturbed by other work on a
              shared machine than wall-clock rates
  spans/req   spans the receiver got per request (0 when off)
and the ratio on/off of each (goal: aggregate tokens/s >= 0.95, i.e. CPU per token <= 1.05).

Before the runs, a micro-benchmark in this process (no Ray) times blockserve's own tracing helpers for one
two-canvas request (the Router's RPC span, validate / tokenize / detokenize stages, the Engine's spans built
from stamped times): CPU microseconds per request with tracing off (no provider: what every request pays
when tracing is not configured) and on (the SDK with a batching OTLP/gRPC exporter to the receiver here,
export thread included). A failed cluster start (Ray times out on an overloaded machine) is retried once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/tracing_overhead.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench._cluster import free_port  # noqa: E402

PROMPTS = ("def fibonacci(n):", "class Point:", "import os\n", "for i in range(10):", "# a helper that")


# -- the parent: OTLP receiver, runs, table -------------------------------------------------------------------
class SpanCounter:
    def __init__(self):
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        counter = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with counter.lock:
                    counter.spans += n
                return trace_service_pb2.ExportTraceServiceResponse()

        self.lock = threading.Lock()
        self.spans = 0
        self.port = free_port()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def take(self) -> int:
        with self.lock:
            n, self.spans = self.spans, 0
        return n


def micro(receiver: SpanCounter, n: int = 150) -> tuple[float, float]:
    """CPU microseconds per request of our span helpers: (tracing off, tracing on). 150 requests x 11 spans
    stay under the batch processor's queue (2048), so no span is dropped unexported."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from deployments import observability as obs
    from deployments.scheduler import CanvasEvent, FinalEvent

    encode = obs.traced_encode(lambda text: [1] * len(text))
    quiet = obs.RequestLogSettings(enabled=False)

    def one_request() -> None:
        rr = obs.RouterRequest("GenerateStream", None, quiet)
        rr.identify("bench")
        with rr.stage("router.validate"):
            encode("def fibonacci(n):")
        with rr.current():
            engine = obs.EngineTrace("bench", 48, 6)
        now = time.monotonic()
        canvases = [CanvasEvent(i, [1] * 32, 12, i == 1, now - 0.2 + 0.1 * i) for i in range(2)]
        for c in canvases:
            engine.stamp(True)
            with rr.stage("router.detokenize", **{"blockserve.canvas_index": c.canvas_index}):
                pass
        engine.end(FinalEvent("length", 6, 48, [12, 12], 2.0, 0.1, 0.3, 0.01), canvases, None)
        rr.finish(obs.Outcome(completion_tokens=48, steps_per_canvas=(12, 12)))

    def per_request_us(parent) -> float:
        c0 = time.process_time()
        for _ in range(n):
            with parent():
                one_request()
        return 1e6 * (time.process_time() - c0) / n

    from contextlib import nullcontext

    off = per_request_us(nullcontext)
    provider = TracerProvider()
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{receiver.port}"))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    tracer = provider.get_tracer("bench")
    on = per_request_us(lambda: tracer.start_as_current_span("replica_handle_request"))
    c0 = time.process_time()
    processor.force_flush()  # the export work still queued belongs to the measured requests
    on += 1e6 * (time.process_time() - c0) / n
    provider.shutdown()
    receiver.take()
    return off, on


def run_child(mode: str, args, receiver: SpanCounter) -> dict:
    try:
        return _run_child(mode, args, receiver)
    except RuntimeError as e:
        print(f"({e}; retrying once)", file=sys.stderr)
        return _run_child(mode, args, receiver)


def _run_child(mode: str, args, receiver: SpanCounter) -> dict:
    from cluster.telemetry import tracing_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RAY_SERVE_TRACING_"))}
    if mode == "on":
        env.update(tracing_env(f"http://127.0.0.1:{receiver.port}", 1.0, environ={}))
        env["OTEL_BSP_SCHEDULE_DELAY"] = "500"
    cmd = [sys.executable, __file__, "--child", mode, *child_args(args)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"the {mode} run failed (exit {out.returncode})")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    time.sleep(1.0)  # the last spans leave the batch processor at shutdown
    result["spans"] = receiver.take()
    return result


def child_args(args) -> list[str]:
    out = [
        f"--clients={args.clients}",
        f"--requests-per-client={args.requests_per_client}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--max-denoising-steps={args.max_denoising_steps}",
    ]
    return out + ([f"--model={args.model}"] if args.model else [])


def report(runs: dict[str, list[dict]], args) -> None:
    def mean(mode, key):
        return statistics.fmean(r[key] for r in runs[mode])

    n_req = args.clients * args.requests_per_client
    print(
        f"tracing overhead: {args.clients} clients x {args.requests_per_client} GenerateStream requests, "
        f"max_new_tokens {args.max_new_tokens}, max_denoising_steps {args.max_denoising_steps}, "
        f"{args.rounds} round(s) per mode (mean shown); on = sampling ratio 1.0, OTLP/gRPC to 127.0.0.1"
    )
    keys = ("agg_tps", "req_tps", "p50_ms", "cpu_ms_per_token")
    print(f"{'':10} {'agg tok/s':>10} {'req tok/s':>10} {'p50 ms':>8} {'CPU ms/tok':>11} {'spans/req':>10}")
    for mode in ("off", "on"):
        spans = sum(r["spans"] for r in runs[mode]) / (n_req * len(runs[mode]))
        print(
            f"{mode:10} {mean(mode, 'agg_tps'):>10.1f} {mean(mode, 'req_tps'):>10.2f} "
            f"{mean(mode, 'p50_ms'):>8.0f} {mean(mode, 'cpu_ms_per_token'):>11.2f} {spans:>10.1f}"
        )
    r = [mean("on", k) / mean("off", k) for k in keys]
    print(f"{'on / off':10} {r[0]:>10.3f} {r[1]:>10.3f} {r[2]:>8.3f} {r[3]:>11.3f}")
    for mode in ("off", "on"):
        per_run = [(round(x["agg_tps"], 1), round(x["cpu_ms_per_token"], 2)) for x in runs[mode]]
        print(f"  {mode} runs (agg tok/s, CPU ms/tok): {per_run}")


# -- the child: one Ray cluster, one load ---------------------------------------------------------------------
async def load(address: str, args) -> tuple[float, list[tuple[int, float]], float]:
    import grpc

    from protos.blockserve.v1 import blockserve_pb2 as pb
    from protos.blockserve.v1.blockserve_pb2_grpc import BlockDiffusionStub

    def request(index: int):
        req = pb.GenerateRequest(
            prompt=PROMPTS[index % len(PROMPTS)], max_new_tokens=args.max_new_tokens, seed=100 + index
        )
        req.sampling.max_denoising_steps = args.max_denoising_steps
        return req

    async def one(stub, index: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        final = None
        async for event in stub.GenerateStream(request(index), timeout=args.timeout_s):
            if event.HasField("final"):
                final = event.final
        return final.usage.completion_tokens, time.perf_counter() - t0

    async with grpc.aio.insecure_channel(address) as channel:
        stub = BlockDiffusionStub(channel)
        await asyncio.gather(*(one(stub, 10_000 + c) for c in range(args.clients)))  # warm-up
        results: list[tuple[int, float]] = []

        async def client(c: int) -> None:
            for i in range(args.requests_per_client):
                results.append(await one(stub, c * args.requests_per_client + i))

        c0, t0 = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        return time.perf_counter() - t0, results, cpu_seconds() - c0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (the Ray cluster it started)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def child(args) -> None:
    from bench._cluster import serving

    sections = {"engine": {"max_rows": max(16, args.clients)}, "telemetry": {"log_requests": False}}
    with serving(sections, model=args.model) as server:
        wall, results, cpu = asyncio.run(load(server.address, args))
    tokens = sum(t for t, _ in results)
    print(
        "RESULT "
        + json.dumps(
            {
                "agg_tps": tokens / wall,
                "req_tps": statistics.fmean(t / s for t, s in results),
                "p50_ms": 1e3 * statistics.median(s for _, s in results),
                "cpu_ms_per_token": 1e3 * cpu / tokens,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-denoising-steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="limit per run")
    p.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    receiver = SpanCounter()
    off_us, on_us = micro(receiver)
    print(
        f"our span helpers, CPU per two-canvas request (no Ray): tracing off {off_us:.1f} us, "
        f"on {on_us:.1f} us (11 spans incl. export)"
    )
    sys.stdout.flush()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                runs[mode].append(run_child(mode, args, receiver))
    finally:
        receiver.server.stop(0)
    report(runs, args)


if __name__ == "__main__":
    main()
