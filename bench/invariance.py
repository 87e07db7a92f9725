"""Which part of the step changes a row's bits when it is batched: batch invariance, component by component.

Command (from the repo root; seconds on a GPU for tiny-test, ~1 minute for the published shape):

    python3 bench/invariance.py                                   # tiny-test, bf16 on CUDA, 16 rows
    python3 bench/invariance.py --config diffusiongemma-26b-a4b --prompt-step 37 --dtype bfloat16
    python3 bench/invariance.py --allow-cpu --dtype float32       # the same code on CPU (the tests do this)
    .venv/bin/python bench/invariance.py --cpu-kernels 1,2,16     # the CPU GEMM / GELU sweep (below)

blockserve promises that a request's tokens depend only on the request and its seed, whatever it is batched
with. `bench/gpu_step.py` checks that end to end (tokens alone vs batched); this script says *where* a
difference starts when that check fails. `rows` prompts of different lengths are run through the model twice —
the focus row alone (a batch of one) and the same row inside the batch of all of them — in three parts:

- encoder (prefill of the prompts, causal, writes the KV cache);
- decoder (one denoising forward over a random canvas and random self-conditioning input, reading prefixes
  that both runs encoded alone, so they hold the same bits);
- sampler (`draw_keyed`: logits, the keyed sample, argmax, entropy and the soft embeddings of a step).

Every layer of the batched run gets the focus row's input *from the alone run* (a forward pre-hook overwrites
it), so inside each layer the first sub-step whose output differs for that row is where batching changed
bits, not an echo of an earlier layer. The sub-steps, in call order: input norm, q/k/v projection (with q/k
norms and RoPE), attention (the input of o_proj), o_proj, the dense MLP (gate/up product and GELU, then its
down projection), the router (weights and expert ids), the experts, and the norms between them. The sampler gets
the same hidden rows in both runs.

It prints, for each part, how many layers first differ at each sub-step (with the largest absolute difference
seen there), or that none did. On CPU every count is 0 (tests/model/test_invariance_bench.py pins it).

`--cpu-kernels T1,T2,...` runs the sweep behind the two CPU fixes instead: per thread count, the row counts at
which a row of a raw fp32 `F.linear` (and of `model.layers.linear`, padded to multiples of 8 rows) differs from
the same row in a 256-row product, and how many sizes of [n, 64] change some row's bits under raw `F.gelu` (and
under `gelu_tanh`, whose thread shares are padded to whole vector runs) against one thread.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_step's model builder

from gpu_step import build_model  # noqa: E402

from model import gemm  # noqa: E402
from model.sampling.sampler import draw_keyed  # noqa: E402
from model.transformer import DiffusionGemma, TokenBatch  # noqa: E402

# (sub-step, attribute path under a Layer, what is recorded: the module's "in"put or its "out"put)
SUBSTEPS = (
    ("input norm", "input_layernorm", "out"),
    ("attention core", "self_attn.o_proj", "in"),
    ("o_proj", "self_attn.o_proj", "out"),
    ("post-attention norm", "post_attention_layernorm", "out"),
    ("pre-MLP norm", "pre_feedforward_layernorm", "out"),
    ("MLP gate/up + GELU", "mlp.down_proj", "in"),
    ("MLP down", "mlp.down_proj", "out"),
    ("post-MLP norm", "post_feedforward_layernorm_1", "out"),
    ("router", "router", "out"),
    ("pre-experts norm", "pre_feedforward_layernorm_2", "out"),
    ("experts", "experts", "out"),
    ("post-experts norm", "post_feedforward_layernorm_2", "out"),
    ("feed-forward norm", "post_feedforward_layernorm", "out"),
)


@dataclass
class Focus:
    """Where the focus row's tokens sit in one run: row `row` of a [B, T] batch, its first `n` tokens valid."""

    row: int
    B: int
    T: int
    n: int

    def cut(self, t: torch.Tensor, heads: bool = False) -> torch.Tensor:
        """The focus row's valid tokens of t: [B, T, ...], flat [B*T, ...] or (heads) [B, heads, T, d]."""
        if heads:
            return t[self.row, :, : self.n]
        if t.shape[0] == self.B * self.T and not (t.dim() >= 2 and t.shape[:2] == (self.B, self.T)):
            t = t.reshape(self.B, self.T, *t.shape[1:])
        return t[self.row, : self.n]


@dataclass
class Record:
    """What one run saw of the focus row: (layer, sub-step) -> tensors, in call order; each layer's input."""

    steps: list[tuple[int, str, tuple[torch.Tensor, ...]]] = field(default_factory=list)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)


def _tensors(value) -> tuple[torch.Tensor, ...]:
    return tuple(v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor))


@torch.no_grad()
def _recorded(model: DiffusionGemma, focus: Focus, run, substitute: Record | None = None) -> Record:
    """Runs `run()` with hooks that record the focus row's sub-step outputs (and, with `substitute`, give each
    layer the focus row's input from that earlier record)."""
    rec = Record()
    handles = []

    def keep(layer: int, name: str, value, heads: bool = False) -> None:
        rec.steps.append((layer, name, tuple(focus.cut(t, heads).clone() for t in _tensors(value))))

    for layer in model.layers:
        i = layer.index

        def pre(module, args, i=i):
            h = args[0]
            if substitute is not None:  # the same input for the focus row as in the other run
                h = h.clone()
                h[focus.row, : focus.n] = substitute.inputs[i]
            rec.inputs[i] = focus.cut(h).clone()
            return (h, *args[1:])

        def post(module, args, out, i=i):
            keep(i, "layer output", out[0])
            keep(i, "new keys / values", out[1:], heads=True)

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        for name, path, side in SUBSTEPS:
            module = layer.get_submodule(path)

            def hook(module, args, out, i=i, name=name, side=side):
                keep(i, name, args[0] if side == "in" else out)

            handles.append(module.register_forward_hook(hook))
        attn = layer.self_attn
        project = attn.project

        def projected(*a, i=i, project=project, **k):
            out = project(*a, **k)
            keep(i, "q/k/v projection", out, heads=True)
            return out

        attn.project = projected  # an instance attribute shadows the method until deleted
    # around the layers: the decoder's self-conditioning input (before layer 0) and the final norm
    handles.append(
        model.self_conditioning.register_forward_hook(lambda m, a, out: keep(-1, "self-conditioning", out))
    )
    final = len(model.layers)
    handles.append(model.norm.register_forward_hook(lambda m, a, out: keep(final, "final norm", out)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for layer in model.layers:
            del layer.self_attn.project
    return rec


def _first_differences(alone: Record, batched: Record) -> dict[str, list[float]]:
    """Per layer, the first sub-step whose focus-row tensors differ (bitwise): sub-step -> max |difference| of
    each layer where it was first. The final norm (after the last layer, whose output is not substituted)
    counts only when the last layer's output was the same."""
    if [(i, n) for i, n, _ in alone.steps] != [(i, n) for i, n, _ in batched.steps]:
        raise RuntimeError("the alone and batched runs called different sub-steps")
    first: dict[int, tuple[str, float]] = {}
    final = max(i for i, _, _ in alone.steps)
    for (i, name, a), (_, _, b) in zip(alone.steps, batched.steps, strict=True):
        if i in first or (i == final and i - 1 in first):
            continue
        diffs = [d for d in map(_difference, a, b) if d is not None]
        if diffs:
            first[i] = (name, max(diffs))
    out: dict[str, list[float]] = {}
    for name, diff in first.values():
        out.setdefault(name, []).append(diff)
    return out


def _difference(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """None when x and y hold the same bits, else their largest absolute difference (inf: other shapes)."""
    if x.shape != y.shape:
        return float("inf")
    return None if torch.equal(x, y) else (x.double() - y.double()).abs().max().item()


def prompts(vocab: int, rows: int, base: int = 3, step: int = 5) -> list[list[int]]:
    """`rows` prompts of lengths base, base + step, ...: every row's prefix length differs."""
    return [[3 + (11 * r + 5 * j) % (vocab - 3) for j in range(base + step * r)] for r in range(rows)]


def _encoded(model: DiffusionGemma, rows: list[list[int]]):
    """Caches holding `rows`' prompts, one encode call over all of them."""
    caches = [model.new_cache(len(p) + model.config.canvas_length) for p in rows]
    batch = TokenBatch.from_lists(rows, [0] * len(rows), 0, device=model.device)
    model.encode(batch, caches)
    return caches


def locate(model: DiffusionGemma, rows: list[list[int]], focus_rows: list[int]) -> dict[str, dict]:
    """For each focus row, alone vs batched with all `rows`: {part: {sub-step: [max |diff| per layer where it
    first differed]}} summed over the focus rows, and the sampler's differing outputs."""
    device, L, D = model.device, model.config.canvas_length, model.config.hidden_size
    B, T = len(rows), max(len(p) for p in rows)
    g = torch.Generator(device="cpu").manual_seed(7)
    canvas = torch.randint(3, model.config.vocab_size, (B, L), generator=g).to(device)
    soft = (torch.randn(B, L, D, generator=g) * 0.5).to(device=device, dtype=model.dtype)
    inv_t = torch.linspace(1.0, 2.0, B, device=device)
    seeds = torch.arange(1000, 1000 + B, device=device)
    canvas_index, steps = torch.zeros(B, dtype=torch.long, device=device), torch.full((B,), 3, device=device)
    report: dict[str, dict] = {"encoder": {}, "decoder": {}, "sampler": {}}
    # prefixes for the decoder part: every prompt encoded alone, so both runs read the same cached bits
    prefix_caches = [_encoded(model, [p])[0] for p in rows]
    try:
        # the sampler gets the same hidden rows alone and batched: the batch's step is drawn once
        with torch.no_grad():
            hidden = model.denoise(canvas, model.prefix(prefix_caches), soft)
            many = draw_keyed(model, hidden, inv_t, seeds, canvas_index, steps, None)
        for f in focus_rows:
            n = len(rows[f])
            alone_f, batch_f = Focus(0, 1, n, n), Focus(f, B, T, n)
            parts = {
                "encoder": (
                    lambda f=f: [c.release() for c in _encoded(model, [rows[f]])],
                    lambda: [c.release() for c in _encoded(model, rows)],
                ),
                "decoder": (
                    lambda f=f: model.denoise(
                        canvas[f : f + 1], model.prefix([prefix_caches[f]]), soft[f : f + 1]
                    ),
                    lambda: model.denoise(canvas, model.prefix(prefix_caches), soft),
                ),
            }
            for part, (run_alone, run_batched) in parts.items():
                a_focus = alone_f if part == "encoder" else Focus(0, 1, L, L)
                b_focus = batch_f if part == "encoder" else Focus(f, B, L, L)
                alone = _recorded(model, a_focus, run_alone)
                batched = _recorded(model, b_focus, run_batched, substitute=alone)
                for name, diffs in _first_differences(alone, batched).items():
                    report[part].setdefault(name, []).extend(diffs)
            with torch.no_grad():
                one = draw_keyed(
                    model,
                    hidden[f : f + 1],
                    inv_t[f : f + 1],
                    seeds[f : f + 1],
                    canvas_index[:1],
                    steps[:1],
                    None,
                )
            for name in ("sampled", "argmax", "entropy", "soft"):
                diff = _difference(getattr(one, name)[0], getattr(many, name)[f])
                if diff is not None:
                    report["sampler"].setdefault(name, []).append(diff)
    finally:
        for c in prefix_caches:
            c.release()
    return report


def summary(report: dict[str, dict], layers: int, focus_rows: int) -> list[str]:
    """One line per part: the sub-steps where layers first differed, or 'none'."""
    lines = []
    for part, found in report.items():
        of = f"of {layers * focus_rows} layers" if part != "sampler" else f"of {focus_rows} rows"
        if not found:
            lines.append(f"{part}: no difference")
            continue
        counts = Counter({name: len(d) for name, d in found.items()})
        lines.append(
            f"{part}: "
            + "; ".join(
                f"{name} {c} {of} (max |diff| {max(found[name]):.3g})" for name, c in counts.most_common()
            )
        )
    return lines


def kernel_sweep(threads: list[int], max_rows: int = 40) -> list[str]:
    """The two CPU kernels whose bits depended on the batch, before and after their fixes: for each thread count,
    the row counts n at which a row of an n-row fp32 product (raw `F.linear`, and `model.layers.linear`, which
    pads) differs from the same row inside a 256-row product, and the sizes of [n, 64] at which raw `F.gelu`
    (and `gelu_tanh`, which pads) changes some row's bits against one thread."""
    from model.layers import gelu_tanh, linear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(128, 64, generator=g) * 0.05, torch.randn(256, 64, generator=g)
    big = (torch.randn(4000, 64, generator=g) * 3).contiguous()
    before = torch.get_num_threads()
    lines = []
    try:
        torch.set_num_threads(1)
        one = torch.nn.functional.gelu(big, approximate="tanh")
        for t in threads:
            torch.set_num_threads(t)
            out = []
            for name, mm in (("F.linear", torch.nn.functional.linear), ("linear", linear)):
                ref = mm(x, w)
                bad = [n for n in range(1, max_rows + 1) if not torch.equal(mm(x[-n:], w), ref[-n:])]
                out.append(f"{name} rows {bad or 'none'}")
            sizes = range(100, 4000, 41)
            for name, act in (
                ("F.gelu", lambda v: torch.nn.functional.gelu(v, approximate="tanh")),
                ("gelu_tanh", gelu_tanh),
            ):
                with torch.no_grad():
                    bad = sum(not torch.equal(act(big[:n]), one[:n]) for n in sizes)
                out.append(f"{name} {bad}/{len(sizes)} sizes")
            lines.append(f"{t} threads: " + "; ".join(out))
    finally:
        torch.set_num_threads(before)
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny-test", help="model.config preset (random weights)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--rows", type=int, default=16, help="rows in the batch")
    ap.add_argument("--prompt-step", type=int, default=5, help="prompt r has 3 + step x r tokens")
    ap.add_argument("--focus", default="", help="comma-separated focus rows (default: first, middle, last)")
    ap.add_argument(
        "--gemm", default=gemm.DEFAULT_KIND, choices=gemm.KINDS, help="GEMM kernels on a GPU (model/gemm.py)"
    )
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when there is no GPU (tests)")
    ap.add_argument(
        "--cpu-kernels",
        default="",
        metavar="THREADS",
        help="instead: the CPU GEMM and GELU batch-dependence sweep at these thread counts (e.g. 1,2,16)",
    )
    args = ap.parse_args(argv)
    if args.cpu_kernels:
        lines = kernel_sweep([int(t) for t in args.cpu_kernels.split(",")])
        print("\n".join(lines))
        return lines
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("invariance: no CUDA device here (use --allow-cpu to run it on CPU)")
        return []
    dtype = getattr(torch, args.dtype)
    kind = gemm.configure(device, args.gemm)  # what is in effect (a kernel that fails its probe: library)
    model = build_model(args.config, device, dtype)
    rows = prompts(model.config.vocab_size, args.rows, step=args.prompt_step)
    focus = [int(r) for r in args.focus.split(",") if r] or sorted({0, args.rows // 2, args.rows - 1})
    report = locate(model, rows, focus)
    lines = summary(report, model.config.num_layers, len(focus))
    print(f"{args.config} on {device} ({args.dtype}, {kind} GEMMs), {args.rows} rows, focus rows {focus}:")
    for line in lines:
        print(f"  {line}")
    return lines


if __name__ == "__main__":
    main()
