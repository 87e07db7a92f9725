"""bench/invariance.py on CPU: every part of the step is batch-invariant bit for bit, and the locator finds a
sub-step that is not.

The CPU fixes it checks: GEMMs padded to multiples of 8 rows and GELU shares padded to whole vector runs
(model/layers.py). Before them, at 16 threads the locator found the experts' products of 9-11 rows and GELU's
scalar remainders differing by 1 ulp between a row alone and the same row batched.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load():
    sys.path.insert(0, str(BENCH))  # invariance.py imports gpu_step's model builder
    try:
        spec = importlib.util.spec_from_file_location("invariance", BENCH / "invariance.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["invariance"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture
def threads16(torch_threads):
    torch_threads(16)  # more threads than this machine has cores: the same splits, only slower


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_part_is_batch_invariant_on_cpu(threads16, dtype, capsys):
    lines = _load().main(["--allow-cpu", "--dtype", dtype, "--rows", "16", "--focus", "0,9,15"])
    assert lines == ["encoder: no difference", "decoder: no difference", "sampler: no difference"]
    assert "16 rows, focus rows [0, 9, 15]" in capsys.readouterr().out


def test_a_canvas_that_is_not_a_multiple_of_8_is_batch_invariant_too(threads16):
    """The sampler's vocabulary products have rows x canvas rows; a canvas of 13 positions is no multiple of 8."""
    inv = _load()
    model = inv.build_model("tiny-test", torch.device("cpu"), torch.float32, canvas_length=13)
    report = inv.locate(model, inv.prompts(model.config.vocab_size, 12), [0, 11])
    assert report == {"encoder": {}, "decoder": {}, "sampler": {}}


def test_the_locator_names_the_sub_step_that_depends_on_the_batch(monkeypatch):
    inv = _load()
    model = inv.build_model("tiny-test", torch.device("cpu"), torch.float32)
    bank = model.layers[1].experts
    forward = bank.forward

    def batch_dependent(x, weights, ids):  # adds a term that grows with the number of tokens in the call
        return forward(x, weights, ids) + 1e-6 * x.shape[0]

    monkeypatch.setattr(bank, "forward", batch_dependent)
    rows = inv.prompts(model.config.vocab_size, 4)
    report = inv.locate(model, rows, [1, 3])
    assert set(report["encoder"]) == {"experts"} and len(report["encoder"]["experts"]) == 2
    assert set(report["decoder"]) == {"experts"} and len(report["decoder"]["experts"]) == 2
    assert all(d > 0 for d in report["decoder"]["experts"])
    # the sampler gets the same hidden rows in both runs: only its own batching could change its outputs
    assert report["sampler"] == {}
    lines = inv.summary(report, model.config.num_layers, 2)
    assert lines[0].startswith("encoder: experts 2 of 6 layers")


def test_prompts_differ_in_length():
    rows = _load().prompts(512, 5, base=3, step=4)
    assert [len(r) for r in rows] == [3, 7, 11, 15, 19]


def test_the_cpu_kernel_sweep_finds_no_batch_dependence_in_the_padded_kernels():
    lines = _load().kernel_sweep([16], max_rows=30)
    assert len(lines) == 1 and lines[0].startswith("16 threads: ")
    assert "; linear rows none;" in lines[0] and lines[0].endswith("gelu_tanh 0/96 sizes")
