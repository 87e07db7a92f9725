"""One denoising step of the published DiffusionGemma shape on one GPU: ms per step, tokens/s, memory, bandwidth.

Command (on a GPU node, from the repo root; ~2 minutes on an H100/H200, most of it building 50 GB of weights):

    .venv/bin/python bench/gpu_step.py                      # rows 1,4,16,32, published shape, bf16
    .venv/bin/python bench/gpu_step.py --rows 1,8 --steps 10 --prefix 2048

No checkpoint is needed: the published shape (30 layers, hidden 2816, 128 experts top-8, vocab 262,144, canvas
256; `model.config` preset `diffusiongemma-26b-a4b`) is built with random bf16 weights directly on the GPU. For
each row count it prefills a prompt of `--prefix` tokens per row through the encoder, then times `--steps`
denoising steps of the serving path (decoder forward over every row's canvas, the chunked sampler with keyed
noise, acceptance and the stopping test: one host sync) and prints:

- ms per step, and tokens/s at the reference's typical ~27 steps per canvas (rows x 256 / (27 x step time));
- peak GPU memory (torch.cuda.max_memory_allocated);
- the memory-bandwidth floor: bytes one step must read (every non-expert weight, the experts the step's tokens
  route to — at 256 tokens x top-8 of 128 nearly all of them — the tied LM head once per sampler row group, and
  the KV prefix), divided by the peak bandwidth (`--peak-tbps`, 4.8 for an H200, 3.35 for an H100), and the
  fraction of that floor the measured step reaches.

Anchor from vLLM (FP8, batch 1, an autoregressive step): ~7 ms per forward on an H200, ~9 ms on an H100.

On a machine without CUDA it says so and exits, unless `--allow-cpu`, which runs the same code path on CPU (the
CPU test in tests/model/test_gpu_step_bench.py does so on a tiny config so the script cannot rot). It has not yet
been run on a GPU: no GPU was available when it was written, so bench/README.md holds no GPU figures yet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from model.config import from_name  # noqa: E402
from model.kv_cache import PrefixBatch  # noqa: E402
from model.layers import rope_inv_freq  # noqa: E402
from model.sampling import sampler  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.transformer import DiffusionGemma, TokenBatch  # noqa: E402

STEPS_PER_CANVAS = 27  # the reference's typical denoising steps per canvas at its default settings


def build_model(config_name: str, device: torch.device, dtype: torch.dtype) -> DiffusionGemma:
    """Random weights allocated and initialised on `device` (never materialised on the host)."""
    cfg = from_name(config_name)
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


def floor_bytes(model: DiffusionGemma, rows: int, prefix: PrefixBatch) -> dict[str, float]:
    """Bytes one denoising step of `rows` canvases must read at least."""
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
    kv = prefix.kv_bytes()
    return {
        "weights": counts["non_expert"] * item - embed + experts,
        "lm_head": embed * groups,  # the tied LM head, read once per sampler row group
        "kv": kv,
    }


@torch.no_grad()
def measure(model: DiffusionGemma, rows: int, prefix_len: int, steps: int, peak_tbps: float) -> dict:
    cfg, device = model.config, model.device
    params = SamplingParams(max_denoising_steps=steps + 1, confidence_threshold=1e-9)  # never stops early
    caches = [model.new_cache() for _ in range(rows)]
    prompt = [(7 * i) % cfg.vocab_size for i in range(prefix_len)]
    model.encode(TokenBatch.from_lists([prompt] * rows, [0] * rows, cfg.pad_token_id, device), caches)
    prefix = PrefixBatch(caches)
    states = [
        sampler.RowState.start(params, cfg.vocab_size, cfg.canvas_length, seed=r, device=device)
        for r in range(rows)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, kernel selection) and is not timed
        _sync(device)
        t0 = time.perf_counter()
        soft = torch.stack([s.soft for s in states]) if states[0].soft is not None else None
        hidden = model.denoise(torch.stack([s.canvas for s in states]), prefix, soft)
        sampler.step(model, hidden, states)  # ends with the step's one host sync
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    need = floor_bytes(model, rows, prefix)
    floor_s = sum(need.values()) / (peak_tbps * 1e12)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return {
        "rows": rows,
        "ms_per_step": step_s * 1e3,
        "tokens_per_s": rows * cfg.canvas_length / (STEPS_PER_CANVAS * step_s),
        "peak_gib": peak / 2**30,
        "floor_ms": floor_s * 1e3,
        "floor_fraction": floor_s / step_s,
    }


def run(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="diffusiongemma-26b-a4b", help="model.config preset")
    ap.add_argument("--rows", default="1,4,16,32", help="comma-separated row counts")
    ap.add_argument("--steps", type=int, default=5, help="timed denoising steps per row count")
    ap.add_argument("--prefix", type=int, default=512, help="prompt tokens per row in the KV cache")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="peak memory bandwidth, TB/s (H200 4.8)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no GPU (tests)")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif args.allow_cpu:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        print("gpu_step: no CUDA device here; this benchmark measures a GPU (use --allow-cpu to smoke-test)")
        return []
    t0 = time.perf_counter()
    model = build_model(args.config, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{args.config} on {name} ({dtype}), built in {time.perf_counter() - t0:.1f} s; prefix {args.prefix}"
    )
    print(f"{'rows':>5} {'ms/step':>9} {'tok/s@27':>10} {'peak GiB':>9} {'floor ms':>9} {'of floor':>9}")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        r = measure(model, rows, args.prefix, args.steps, args.peak_tbps)
        results.append(r)
        print(
            f"{r['rows']:>5} {r['ms_per_step']:>9.2f} {r['tokens_per_s']:>10.0f} {r['peak_gib']:>9.2f} "
            f"{r['floor_ms']:>9.2f} {r['floor_fraction']:>9.1%}"
        )
    return results


if __name__ == "__main__":
    run()
