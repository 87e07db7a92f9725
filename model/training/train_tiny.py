"""`make tiny-model`: train the small DiffusionGemma that `make serve` and `blockserve generate` use by default.

    python -m model.training.train_tiny [--out DIR] [--minutes M] [--seed S] [--max-steps N]

Steps: build the stdlib corpus (model/training/corpus.py), train a byte-level BPE tokenizer on its training split
(model/training/bpe.py), build a tiny config of the real architecture (both attention kinds, GQA, keys-as-values, partial
RoPE, MoE), train it with model/training/train.py, and write a checkpoint in the published layout: `config.json`,
`model.safetensors`, `generation_config.json` (model/weights.py), `tokenizer.json`, plus `corpus_manifest.json`
(source, licence, size) and `training_log.json` (loss curve, held-out losses, steps, seconds, seed).

The run is deterministic by step for a seed; `--minutes` is a wall-clock safety stop (the log records whether
it fired, in which case the checkpoint depends on machine speed).
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP. On shared cores, spinning OpenMP workers wait on descheduled peers at every
# barrier: measured on this 2-core machine under load ~4.5, 42 s/step spinning vs 5.3 s/step passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from model.config import FULL, PRESETS, SLIDING, ModelConfig, build_config  # noqa: E402
from model.training import bpe  # noqa: E402
from model.training.chat_tokens import write_chat_files  # noqa: E402
from model.training.corpus import build_corpus  # noqa: E402
from model.training.train import TokenData, TrainConfig, TrainResult, train  # noqa: E402
from model.transformer import DiffusionGemma  # noqa: E402
from model.weights import init_random, save_model  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "tiny-diffusiongemma"
PRESET = "tiny-trained"
MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def tiny_config(vocab_size: int) -> ModelConfig:
    """The lead's `tiny-trained` preset if there is one, else our shape: ~3.7M parameters, 4 layers."""
    if PRESET in PRESETS:
        config = dataclasses.replace(PRESETS[PRESET], vocab_size=vocab_size)
    else:
        config = build_config(
            vocab_size=vocab_size,
            hidden_size=160,
            intermediate_size=384,
            layer_types=[SLIDING, SLIDING, SLIDING, FULL],
            num_heads=4,
            head_dim=32,
            num_kv_heads=2,
            global_head_dim=64,
            num_global_kv_heads=1,
            sliding_window=64,
            num_experts=8,
            top_k=2,
            moe_intermediate_size=128,
            canvas_length=32,
            name=PRESET,
        )
    # The special ids come from the tokenizer (pad 0, eos 1, bos 2), so model and tokenizer cannot disagree.
    return dataclasses.replace(
        config, pad_token_id=bpe.PAD_ID, eos_token_ids=(bpe.EOS_ID,), bos_token_id=bpe.BOS_ID, name=PRESET
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        max_steps=args.max_steps,
        max_seconds=args.minutes * 60,
        anneal_by_time=args.anneal_by_time,
        batch_size=args.batch_size,
        window=args.window,
        lr=3e-3,
        warmup_steps=min(100, max(1, args.max_steps // 20)),
        seed=args.seed,
        eval_every=max(1, args.max_steps // 10),
        eval_windows=args.eval_windows,
        threads=args.threads,
    )


def write_log(out: Path, result: TrainResult, tc: TrainConfig, config: ModelConfig, extra: dict) -> None:
    log = {
        "seed": tc.seed,
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "stopped_by": result.stopped_by,
        "train_config": dataclasses.asdict(tc),
        "parameters": config.parameter_counts(),
        "heldout": result.evals,
        "loss_curve": result.history,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": tc.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        **extra,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def checkpoint_bytes(out: Path) -> int:
    return sum((out / name).stat().st_size for name in CHECKPOINT_FILES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--minutes", type=float, default=58.0, help="wall-clock budget for training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=560, help="steps (the LR schedule spans them)")
    parser.add_argument("--vocab-size", type=int, default=bpe.DEFAULT_VOCAB_SIZE)
    parser.add_argument(
        "--anneal-by-time",
        action="store_true",
        help="decay the LR over --minutes when that ends first (a slow machine still gets an annealed model; "
        "the step count then depends on machine speed)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows per evaluation")
    parser.add_argument("--corpus-bytes", type=int, default=None, help="cap the corpus (for quick trials)")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    corpus = build_corpus(max_bytes=args.corpus_bytes)
    tokenizer = bpe.train_bpe(corpus.train_texts, vocab_size=args.vocab_size)
    config = tiny_config(tokenizer.get_vocab_size())
    train_data = TokenData.from_texts(corpus.train_texts, tokenizer)
    heldout = TokenData.from_texts(corpus.heldout_texts, tokenizer) if corpus.heldout_texts else None
    counts = config.parameter_counts()
    print(
        f"corpus: {corpus.manifest['num_files']} files, {corpus.manifest['num_bytes']:,} bytes, "
        f"{train_data.num_tokens:,} train tokens; model: {counts['total']:,} params "
        f"({counts['active']:,} active); prep {time.monotonic() - t0:.1f}s",
        flush=True,
    )
    torch.manual_seed(args.seed)
    model = init_random(DiffusionGemma(config), seed=args.seed)
    tc = train_config(args)
    result = train(model, train_data, tc, heldout=heldout, log=lambda line: print(line, flush=True))

    out = args.out
    save_model(model.eval(), out)
    bpe.save(tokenizer, out / "tokenizer.json")
    write_chat_files(out)  # turn markers, chat_template.jinja, tokenizer_config.json
    corpus.write_manifest(out / "corpus_manifest.json")
    extra = {"train_tokens": train_data.num_tokens, "heldout_tokens": heldout.num_tokens if heldout else 0}
    write_log(out, result, tc, config, extra)
    size = checkpoint_bytes(out)
    print(f"wrote {out} ({size / 1e6:.1f} MB) after {result.steps} steps, {result.seconds:.0f}s", flush=True)
    if size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(
            f"checkpoint is {size:,} bytes, over the {MAX_CHECKPOINT_BYTES:,} budget: shrink the config"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
