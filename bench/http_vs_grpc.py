"""The OpenAI-compatible HTTP API beside gRPC, through one real local Ray Serve app, in one run.

    .venv/bin/python bench/http_vs_grpc.py [--model PATH] [--requests-per-client K] [--max-new-tokens N]
        [--max-denoising-steps S] [--timeout-s T]

At 1 and 16 concurrent clients (closed loop: K requests per client, each client's next request starts when its
previous one has finished), the same requests go two ways to the same app (cluster/app.py, started here on a
local Ray cluster bound to loopback, only 127.0.0.1 targeted):

  gRPC   `GenerateStream` (grpc.aio) through Serve's gRPC proxy to the Router replica;
  HTTP   `POST /v1/completions` with `stream: true` (httpx2, server-sent events) through Serve's HTTP proxy to the
         same Router replica's FastAPI app.

Every request has a fixed prompt, seed, max_tokens and denoising-step limit, so both ways produce the same text;
the script checks that per request. Loads run back to back per path (HTTP then gRPC), after one warm-up request
per client on each path.

Columns:
  agg tok/s   completion tokens of all requests / wall time of the load
  req tok/s   mean over requests of completion tokens / client-observed latency
  TTFC ms     time to first canvas: mean over requests of request sent -> first committed text received
  latency ms  mean client-observed latency (request sent -> end of stream)
  HTTP/gRPC   ratio of the HTTP figure to the gRPC one (throughput: < 1 means HTTP is slower)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/http_vs_grpc.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench._cluster import serving  # noqa: E402
from bench.serve_throughput import PROMPTS  # noqa: E402

LOADS = (1, 16)


@dataclass
class Settings:
    model_path: Path | None
    requests_per_client: int = 3
    max_new_tokens: int = 64
    max_denoising_steps: int = 12
    timeout_s: float = 300.0


@dataclass
class Result:
    text: str
    tokens: int
    seconds: float  # request sent -> end of stream
    first_canvas_s: float  # request sent -> first committed text


def request_spec(index: int, s: Settings) -> dict:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "seed": 1000 + index, "max_tokens": s.max_new_tokens}


async def grpc_one(stub, spec: dict, s: Settings) -> Result:
    from protos.blockserve.v1 import blockserve_pb2 as pb

    req = pb.GenerateRequest(prompt=spec["prompt"], seed=spec["seed"], max_new_tokens=spec["max_tokens"])
    req.sampling.max_denoising_steps = s.max_denoising_steps
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    async for event in stub.GenerateStream(req, timeout=s.timeout_s):
        if event.HasField("canvas"):
            first = first or time.perf_counter() - t0
            text.append(event.canvas.text_delta)
        elif event.HasField("final"):
            tokens = event.final.usage.completion_tokens
    elapsed = time.perf_counter() - t0
    return Result("".join(text), tokens, elapsed, first or elapsed)


async def http_one(client, model: str, spec: dict, s: Settings) -> Result:
    body = {
        "model": model,
        **spec,
        "stream": True,
        "stream_options": {"include_usage": True},
        "blockserve": {"sampling": {"max_denoising_steps": s.max_denoising_steps}},
    }
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    async with client.stream("POST", "/v1/completions", json=body, timeout=s.timeout_s) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    first = first or time.perf_counter() - t0
                    text.append(choice["text"])
    elapsed = time.perf_counter() - t0
    return Result("".join(text), tokens, elapsed, first or elapsed)


async def run_load(one, clients: int, k: int, s: Settings) -> tuple[float, dict]:
    results: dict[tuple[int, int], Result] = {}

    async def client(c: int) -> None:
        for i in range(k):
            results[(c, i)] = await one(request_spec(c * k + i, s))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - t0, results


def figures(wall: float, results: dict) -> dict:
    rs = list(results.values())
    return {
        "agg": sum(r.tokens for r in rs) / wall,
        "req": sum(r.tokens / r.seconds for r in rs) / len(rs),
        "ttfc": 1e3 * sum(r.first_canvas_s for r in rs) / len(rs),
        "lat": 1e3 * sum(r.seconds for r in rs) / len(rs),
    }


async def measure(grpc_address: str, http_base: str, s: Settings) -> list[tuple[int, dict, dict, int, int]]:
    import grpc
    import httpx2 as httpx  # the HTTP client the `openai` package (a test dependency) installs

    from protos.blockserve.v1 import blockserve_pb2 as pb
    from protos.blockserve.v1.blockserve_pb2_grpc import BlockDiffusionStub

    rows = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        grpc.aio.insecure_channel(grpc_address) as channel,
        httpx.AsyncClient(base_url=http_base, limits=limits) as client,
    ):
        stub = BlockDiffusionStub(channel)
        model = (await stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)).model_name
        paths = {
            "http": lambda spec: http_one(client, model, spec, s),
            "grpc": lambda spec: grpc_one(stub, spec, s),
        }
        for one in paths.values():  # warm-up: connections, handles, the largest batch
            await run_load(one, max(LOADS), 1, s)
        for clients in LOADS:
            http_wall, http = await run_load(paths["http"], clients, s.requests_per_client, s)
            grpc_wall, grpc_r = await run_load(paths["grpc"], clients, s.requests_per_client, s)
            same = sum(http[key].text == grpc_r[key].text for key in http)
            rows.append((clients, figures(http_wall, http), figures(grpc_wall, grpc_r), same, len(http)))
            print(f"  {clients:>2} clients: HTTP {http_wall:.1f}s, gRPC {grpc_wall:.1f}s", flush=True)
    return rows


def format_table(rows) -> str:
    head = (
        f"{'clients':>7} | {'agg tok/s HTTP gRPC ratio':>27} | {'req tok/s HTTP gRPC ratio':>27} | "
        f"{'TTFC ms HTTP gRPC ratio':>27} | {'latency ms HTTP gRPC':>21} | same text"
    )
    lines = [head, "-" * len(head)]
    for clients, h, g, same, n in rows:
        cells = [f"{h[k]:>8.1f} {g[k]:>8.1f} {h[k] / g[k]:>9.2f}" for k in ("agg", "req", "ttfc")]
        lines.append(
            f"{clients:>7} | {cells[0]} | {cells[1]} | {cells[2]} | {h['lat']:>10.0f} {g['lat']:>10.0f} | {same}/{n}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint directory (default: shipped tiny model)"
    )
    p.add_argument("--requests-per-client", "-K", type=int, default=Settings.requests_per_client)
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    p.add_argument("--max-denoising-steps", type=int, default=Settings.max_denoising_steps)
    p.add_argument("--timeout-s", type=float, default=Settings.timeout_s, help="per-request time limit")
    a = p.parse_args(argv)
    if min(a.requests_per_client, a.max_new_tokens, a.max_denoising_steps) < 1:
        p.error("--requests-per-client, --max-new-tokens and --max-denoising-steps must be >= 1")
    return Settings(a.model, a.requests_per_client, a.max_new_tokens, a.max_denoising_steps, a.timeout_s)


def main(argv=None) -> None:
    s = parse_args(argv)
    t0 = time.perf_counter()
    with serving({"model": {"name": "bench"}, "engine": {"max_rows": 64}}, model=s.model_path) as server:
        print(
            f"model {server.model_path}; max_tokens {s.max_new_tokens}, max_denoising_steps "
            f"{s.max_denoising_steps}, K={s.requests_per_client} requests/client, loads {LOADS}; streams on both "
            f"paths"
        )
        print(
            f"Ray Serve app up in {time.perf_counter() - t0:.1f}s (gRPC {server.address}, HTTP {server.http_base})"
        )
        rows = asyncio.run(measure(server.address, server.http_base, s))
        print()
        print(format_table(rows))


if __name__ == "__main__":
    main()
