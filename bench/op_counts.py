"""Dispatched ops per decoder forward, per sampler vocabulary block and per MoE layout, counted on CPU.

Command (from the repo root; seconds):

    .venv/bin/python bench/op_counts.py                     # this checkout
    .venv/bin/python bench/op_counts.py --root ../other     # the model code of another checkout (a before/after)

On a GPU every such op is a kernel launch, and at a few rows the step is bound by launching them (bench/README.md,
`gpu_step.py`), so fewer ops per step is a GPU speed-up that a CPU can count. Counted with a TorchDispatchMode:
every aten op that reaches a kernel, leaving out views and bare allocations (no kernel on a GPU). The model is
the tiny-test preset with random weights in bfloat16, 1 thread:
- one decoder forward (canvas 16, self-conditioning input, a 47-token cached prefix) at 1 and 4 rows, with the
  MoE layout CPUs take for small batches (counting) and the one large batches and GPUs take (sorted);
- one sampler step (`draw_keyed`) per vocabulary block: the difference between vocabularies of 2 and 1 blocks;
- the MoE layout alone (`grouped_layout`, sorted): a bank of every expert and a shard's bank.
CPU counts include some ops a GPU does not run (CPU RMSNorm is decomposed; GELU pads on CPU only), so compare
counts of two checkouts with each other, not with a GPU profile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that make views or bare allocations: no kernel on a GPU
NOT_KERNELS = {
    "view", "_unsafe_view", "reshape", "expand", "slice", "select", "transpose", "t", "unsqueeze", "squeeze",
    "as_strided", "permute", "split", "chunk", "unbind", "alias", "detach", "split_with_sizes", "_reshape_alias",
    "lift_fresh", "scalar_tensor", "empty", "empty_like", "new_empty", "empty_strided",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in NOT_KERNELS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def counted(fn) -> int:
    fn()  # once first: lazily made caches are not counted
    counter = OpCounter()
    with counter:
        fn()
    return counter.ops


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="checkout to count")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(args.root).resolve()))  # `_count` imports the model code from there
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = _count()
    finally:
        torch.set_num_threads(threads)  # the process as it was (tests share it)
    for name, n in out.items():
        print(f"{n:>6}  {name}")
    return out


def _count() -> dict[str, int]:
    from model import moe
    from model.config import from_name
    from model.sampling.sampler import VOCAB_CHUNK, draw_keyed
    from model.transformer import DiffusionGemma, TokenBatch
    from model.weights import init_random

    def model_of(**overrides):
        return (
            init_random(DiffusionGemma(from_name("tiny-test", **overrides)), seed=0).to(torch.bfloat16).eval()
        )

    out: dict[str, int] = {}
    model = model_of()
    L, D = model.config.canvas_length, model.config.hidden_size
    with torch.inference_mode():
        for layout, elements in (("counting", moe.COUNTING_LAYOUT_ELEMENTS), ("sorted", 0)):
            saved, moe.COUNTING_LAYOUT_ELEMENTS = moe.COUNTING_LAYOUT_ELEMENTS, elements
            try:
                for rows in (1, 4):
                    caches = [model.new_cache(47 + L) for _ in range(rows)]
                    model.encode(TokenBatch.from_lists([list(range(3, 50))] * rows, [0] * rows, 0), caches)
                    canvas = torch.randint(3, model.config.vocab_size, (rows, L))
                    soft = torch.randn(rows, L, D).to(torch.bfloat16)
                    prefix = model.prefix(caches)
                    out[f"decoder forward, {layout} layout, {rows} row(s)"] = counted(
                        lambda c=canvas, p=prefix, s=soft: model.denoise(c, p, s)
                    )
                    for c in caches:
                        c.release()
            finally:
                moe.COUNTING_LAYOUT_ELEMENTS = saved
        per_vocab = {}
        for blocks in (1, 2):
            m = model_of(vocab_size=VOCAB_CHUNK * blocks)
            hidden = torch.randn(2, L, D).to(torch.bfloat16)
            rows = (torch.ones(2), torch.arange(2), torch.zeros(2, dtype=torch.long), torch.full((2,), 3))
            per_vocab[blocks] = counted(lambda m=m, h=hidden, r=rows: draw_keyed(m, h, *r, None))
        out["sampler step, per vocabulary block"] = per_vocab[2] - per_vocab[1]
        ids = torch.stack(
            [torch.randperm(128, generator=torch.Generator().manual_seed(t))[:8] for t in range(256)]
        )
        saved, moe.COUNTING_LAYOUT_ELEMENTS = moe.COUNTING_LAYOUT_ELEMENTS, 0
        try:
            out["MoE sorted layout, every expert"] = counted(lambda: moe.grouped_layout(ids, 0, 128, 1, True))
            out["MoE sorted layout, a shard's bank"] = counted(
                lambda: moe.grouped_layout(ids, 3, 60, 1, False)
            )
        finally:
            moe.COUNTING_LAYOUT_ELEMENTS = saved
    return out


if __name__ == "__main__":
    main()
