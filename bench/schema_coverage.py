"""Coverage of real-world JSON Schemas by the regular-constraint compiler, validity of its outputs, and costs.

    .venv/bin/python bench/schema_coverage.py [--seeds 3] [--big 3] [--positions 256] [--schema-seconds 10]
        [--step-schemas 20] [--sources function_calling,schemastore_small] [--model DIR] [--steps-only]

`--steps-only` skips the coverage and validation part: the per-step costs of the first schemas that compile.

Schemas come from bench/schemas/*.jsonl (one source per file; bench/schemas/SOURCES.md records where each
file comes from and its licence). For every schema, with the shipped default model's tokenizer:
- accepted or refused (the refusal's keyword is tallied), compile time (DFA + token automaton), each schema
  under a build bound of `--schema-seconds` (a schema past it is refused, as the server would, and tallied);
- for accepted ones, `--seeds` outputs decoded by the constrained DP from random per-position scores over
  `--positions` positions, each parsed and validated with `jsonschema` (formats checked): must be 100%.
Then the per-step constraint cost, against one plain model step (decoder forward + the unconstrained
sampler of this checkout) on the same canvas, each the minimum of `--repeats` runs: the hook (time inside
model/structured/decode.py's JointStep: per-(block, atom) statistics of every vocabulary chunk, both DPs, the
in-atom token picks) and the extra draw time (constrained draw - unconstrained draw of the same hidden states:
the hook plus whatever the sampler does only for constrained rows, such as masking; the two minima's difference):
- at the default model (its vocabulary and canvas), for the first `--step-schemas` accepted schemas;
- at vocabulary 262,144 (`small-cpu` preset, random weights, canvas 256) for the first `--big` accepted
  schemas, with a synthetic BPE-like 262,144-token vocabulary (the 256 bytes, then random concatenations of
  JSON punctuation, digits, words and UTF-8 pieces; no tokenizer of that size ships with the repo):
  compile time, token-table memory (automaton arrays) and peak memory of the lift (tracemalloc), constraint
  time per step.
The machine may be shared: compare the ratios printed from one run, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.env import DEFAULT_MODEL_PATH  # noqa: E402
from deployments.requests import _constraints  # noqa: E402
from model.config import ModelConfig, from_name  # noqa: E402
from model.kv_cache import PrefixBatch  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.sampling.sampler import RowState, draw_fast  # noqa: E402
from model.structured import decode  # noqa: E402
from model.structured.automaton import lift  # noqa: E402
from model.structured.constraint import RegularLayout, compile_json_schema  # noqa: E402
from model.structured.dp import best_tokens, goal_states  # noqa: E402
from model.structured.schema_regular import RegularLimits, schema_dfa  # noqa: E402
from model.structured.token_classes import TokenClasses, token_classes_for  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.transformer import DiffusionGemma, TokenBatch  # noqa: E402
from model.weights import init_random, load_model  # noqa: E402

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def load_sources() -> dict[str, list[dict]]:
    return {
        f.stem: [json.loads(line) for line in f.open() if line.strip()]
        for f in sorted(SCHEMAS.glob("*.jsonl"))
    }


def refusal(exc: Exception) -> str:
    if "took too long" in str(exc):
        return "build time bound"
    return getattr(exc, "feature", None) or type(exc).__name__


def sample_outputs(compiled, classes, seeds: int, positions: int) -> list[str]:
    ta = compiled.automaton
    lay = RegularLayout(compiled, positions, 1, classes.pad_id)
    out = []
    for seed in range(seeds):
        scores = np.random.default_rng(seed).normal(size=(positions, classes.vocab_size)) * 3
        ids = best_tokens(ta, scores, 0, goal_states(ta, 0))
        out.append(lay.fill(ids.tolist(), classes.token_bytes).text)
    return out


def coverage(sources, classes, args) -> list:
    accepted_all = []
    print(
        f"{'source':<22}{'schemas':>8}{'accepted':>10}{'share':>8}{'outputs valid':>15}{'compile s (med/max)':>22}"
    )
    for name, entries in sources.items():
        accepted, valid, total_out, times, refused = 0, 0, 0, [], Counter()
        for entry in entries:
            t0 = time.perf_counter()
            try:
                compiled = compile_json_schema(entry["schema"], classes, args.limits)
            except ValueError as exc:
                refused[refusal(exc)] += 1
                continue
            times.append(time.perf_counter() - t0)
            if compiled.min_tokens > args.positions:
                refused["longer than --positions"] += 1
                continue
            accepted += 1
            accepted_all.append(entry)
            for text in sample_outputs(compiled, classes, args.seeds, args.positions):
                total_out += 1
                try:
                    jsonschema.validate(json.loads(text), entry["schema"], format_checker=CHECKER)
                    valid += 1
                except (jsonschema.ValidationError, json.JSONDecodeError) as exc:
                    print(f"  INVALID output for {entry['name']}: {str(exc)[:200]}")
        med = statistics.median(times) if times else 0.0
        print(
            f"{name:<22}{len(entries):>8}{accepted:>10}{accepted / max(1, len(entries)):>8.0%}"
            f"{f'{valid}/{total_out}':>15}{f'{med:.2f}/{max(times, default=0):.2f}':>22}"
        )
        if refused:
            print("  refused:", ", ".join(f"{k} x{v}" for k, v in refused.most_common()))
    return accepted_all


class _HookClock:
    """Seconds spent inside JointStep (begin, every chunk, finish) while installed."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = {}

    def __enter__(self):
        for name in ("begin", "chunk", "finish"):
            raw = getattr(decode.JointStep, name)
            self.saved[name] = decode.JointStep.__dict__[name]
            setattr(decode.JointStep, name, self._timed(raw, name == "begin"))
        return self

    def _timed(self, raw, is_classmethod: bool):
        clock = self

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return raw(*a[1:], **k) if is_classmethod else raw(*a, **k)
            finally:
                clock.seconds += time.perf_counter() - t0

        return classmethod(timed) if is_classmethod else timed

    def __exit__(self, *exc):
        for name, raw in self.saved.items():
            setattr(decode.JointStep, name, raw)


@torch.no_grad()
def step_costs(model, classes, entries, limits, repeats: int = 3) -> list[tuple[float, float, float]]:
    """(plain model step, hook, extra) seconds per schema, each the minimum over `repeats`: the plain step is
    the decoder forward + the unconstrained sampler; the hook is the time inside JointStep; extra is the
    fastest constrained draw minus the fastest unconstrained draw of the same hidden states (the hook plus
    anything else the sampler does only for constrained rows)."""
    cfg = model.config
    torch.manual_seed(0)
    cache = model.new_cache()
    model.encode(TokenBatch.from_lists([[2] + list(range(5, 21))], [0], cfg.pad_token_id), [cache])
    prefix = PrefixBatch([cache])
    params = SamplingParams()
    out = []
    for entry in entries:
        compiled = compile_json_schema(entry["schema"], classes, limits)
        canvases = max(1, -(-compiled.min_tokens // cfg.canvas_length))
        cons = _constraints(RegularLayout(compiled, cfg.canvas_length, canvases, cfg.pad_token_id))[0]
        model_t, hook_t, plain_t, cons_t = [], [], [], []
        for _ in range(repeats):
            row = RowState.start(params, cfg.vocab_size, cfg.canvas_length, 0)
            t0 = time.perf_counter()
            hidden = model.denoise(row.canvas[None], prefix, None)
            t1 = time.perf_counter()
            draw_fast(model, hidden, [row])
            t2 = time.perf_counter()
            crow = RowState.start(params, cfg.vocab_size, cfg.canvas_length, 0, cons)
            with _HookClock() as clock:
                t3 = time.perf_counter()
                draw_fast(model, hidden, [crow])
                t4 = time.perf_counter()
            model_t.append(t2 - t0)
            hook_t.append(clock.seconds)
            plain_t.append(t2 - t1)
            cons_t.append(t4 - t3)
        out.append((min(model_t), min(hook_t), min(cons_t) - min(plain_t)))
    return out


def synthetic_vocab(size: int) -> list[bytes]:
    """Specials, the 256 single bytes, then pieces of words, digits, JSON punctuation and UTF-8 text."""
    rng = random.Random(0)
    pieces = [
        w.encode() for w in "the name id type value list user date time url of in to and é ü 東 京".split()
    ]
    pieces += [
        b" ",
        b'"',
        b'":',
        b'",',
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"-",
        b".",
        b"_",
        b"0",
        b"12",
        b"2024",
    ]
    alphabet = [bytes([b]) for b in range(97, 123)]
    vocab = [b""] * 4 + [bytes([b]) for b in range(256)]
    while len(vocab) < size:
        vocab.append(
            b"".join(rng.choice(pieces if rng.random() < 0.5 else alphabet) for _ in range(rng.randint(1, 6)))
        )
    return vocab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--big", type=int, default=3, help="accepted schemas measured at vocabulary 262,144")
    p.add_argument("--schema-seconds", type=float, default=10.0, help="build time bound per schema")
    p.add_argument(
        "--step-schemas", type=int, default=20, help="accepted schemas timed per step (default model)"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="runs per timed step (the minimum is kept; 262,144: one fewer)"
    )
    p.add_argument("--sources", default="", help="comma-separated source names (default: all)")
    p.add_argument("--steps-only", action="store_true", help="skip validating outputs: time the steps only")
    args = p.parse_args()
    args.limits = RegularLimits(max_build_seconds=args.schema_seconds)
    torch.set_num_threads(1)
    cfg = ModelConfig.from_file(args.model)
    tok = Tokenizer.from_dir(args.model, pad_id=cfg.pad_token_id)
    classes = token_classes_for(tok, cfg.vocab_size)
    print(
        f"== coverage: tokenizer of {args.model} (vocab {cfg.vocab_size}), {args.seeds} outputs per accepted schema, "
        f"build bound {args.schema_seconds:g} s per schema; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    sources = load_sources()
    if args.sources:
        sources = {k: v for k, v in sources.items() if k in args.sources.split(",")}
    if args.steps_only:  # the first schemas that compile, in source order: no coverage, no validation
        accepted = []
        for entry in (e for entries in sources.values() for e in entries):
            if len(accepted) >= max(args.step_schemas, args.big):
                break
            try:
                if compile_json_schema(entry["schema"], classes, args.limits).min_tokens <= args.positions:
                    accepted.append(entry)
            except ValueError:
                continue
    else:
        accepted = coverage(sources, classes, args)

    print(
        f"\n== per-step constraint cost, default model (vocab {cfg.vocab_size}, canvas {cfg.canvas_length}), 1 thread"
    )
    model = load_model(args.model).eval()
    costs = step_costs(model, classes, accepted[: args.step_schemas], args.limits, args.repeats)
    for k, what in ((1, "hook (inside JointStep)"), (2, "extra (constrained draw - plain draw)")):
        ratios = [c[k] / c[0] for c in costs]
        worst = accepted[max(range(len(costs)), key=ratios.__getitem__)]["name"]
        print(
            f"{what}: median {statistics.median(c[k] for c in costs) * 1e3:.1f} ms "
            f"({statistics.median(ratios):.0%} of the plain step), max {max(c[k] for c in costs) * 1e3:.1f} ms, "
            f"max share {max(ratios):.0%} ({worst}) over {len(costs)} schemas"
        )
    print(
        f"plain model step (forward + unconstrained sampler) median {statistics.median(c[0] for c in costs) * 1e3:.1f} ms; goal <= 25%"
    )

    big = from_name("small-cpu")
    print(
        f"\n== vocabulary {big.vocab_size} (small-cpu preset, random weights, canvas {big.canvas_length}), {args.big} schemas"
    )
    classes_big = TokenClasses(synthetic_vocab(big.vocab_size), pad_id=big.pad_token_id)
    big_model = init_random(DiffusionGemma(big), seed=0).eval()
    chosen = accepted[: args.big]
    for entry in chosen:
        t0 = time.perf_counter()
        dfa = schema_dfa(entry["schema"], args.limits)
        t1 = time.perf_counter()
        tracemalloc.start()
        lift(dfa, classes_big)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t2 = time.perf_counter()
        compiled = compile_json_schema(
            entry["schema"], classes_big, args.limits
        )  # cached by the timing below
        ((m, c, x),) = step_costs(
            big_model, classes_big, [entry], args.limits, repeats=max(1, args.repeats - 1)
        )
        ta = compiled.automaton
        print(
            f"{entry['name'][:28]:<30} dfa {t1 - t0:5.1f} s  lift {t2 - t1:5.1f} s  states {ta.num_states:5d}  "
            f"atoms {ta.num_atoms:5d}  tables {ta.nbytes / 2**20:5.1f} MiB  lift peak {peak / 2**20:6.1f} MiB  "
            f"step {m * 1e3:7.1f} ms  hook {c * 1e3:7.1f} ms ({c / m:.0%})  extra {x * 1e3:7.1f} ms ({x / m:.0%})"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
