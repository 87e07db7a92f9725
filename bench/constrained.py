"""Plain vs infill vs JSON generation on the same model, in one run (in-process Engine scheduler).

    .venv/bin/python bench/constrained.py [--model DIR] [--requests N] [--steps S]

Each kind runs N requests through `deployments.requests.prepare` (the Router's validation and template layout)
and the Engine's `EngineCore` (batched, all N in flight), with the same sampling settings. Columns:
- canvases/req, forwards: committed canvases per request and batched decoder forwards for the whole kind
- tokens/s: generated positions (every committed canvas position the request asked the model for: for plain
  generation the completion tokens, for templates the slot positions) per wall-clock second
- content tok/s: slot positions the model filled with a real token (filler removed), per second
- tok/fwd: generated positions per row-forward (one row advanced by one denoising step), the diffusion
  efficiency measure; pinned positions are excluded so a template cannot inflate it
Ratios are against plain generation from the same run; the machine is shared, so compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.env import DEFAULT_MODEL_PATH  # noqa: E402
from deployments.engine_core import EngineCore  # noqa: E402
from deployments.requests import RequestLimits, prepare  # noqa: E402
from deployments.scheduler import CanvasEvent, SchedulerLimits  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.sampling.sampler import SamplingParams  # noqa: E402
from model.structured.templates import fill  # noqa: E402
from model.structured.token_classes import token_classes_for  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights import load_model  # noqa: E402
from protos.blockserve.v1 import blockserve_pb2 as pb  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "version": {"type": "integer"},
        "stable": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
}


def requests(kind: str, n: int, max_new: int) -> list[pb.GenerateRequest]:
    out = []
    for i in range(n):
        req = pb.GenerateRequest(prompt="# Python utilities\nimport os\n", seed=i, max_new_tokens=max_new)
        if kind == "infill":
            for part in ("def read_file(path):\n    ", ("body", 24), "\n    return ", ("result", 8), "\n"):
                if isinstance(part, str):
                    req.template.parts.add(text=part)
                else:
                    req.template.parts.add(slot=pb.Slot(name=part[0], max_tokens=part[1]))
        elif kind == "json":
            req.json_schema = json.dumps(SCHEMA)
        out.append(req)
    return out


def run_kind(model, tok, cfg, kind: str, n: int, steps: int, max_new: int) -> dict:
    defaults = SamplingParams(max_denoising_steps=steps)
    prepared = [
        prepare(r, tok, cfg, defaults, RequestLimits(), f"{kind}{i}")
        for i, r in enumerate(requests(kind, n, max_new))
    ]
    sched = EngineCore(model, SchedulerLimits(max_rows=n))
    events = {p.engine.request_id: [] for p in prepared}
    t0 = time.perf_counter()
    for p in prepared:
        sched.submit(p.engine, events[p.engine.request_id].append)
    while sched.has_work:
        sched.iterate()
    seconds = time.perf_counter() - t0
    generated = content = 0
    for p in prepared:
        ids = [t for e in events[p.engine.request_id] if isinstance(e, CanvasEvent) for t in e.token_ids]
        if p.layout is None:
            generated += len(ids)
            content += len(ids)
        else:
            free = int((p.layout.pin_ids < 0).sum())
            generated += free
            filled = fill(p.layout, ids, tok)
            content += sum(len(s.token_ids) for s in filled.slots.values())
            if kind == "json":
                json.loads(filled.text)  # the guarantee, checked on every benchmark output too
    canvases = sum(
        len(p.engine.constraints) if p.engine.constraints else -(-max_new // cfg.canvas_length)
        for p in prepared
    )
    return {
        "kind": kind,
        "canvases/req": canvases / n,
        "forwards": sched.forwards,
        "seconds": seconds,
        "tokens/s": generated / seconds,
        "content tok/s": content / seconds,
        "tok/fwd": generated / max(1, sched.rows_forwarded),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # 1 thread: stable figures on a shared 2-core host
    cfg = ModelConfig.from_file(args.model)
    model = load_model(args.model)
    tok = Tokenizer.from_dir(args.model, cfg.pad_token_id, cfg.eos_token_ids[0], cfg.bos_token_id)
    print(
        f"model {args.model}: canvas {cfg.canvas_length}, vocab {cfg.vocab_size}; {args.requests} requests per kind"
    )
    t0 = time.perf_counter()
    token_classes_for(tok, cfg.vocab_size)  # built once per tokenizer, then cached
    print(f"token classes (allowed-token masks) built in {time.perf_counter() - t0:.2f}s")
    rows = [
        run_kind(model, tok, cfg, k, args.requests, args.steps, args.max_new_tokens)
        for k in ("plain", "infill", "json")
    ]
    base = rows[0]
    cols = ["kind", "canvases/req", "forwards", "seconds", "tokens/s", "content tok/s", "tok/fwd"]
    print(" | ".join(f"{c:>13}" for c in [*cols, "tok/s ratio", "tok/fwd ratio"]))
    for r in rows:
        vals = [r[c] if isinstance(r[c], str) else f"{r[c]:.2f}" for c in cols]
        ratios = [f"{r['tokens/s'] / base['tokens/s']:.2f}", f"{r['tok/fwd'] / base['tok/fwd']:.2f}"]
        print(" | ".join(f"{v:>13}" for v in [*vals, *ratios]))


if __name__ == "__main__":
    main()
