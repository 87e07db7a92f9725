"""The batch-invariant GEMM kernel (model/gemm.py) against fp32 products, and a row's bits against its batch.

Shape legend: M rows, K reduction, N columns, B matrices, E expert groups.

On this CPU machine the Triton kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
where a tile's product is a plain fp32 sum over K: these tests hold the kernel's indexing (tiles, masks, strides,
batches, the grouped tile table) to the reference, and a row's result to the same bits wherever it sits. On a
GPU, `configure` checks the compiled kernel the same way before using it (`_probe`).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deployments.engine_core import EngineCore
from deployments.scheduler import CanvasEvent, EngineRequest, SchedulerLimits
from model import attention, gemm
from model.config import from_name
from model.sampling.generate import generate
from model.sampling.params import SamplingParams
from model.transformer import DiffusionGemma
from model.weights import init_random

# tests/conftest.py turns the interpreter on where there is no GPU (CI); a GPU machine runs the compiled kernel
# through bench/gpu_step.py and the probe instead
pytestmark = pytest.mark.skipif(
    gemm.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton's interpreter (TRITON_INTERPRET=1 before model.gemm is imported)",
)
BM, BN, BK = gemm.BLOCK_M, gemm.BLOCK_N, gemm.BLOCK_K
TOL = dict(atol=1e-4, rtol=1e-4)  # bf16 operands, fp32 sums in another order


@pytest.fixture
def kernels(monkeypatch):
    """The invariant kernel on for CPU tensors (interpreted) for one test; the device table restored after."""
    monkeypatch.setattr(gemm, "_INVARIANT", {})
    assert gemm.configure("cpu", interpret=True) == "batch_invariant"
    launches = []
    launch = gemm._launch
    monkeypatch.setattr(gemm, "_launch", lambda *a, **k: (launches.append(k.get("ends")), launch(*a, **k))[1])
    return launches


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16()


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (BM, BN, BK), (BM + 1, BN - 3, BK + 5), (150, 200, 96)])
def test_linear_and_matmul_match_fp32_products(kernels, M, N, K):
    x, w = _rand(M, K, seed=M), _rand(N, K, seed=N)
    torch.testing.assert_close(gemm.linear(x, w, torch.float32), x.float() @ w.float().T, **TOL)
    b = _rand(K, N, seed=K)
    torch.testing.assert_close(gemm.matmul(x, b, torch.float32), x.float() @ b.float(), **TOL)
    out = gemm.linear(x, w)  # the operands' dtype by default
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert len(kernels) == 3


def test_bmm_splits_a_batch_over_launches_and_refuses_mixed_dtypes(kernels, monkeypatch):
    monkeypatch.setattr(gemm, "MAX_GRID_Z", 2)  # CUDA's grid holds 65,535 matrices; 5 take 3 launches of <= 2
    a, b = _rand(5, 20, 30, seed=11), _rand(5, 30, 17, seed=12)
    torch.testing.assert_close(gemm.bmm(a, b, torch.float32), a.float() @ b.float(), **TOL)
    assert len(kernels) == 3
    with pytest.raises(TypeError, match="two bf16 or two fp16"):
        gemm.bmm(a, b.float())


def test_bmm_reads_any_strides(kernels):
    a = _rand(5, 70, 40, seed=1)
    keys = _rand(5, 90, 40, seed=2)
    # the attention's operands: keys transposed (a strided view) and a stride-0 expansion of one matrix
    torch.testing.assert_close(
        gemm.bmm(a, keys.transpose(1, 2), torch.float32), a.float() @ keys.float().transpose(1, 2), **TOL
    )
    one = _rand(1, 40, 33, seed=3)
    torch.testing.assert_close(
        gemm.bmm(a, one.expand(5, -1, -1), torch.float32), a.float() @ one.float().expand(5, -1, -1), **TOL
    )


# group row ends: empty groups first, between and last; one row; several tiles; a tile boundary inside a group
ENDS = {
    "ragged": [0, 3, 3, 70, 200, 201, 201],
    "one group": [150],
    "tile edges": [BM, BM, 3 * BM - 1, 3 * BM + 1],
}


@pytest.mark.parametrize("ends", ENDS.values(), ids=ENDS.keys())
def test_grouped_matches_one_product_per_group(kernels, ends):
    M = ends[-1] + 5  # rows past the last group: the layout's spare rows, left undefined
    x, w = _rand(M, 48, seed=4), _rand(len(ends), 40, 48, seed=5)
    got = gemm.grouped(x, w, torch.tensor(ends, dtype=torch.int32), torch.float32)
    start = 0
    for e, end in enumerate(ends):
        torch.testing.assert_close(got[start:end], x[start:end].float() @ w[e].float().T, **TOL)
        start = end
    assert len(kernels) == 1 and kernels[0] is not None  # one launch for every group


def test_a_rows_bits_do_not_depend_on_its_batch(kernels):
    """The property the kernel exists for: alone, or anywhere among others, a row gets the same bits."""
    x, w = _rand(300, 96, seed=6), _rand(200, 96, seed=7)
    batched = gemm.linear(x, w, torch.float32)
    for r in (0, BM - 1, BM, 150, 299):
        assert torch.equal(gemm.linear(x[r : r + 1], w, torch.float32), batched[r : r + 1]), r
        assert torch.equal(gemm.linear(x[r - r % 7 : r + 1], w, torch.float32)[-1], batched[r]), r
    a, b = _rand(6, 100, 64, seed=8), _rand(6, 64, 130, seed=9)
    batched = gemm.bmm(a, b, torch.float32)
    assert torch.equal(gemm.bmm(a[4:5, 77:78], b[4:5], torch.float32), batched[4:5, 77:78])
    # a token's expert row: the same bits in a group of 3 rows or of 200, whatever the other groups hold
    experts = _rand(3, 40, 96, seed=10)
    big = gemm.grouped(x, experts, torch.tensor([50, 250, 300], dtype=torch.int32), torch.float32)
    small = gemm.grouped(x[99:102], experts[1:2], torch.tensor([3], dtype=torch.int32), torch.float32)
    assert torch.equal(small, big[99:102])


def test_library_kind_and_cpu_default_use_torch_kernels(monkeypatch):
    monkeypatch.setattr(gemm, "_INVARIANT", {})
    x = _rand(4, 8)
    assert gemm.configure("cpu") == "library"  # the CPU is invariant by padding (model/layers.py)
    assert not gemm.invariant(x)
    assert gemm.configure("cpu", "library", interpret=True) == "library"
    assert not gemm.invariant(x)
    assert gemm.configure("cpu", interpret=True) == "batch_invariant"
    assert gemm.invariant(x) and not gemm.invariant(x.float())  # fp32 keeps the library everywhere
    with pytest.raises(ValueError, match="batch_invariant, library"):
        gemm.configure("cpu", "fast")


def test_a_kernel_that_fails_its_probe_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(gemm, "_INVARIANT", {})
    monkeypatch.setattr(gemm, "_probe", lambda device: "a row's linear result depends on the rows beside it")
    with caplog.at_level(logging.WARNING, logger="blockserve.gemm"):
        assert gemm.configure("cpu", interpret=True) == "library"
    assert "depends on the rows beside it" in caplog.text
    assert not gemm.invariant(_rand(2, 2))

    def broken(device):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(gemm, "_probe", broken)
    with caplog.at_level(logging.WARNING, logger="blockserve.gemm"):
        assert gemm.configure("cpu", interpret=True) == "library"
    assert "PTX compile failed" in caplog.text


class LowPrecisionProducts(TorchDispatchMode):
    """Records every torch matrix product with a bf16/fp16 operand (the kernel's products never reach torch)."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm", "addbmm", "dot", "mv"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        low = [a for a in args if isinstance(a, torch.Tensor) and a.dtype in gemm.LOW_PRECISION]
        if name in self.PRODUCTS and low:
            self.seen.append(f"{name}{[tuple(a.shape) for a in low]}")
        return func(*args, **(kwargs or {}))


def test_bf16_engine_on_the_kernel_gives_a_request_its_tokens_alone_and_batched(kernels, monkeypatch):
    """Every product of a bf16 step on the kernel — projections, attention (its bf16 GEMMs, as on a GPU), the
    experts' grouped product, the LM head and the soft embedding — and none left to torch's library kernels
    (a product added later without model/gemm.py would break invariance on GPUs silently): a request's tokens
    are the same batched with others as from the plain loop alone."""
    monkeypatch.setattr(attention, "MODEL_DTYPE_GEMM_DEVICES", ("cuda", "cpu"))
    model = init_random(DiffusionGemma(from_name("tiny-test")), seed=5).eval().to(torch.bfloat16)
    reqs = [
        EngineRequest(
            f"r{i}",
            list(range(3 + i, 5 + 6 * i)),
            SamplingParams(
                max_new_tokens=(16, 20, 9)[i % 3], max_denoising_steps=3, entropy_bound=(0.1, 2.0)[i % 2]
            ),
            seed=40 + i,
        )
        for i in range(4)
    ]
    core = EngineCore(model, SchedulerLimits(max_rows=4, prefill_chunk=16, prefill_time_share=1.0))
    events = {r.request_id: [] for r in reqs}
    for r in reqs:
        core.submit(r, events[r.request_id].append)
    with LowPrecisionProducts() as products:
        while core.has_work:
            core.iterate()
    assert core.max_rows_seen == 4
    assert products.seen == []  # every bf16 product went through model/gemm.py
    grouped_calls = sum(ends is not None for ends in kernels)
    assert grouped_calls > 0 and len(kernels) > grouped_calls  # the experts and the dense products ran on it
    for r in reqs:
        got = [t for e in events[r.request_id] if isinstance(e, CanvasEvent) for t in e.token_ids]
        assert got == generate(model, r.prompt_ids, r.params, seed=r.seed).token_ids, r.request_id
