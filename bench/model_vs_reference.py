"""Our DiffusionGemma generation against transformers' reference: speed, and sampler memory per row.

Command (from the repo root; about 2 minutes on a busy 2-core machine):

    .venv/bin/python bench/model_vs_reference.py

Two parts, one run:

1. Speed. One small random checkpoint (built and saved by transformers, loaded by `model.weights.load_model`),
   the same prompt and the same sampling settings, timed three ways: our `generate` with rng="fast" (the
   serving path: chunked vocabulary, Gumbel-max, per-row generator), our `generate` with rng="reference" (the
   reference's random calls; checked token-identical to transformers here), and transformers' `generate`.
   Prints delivered tokens/s (median of a few runs after a warm-up) and the ratios to transformers.

2. Sampler memory per row at the published vocabulary (262,144) and canvas (256). Each figure is measured in a
   fresh subprocess as the rise of the process's peak resident memory (VmHWM, reset through
   /proc/self/clear_refs after setup) over its resident memory before the measured work. torch's CPU
   allocations are invisible to tracemalloc, hence the OS counter.
   - sampler: two consecutive denoising steps' sampling work for one row, on a decoder output [1, 256, D]
     and an embedding table [262,144, D] that already exist. Ours: `model.sampling.sampler.step` (rng="fast"). The
     reference's: the calls of `DiffusionGemmaGenerationMixin._denoising_step` after the decoder forward (LM head
     + soft-cap into [1, 256, V] fp32, temperature processor, softmax, multinomial, argmax,
     `EntropyBoundSampler` accept/renoise, `StableAndConfidentStoppingCriteria`) plus the self-conditioning input the
     next forward computes from the carried [1, 256, V] logits (softmax @ embeddings), using transformers'
     own classes where they exist.
   - generate: a whole one-canvas `generate` (2 denoising steps) of a model with a thin body (D = 128,
     2 layers) and the full vocabulary: ours (both rng modes) against transformers' `generate`, beyond the
     loaded weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: repo packages + tests

from model.config import TINY_VISION_CONFIG  # noqa: E402
from tests.tiny import reference_generate  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"
MEMORY_VOCAB, MEMORY_CANVAS, MEMORY_HIDDEN = 262_144, 256, 128


# -- checkpoints ------------------------------------------------------------------------------------------------


def _reference_model(vocab: int, hidden: int, layer_types: list[str], canvas: int, seed: int):
    """A random transformers DiffusionGemmaForBlockDiffusion (the test helpers' recipe, a bit larger)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=len(layer_types),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            global_head_dim=hidden // 2,
            num_global_key_value_heads=1,
            sliding_window=32,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=hidden // 2,
            layer_types=list(layer_types),
        ),
        vision_config=TINY_VISION_CONFIG,
        canvas_length=canvas,
    )
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():  # sharper output distributions than the 0.02-std init, so canvases can converge
        model.model.decoder.embed_tokens.weight.mul_(5)
    return model


def reference_from_preset(name: str, seed: int):
    """A random transformers DiffusionGemmaForBlockDiffusion of one of our presets' shapes (model/config.py),
    with `_reference_model`'s sharper embeddings."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from model.config import from_name

    c = from_name(name)
    sliding = next((s for s in c.layers if s.is_sliding), c.layers[0])
    full = next((s for s in c.layers if not s.is_sliding), c.layers[-1])
    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig(
        text_config=dict(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=sliding.num_kv_heads,
            head_dim=sliding.head_dim,
            global_head_dim=full.head_dim,
            num_global_key_value_heads=full.num_kv_heads,
            sliding_window=c.sliding_window,
            num_experts=c.num_experts,
            top_k_experts=c.top_k,
            moe_intermediate_size=c.moe_intermediate_size,
            layer_types=[s.kind for s in c.layers],
        ),
        vision_config=TINY_VISION_CONFIG,
        canvas_length=c.canvas_length,
    )
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(5)
    return model


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


# -- part 1: speed ----------------------------------------------------------------------------------------------


def _bench_speed(workdir: Path, repeats: int) -> dict:

    from model.sampling.generate import generate
    from model.sampling.params import SamplingParams
    from model.weights import load_model

    ref = _reference_model(4096, 128, [SLIDING, SLIDING, SLIDING, FULL], canvas=64, seed=0)
    ours = load_model(_save(ref, workdir / "speed"))
    params = SamplingParams(max_new_tokens=64, max_denoising_steps=16)
    warm = SamplingParams(max_new_tokens=64, max_denoising_steps=2)
    prompt = torch.randint(3, 4096, (48,), generator=torch.Generator().manual_seed(1)).tolist()

    def run_ours(rng: str, seed: int, p: SamplingParams = params):
        out = generate(ours, prompt, p, seed=seed, rng=rng)
        return out.token_ids, sum(out.steps_per_canvas)

    @torch.no_grad()
    def run_ref(seed: int, p: SamplingParams = params):
        return reference_generate(ref, prompt, p, seed, eos=None)[: p.max_new_tokens], None

    runners = {
        "ours rng=fast": lambda s, p=params: run_ours("fast", s, p),
        "ours rng=reference": lambda s, p=params: run_ours("reference", s, p),
        "transformers": run_ref,
    }
    results, outputs = {}, {}
    for name, fn in runners.items():
        fn(100, warm)  # warm-up: first-call costs (kernels, caches) are not generation speed
        rates, steps = [], None
        for seed in range(repeats):
            start = time.perf_counter()
            outputs[name, seed], steps = fn(seed)
            rates.append(len(outputs[name, seed]) / (time.perf_counter() - start))
        results[name] = {
            "tokens_per_s": statistics.median(rates),
            "tokens": len(outputs[name, 0]),
            "forwards": steps,
        }
    same = sum(outputs["ours rng=reference", s] == outputs["transformers", s] for s in range(repeats))
    return {
        "results": results,
        "identical": same,
        "repeats": repeats,
        "params": params,
        "prompt_len": len(prompt),
    }


# -- part 2: memory (each measurement runs in its own subprocess) -------------------------------------------------


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _measure(work) -> dict:
    """Run `work()` once and return how far it raised peak resident memory over the resident memory before."""
    reset = _reset_peak()
    before = _status_mb("VmRSS")
    peak_before = _status_mb("VmHWM")
    work()
    rise = _status_mb("VmHWM") - (before if reset else peak_before)
    return {"mb": rise, "exact": reset}


def _sampler_inputs():
    from model.config import from_name

    cfg = from_name(
        "tiny-test", vocab_size=MEMORY_VOCAB, hidden_size=MEMORY_HIDDEN, canvas_length=MEMORY_CANVAS
    )
    g = torch.Generator().manual_seed(0)
    weight = torch.empty(MEMORY_VOCAB, MEMORY_HIDDEN).normal_(
        0, 0.1, generator=g
    )  # in place: no transient copy
    hidden = torch.randn(1, MEMORY_CANVAS, MEMORY_HIDDEN, generator=g)
    return cfg, weight, hidden


class _Head(torch.nn.Module):
    """The parts of our model the sampler reads (embedding / tied LM head, soft-cap, embed scale)."""

    def __init__(self, cfg, weight):
        super().__init__()
        self.config = cfg
        self.embed_tokens = torch.nn.Embedding.from_pretrained(weight, freeze=True)

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def embed_scale(self):
        return torch.tensor(self.config.embed_scale).to(self.dtype)


def _child_sampler_ours() -> dict:
    from model.sampling.params import SamplingParams
    from model.sampling.sampler import RowState, step

    cfg, weight, hidden = _sampler_inputs()
    head = _Head(cfg, weight)
    row = RowState.start(
        SamplingParams(), cfg.vocab_size, cfg.canvas_length, torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        step(
            head, hidden[:, :8], [RowState.start(SamplingParams(), cfg.vocab_size, 8, torch.Generator())]
        )  # warm

        def work():
            for _ in range(2):
                step(head, hidden, [row])

        return _measure(work)


def _child_sampler_reference() -> dict:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler,
        EntropyBoundSamplerConfig,
        LinearTemperatureScheduleLogitsProcessor,
        StableAndConfidentStoppingCriteria,
    )

    cfg, weight, hidden = _sampler_inputs()
    cap, steps = cfg.final_logit_softcapping, 48
    embed_scale = torch.tensor(cfg.embed_scale)

    def one_step(sc_logits, canvas, argmax_prev, cur_step, sampler, stopping, processor):
        if sc_logits is not None:  # the next forward's self-conditioning input, from the carried logits
            soft = torch.matmul(sc_logits.softmax(dim=-1, dtype=torch.float32), weight) * embed_scale
            del soft
        logits = (hidden @ weight.T).to(torch.float32)  # lm_head + softcap, as the model's forward
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
        processed = processor(None, logits, cur_step=cur_step)
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
        denoised = torch.multinomial(probs.view(-1, cfg.vocab_size), num_samples=1).view(1, -1)
        argmax = torch.argmax(processed, dim=-1)
        accepted = sampler.accept_canvas(canvas, denoised, processed, cur_step)
        canvas = sampler.renoise_canvas(accepted.clone(), cur_step).clone()
        stopping(argmax, processed)
        return processed, canvas, argmax

    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(0.1), cfg.canvas_length, cfg.vocab_size, steps)
    stopping = StableAndConfidentStoppingCriteria(1, 0.005)
    processor = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, steps)
    canvas = sampler.initialize_canvas(1, "cpu")
    with torch.no_grad():
        torch.softmax(hidden[0, :8] @ weight[:64].T, -1).multinomial(1)  # warm

        def work():
            sc, c, a = None, canvas, None
            for s in range(2):
                sc, c, a = one_step(sc, c, a, torch.tensor(steps - s), sampler, stopping, processor)

        return _measure(work)


def _generate_settings():
    from model.sampling.params import SamplingParams

    return SamplingParams(max_new_tokens=MEMORY_CANVAS, max_denoising_steps=2), [5, 6, 7, 8, 9, 10, 11, 12]


def _child_generate_ours(path: str, rng: str) -> dict:
    from model.sampling.generate import generate
    from model.weights import load_model

    model = load_model(path)
    params, prompt = _generate_settings()
    with torch.no_grad():
        return _measure(lambda: generate(model, prompt, params, seed=0, rng=rng))


def _child_generate_reference(path: str) -> dict:
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    params, prompt = _generate_settings()

    def work():
        reference_generate(model, prompt, params, 0, eos=model.generation_config.eos_token_id)

    with torch.no_grad():
        return _measure(work)


CHILDREN = {
    "sampler-ours": lambda path: _child_sampler_ours(),
    "sampler-reference": lambda path: _child_sampler_reference(),
    "generate-ours-fast": lambda path: _child_generate_ours(path, "fast"),
    "generate-ours-reference": lambda path: _child_generate_ours(path, "reference"),
    "generate-transformers": lambda path: _child_generate_reference(path),
}


# Every allocation of 1 MiB or more is its own mapping, returned to the OS when freed, so resident memory follows
# the live tensors. glibc's default (a threshold that adapts upwards) may keep freed tensors in the heap, which
# adds 0-150 MB of allocator noise to either side.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _in_subprocess(name: str, path: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--path", str(path), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if out.returncode:
        raise RuntimeError(f"memory measurement {name!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bench_memory(workdir: Path, threads: int) -> dict:
    ref = _reference_model(MEMORY_VOCAB, MEMORY_HIDDEN, [SLIDING, FULL], canvas=MEMORY_CANVAS, seed=0)
    path = _save(ref, workdir / "memory")
    del ref
    return {name: _in_subprocess(name, path, threads) for name in CHILDREN}


# -- report -------------------------------------------------------------------------------------------------------


def _print_speed(speed: dict, threads: int) -> None:
    p = speed["params"]
    print(
        f"\n## Speed: hidden 128, 4 layers (3 sliding + 1 full), 8 experts top-2, vocab 4096, canvas 64, "
        f"prompt {speed['prompt_len']} tokens, torch threads {threads}"
    )
    print(
        f"   settings: max_new_tokens={p.max_new_tokens} max_denoising_steps={p.max_denoising_steps} "
        f"entropy_bound={p.entropy_bound} t={p.t_max}->{p.t_min} stability={p.stability_threshold} "
        f"confidence={p.confidence_threshold}"
    )
    base = speed["results"]["transformers"]["tokens_per_s"]
    print(f"   {'':22}{'tokens/s':>10}{'vs transformers':>17}{'tokens':>8}{'forwards':>10}")
    for name, r in speed["results"].items():
        fwd = "-" if r["forwards"] is None else str(r["forwards"])
        print(
            f"   {name:22}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base:>16.2f}x{r['tokens']:>8}{fwd:>10}"
        )
    print(
        f"   ours rng=reference token-identical to transformers: {speed['identical']} of {speed['repeats']} seeds "
        "(fp-level differences can flip a near-tie in MoE top-k routing: expected, not guaranteed)"
    )


def _print_memory(mem: dict) -> None:
    exact = all(m["exact"] for m in mem.values())
    print(
        f"\n## Peak memory per row, vocab {MEMORY_VOCAB:,}, canvas {MEMORY_CANVAS}, hidden {MEMORY_HIDDEN}, fp32 "
        f"(rise of peak RSS in a fresh process{'' if exact else '; VmHWM reset unavailable: upper bound'})"
    )
    print(f"   {'':34}{'ours MB':>10}{'reference MB':>14}{'reference/ours':>16}")
    rows = [
        ("sampler, 2 steps (rng=fast)", "sampler-ours", "sampler-reference"),
        ("generate, 1 canvas, rng=fast", "generate-ours-fast", "generate-transformers"),
        ("generate, 1 canvas, rng=reference", "generate-ours-reference", "generate-transformers"),
    ]
    for label, ours, ref in rows:
        a, b = mem[ours]["mb"], mem[ref]["mb"]
        print(f"   {label:34}{a:>10.1f}{b:>14.1f}{b / max(a, 1e-9):>15.1f}x")
    full = MEMORY_CANVAS * MEMORY_VOCAB * 4 / 2**20
    print(f"   (one [1, {MEMORY_CANVAS}, {MEMORY_VOCAB}] fp32 tensor is {full:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable figures on a shared host)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.path)))
        return
    started = time.perf_counter()
    load, cpus = os.getloadavg()[0], os.cpu_count()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load:.1f} on {cpus} CPUs")
    if args.threads > 1 and load > cpus - args.threads + 0.5:
        print(
            "   note: the machine is busy; with several threads every parallel op waits for a descheduled one, which\n"
            "   slows many-small-op code (transformers' MoE loop most of all) far more than it would on idle cores"
        )
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        if not args.skip_speed:
            _print_speed(_bench_speed(Path(tmp), args.repeats), args.threads)
        if not args.skip_memory:
            _print_memory(_bench_memory(Path(tmp), args.threads))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
