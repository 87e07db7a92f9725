"""Is the trained tiny DiffusionGemma better than noise? Trained checkpoint vs random weights of the same shape.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/tiny_model_quality.py [--model DIR] [--prompts 12]

Both models share the checkpoint's config and tokenizer; the random one is `model.weights.init_random` with
`--random-seed` (seed 0 is the trained model's own starting point in `model/training/train_tiny.py`). Rows:
- held-out denoising / encoder LM loss: `model.training.train.evaluate` (the training objective, first decoder pass
  without self-conditioning, on fixed windows and noise drawn from its own seed) over the held-out split of
  `model.training.corpus.build_corpus()`, with the window size and count the training run logged, so the trained
  column should equal the last held-out figure in `training_log.json` (printed beside it as a check);
- generation from N held-out prompts (`<bos>` + the first `--prompt-tokens` tokens of each held-out file),
  `--canvases` canvases each, with `model.sampling.generate.generate(rng="fast")` at `SamplingParams()` defaults:
  tokens per forward (delivered tokens / decoder forwards over all prompts), mean denoising steps per canvas,
  and the early-stop rate (canvases that stopped before `max_denoising_steps`). Two diagnostics say what holds
  canvases back: positions the entropy bound accepts per step (of the canvas length), and the fraction of
  canvases whose argmax did not change in their last step (the stop test also needs mean entropy under
  `confidence_threshold`).
Then a few of the trained model's completions (prompt -> text). One torch thread by default (shared CPUs).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning workers wait on descheduled peers on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.sampling.generate import GenerateResult, generate  # noqa: E402
from model.sampling.sampler import SamplingParams  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.training.corpus import build_corpus  # noqa: E402
from model.training.train import TokenData, TrainConfig, evaluate  # noqa: E402
from model.training.train_tiny import DEFAULT_OUT  # noqa: E402
from model.transformer import DiffusionGemma  # noqa: E402
from model.weights import init_random, load_model  # noqa: E402


@dataclass
class Prompt:
    path: str  # held-out file it comes from
    ids: list[int]


@dataclass
class Figures:
    losses: dict[str, float]
    results: list[GenerateResult] = field(default_factory=list)
    seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)  # positions accepted, per denoising step
    stable_at_end: list[bool] = field(default_factory=list)  # per canvas: argmax unchanged by its last step

    def canvas_steps(self) -> list[int]:
        return [s for r in self.results for s in r.steps_per_canvas]

    def tokens_per_forward(self) -> float:
        return sum(len(r.token_ids) for r in self.results) / max(1, sum(self.canvas_steps()))

    def early_stops(self, max_steps: int) -> int:
        return sum(s < max_steps for s in self.canvas_steps())


class StepWatch:
    """`on_step` hook: why canvases do or do not stop (acceptance per step; stability of the final argmax)."""

    def __init__(self, figures: Figures):
        self.figures = figures
        self.canvas, self.previous, self.stable = -1, None, False

    def __call__(self, canvas: int, row) -> None:
        if canvas != self.canvas:
            self.close_canvas()
            self.canvas, self.previous = canvas, None
        self.figures.accepted.append(row.accepted)
        self.stable = self.previous is not None and bool(torch.equal(self.previous, row.argmax))
        self.previous = row.argmax.clone()

    def close_canvas(self) -> None:
        if self.previous is not None:
            self.figures.stable_at_end.append(self.stable)
            self.previous = None


def eval_config(model_dir: Path) -> tuple[TrainConfig, dict | None]:
    """Evaluate with the window size and count the training run used, so the figures are comparable."""
    log_file = model_dir / "training_log.json"
    if not log_file.exists():
        return TrainConfig(), None
    log = json.loads(log_file.read_text())
    tc = log.get("train_config", {})
    keep = {k: tc[k] for k in ("window", "eval_windows") if k in tc}
    return TrainConfig(**keep), log


def heldout_prompts(
    texts: list[str], paths: list[str], tok: Tokenizer, count: int, length: int
) -> list[Prompt]:
    prompts = []
    for text, path in zip(texts, paths, strict=True):
        ids = tok.encode(text)
        if len(ids) > length:  # the file must continue past the prompt
            prompts.append(Prompt(path, [tok.bos_id, *ids[:length]]))
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise SystemExit(
            f"only {len(prompts)} held-out files are longer than {length} tokens; lower --prompts"
        )
    return prompts


def measure(
    model: DiffusionGemma, data: TokenData, tc: TrainConfig, prompts: list[Prompt], params: SamplingParams
) -> Figures:
    t0 = time.monotonic()
    figures = Figures(evaluate(model, data, tc))
    for i, prompt in enumerate(prompts):
        watch = StepWatch(figures)
        figures.results.append(generate(model, prompt.ids, params, seed=i, rng="fast", on_step=watch))
        watch.close_canvas()
    figures.seconds = time.monotonic() - t0
    return figures


def print_table(
    trained: Figures, random: Figures, params: SamplingParams, log: dict | None, vocab: int
) -> None:
    m = params.max_denoising_steps
    logged = log["heldout"][-1] if log and log.get("heldout") else None

    def rate(f: Figures) -> str:
        n = len(f.canvas_steps())
        return f"{f.early_stops(m) / n:.2f} ({f.early_stops(m)}/{n})"

    def steps(f: Figures) -> str:
        s = f.canvas_steps()
        return f"{sum(s) / len(s):.1f}"

    def accepted(f: Figures) -> str:
        return f"{sum(f.accepted) / len(f.accepted):.2f}"

    def stable(f: Figures) -> str:
        return f"{sum(f.stable_at_end) / len(f.stable_at_end):.2f}"

    def eos(f: Figures) -> str:
        return f"{sum(r.finish_reason == 'eos' for r in f.results)}/{len(f.results)}"

    rows = [
        (
            "held-out denoising loss (nats)",
            f"{trained.losses['denoising']:.4f}",
            f"{random.losses['denoising']:.4f}",
        ),
        (
            "held-out encoder LM loss (nats)",
            f"{trained.losses['encoder_lm']:.4f}",
            f"{random.losses['encoder_lm']:.4f}",
        ),
        ("tokens per forward", f"{trained.tokens_per_forward():.3f}", f"{random.tokens_per_forward():.3f}"),
        ("mean steps per canvas", steps(trained), steps(random)),
        (f"early-stop rate (< {m} steps)", rate(trained), rate(random)),
        ("accepted positions per step", accepted(trained), accepted(random)),
        ("argmax stable at a canvas's end", stable(trained), stable(random)),
        ("prompts ended by EOS", eos(trained), eos(random)),
        ("seconds (eval + generation)", f"{trained.seconds:.1f}", f"{random.seconds:.1f}"),
    ]
    print(f"{'':34}{'trained':>16}{'random':>16}")
    for name, a, b in rows:
        print(f"{name:34}{a:>16}{b:>16}")
    print(f"(uniform guess: ln V = {math.log(vocab):.4f} nats)")
    if logged:
        print(
            f"training_log.json held-out at step {logged['step']}: denoising {logged['denoising']:.4f}, "
            f"encoder LM {logged['encoder_lm']:.4f}"
        )


def print_samples(figures: Figures, prompts: list[Prompt], tok: Tokenizer, count: int) -> None:
    for i, (prompt, result) in enumerate(list(zip(prompts, figures.results, strict=True))[:count]):
        print(
            f"\n=== sample {i + 1}: {prompt.path} (seed {i}, steps {result.steps_per_canvas}, "
            f"{result.finish_reason}) ===\n--- prompt ---"
        )
        print(tok.decode(prompt.ids))
        print("--- completion ---")
        print(tok.decode(result.token_ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="trained checkpoint directory")
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts to generate from")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="file tokens per prompt (after <bos>)")
    parser.add_argument("--canvases", type=int, default=2, help="max_new_tokens = canvases * canvas_length")
    parser.add_argument("--samples", type=int, default=3, help="trained-model completions to print")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the random-weight model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no checkpoint at {args.model}: run `make tiny-model` or pass --model DIR")
    torch.set_num_threads(args.threads)

    trained = load_model(args.model)
    config = trained.config
    random = init_random(DiffusionGemma(config), seed=args.random_seed).eval()
    tok = Tokenizer.from_dir(args.model, config.pad_token_id, config.eos_token_ids[0], config.bos_token_id)
    corpus = build_corpus()
    heldout = TokenData.from_texts(corpus.heldout_texts, tok.hf)
    heldout.check_matches(config)
    tc, log = eval_config(args.model)
    paths = corpus.manifest["split"]["heldout_paths"]
    prompts = heldout_prompts(corpus.heldout_texts, paths, tok, args.prompts, args.prompt_tokens)
    params = SamplingParams(max_new_tokens=args.canvases * config.canvas_length)

    counts = config.parameter_counts()
    trained_for = (
        f"; trained {log['steps']} steps in {log['seconds']:.0f} s ({log['stopped_by']})" if log else ""
    )
    print(f"checkpoint {args.model}: {counts['total']:,} params, vocab {config.vocab_size}{trained_for}")
    print(
        f"held-out: {len(corpus.heldout_texts)} files, {heldout.num_tokens:,} tokens; losses from "
        f"model.training.train.evaluate on {tc.eval_windows} windows x {tc.window} tokens"
    )
    print(
        f"generation: {len(prompts)} prompts (<bos> + first {args.prompt_tokens} tokens of a held-out file), "
        f"max_new_tokens {params.max_new_tokens} ({args.canvases} canvases of {config.canvas_length}), "
        f"SamplingParams() defaults (max_denoising_steps {params.max_denoising_steps}, entropy_bound "
        f"{params.entropy_bound}, confidence_threshold {params.confidence_threshold}), rng fast, "
        f"{args.threads} thread(s); random model: init_random seed {args.random_seed}\n"
    )
    trained_figures = measure(trained, heldout, tc, prompts, params)
    random_figures = measure(random, heldout, tc, prompts, params)
    print_table(trained_figures, random_figures, params, log, config.vocab_size)
    print_samples(trained_figures, prompts, tok, args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
