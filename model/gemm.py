"""Every matrix product of a step, and the batch-invariant GEMM kernel used for low-precision operands on GPUs.

Shape legend: M rows (tokens, or (token, choice) pairs of the MoE), K reduction, N output columns, B matrices of
a batched product, E expert groups.

A request's tokens must depend only on the request and its seed, whatever it is batched with. A GEMM library
(cuBLAS, CUTLASS) chooses its kernel by shape: tile sizes, split-K (partial sums over K added at the end),
intra-CTA K slicing. A row's bits then depend on how many rows share its product — the batch. On an H200 in
bf16 that changed the tokens of 1-2 of 16 requests batched together (fp32 and the CPU were invariant;
bench/README.md). vLLM's batch-invariant mode and Thinking Machines' "Defeating Nondeterminism in LLM Inference"
(2025) fix this the same way: one GEMM configuration for every shape.

`_gemm_kernel` (Triton) is that: one fixed tile (BLOCK_M x BLOCK_N, K walked in BLOCK_K steps in order, fp32
accumulator, no split-K), so every output element is the same sequence of operations wherever its row sits and
however many rows, matrices or expert groups the call holds. It serves the dense projections and LM head
(`linear`, `matmul`), the attention's batched products (`bmm`) and the experts' grouped product (`grouped`: the
row groups of a sorted MoE layout, each against its expert's weights, without a host sync or a Python loop over
experts — the tile table is derived inside the kernel from the groups' row ends).

`configure(device, kind)` chooses once per device, before its first step:
- "batch_invariant" (default): low-precision (bf16 / fp16) operands on CUDA go through the kernel. The choice is
  probed first on the device: the kernel must compile, agree with an fp32 product, and give a row the same bits
  alone and inside a larger product; otherwise the device falls back to the library with a warning.
- "library": torch's own kernels (cuBLAS / CUTLASS): possibly faster, not batch-invariant in low precision.

Triton compiles one variant of the kernel per argument pattern it specialises on (integers equal to 1 or
divisible by 16, aligned pointers). Compiled for sm_90 with Triton 3.6 (torch 2.11's) and compared, not run:
only addressing and pipelining differ between variants, never the MMA instructions or their order. A variant
compiles on first use, which for the runner is an eager step: a graph is captured only for a batch whose shapes
an eager step already ran. Operands whose strides are not multiples of 16 bytes lose the pipelined loads
(slower, same bits).

fp32 operands and the CPU always use the library: there the CPU's row padding (model/layers.py MIN_GEMM_ROWS)
and fp32 cuBLAS are invariant (measured). Tests run the kernel on CPU through Triton's interpreter
(TRITON_INTERPRET=1; there a tile's product is an fp32 sum over K in order instead of `tl.dot`, which the
interpreter computes wrongly for bf16 and with a BLAS whose bits depend on a row's place in the tile).
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines need not have it; the library kernels serve
    triton = None
    tl = None

log = logging.getLogger("blockserve.gemm")

KINDS = ("batch_invariant", "library")
DEFAULT_KIND = "batch_invariant"
LOW_PRECISION = (torch.bfloat16, torch.float16)
# The one tile of every invariant GEMM: a row's bits depend on these constants, never on the call's shape.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 64
NUM_WARPS, NUM_STAGES = 4, 3
MAX_GRID_Z = 65_535

# device -> whether low-precision GEMMs there use `_gemm_kernel` (decided by `configure`)
_INVARIANT: dict[torch.device, bool] = {}


def configure(device: torch.device | str, kind: str = DEFAULT_KIND, *, interpret: bool = False) -> str:
    """Choose `device`'s GEMM kernels (see the module docstring); returns the kind in effect there. Call it
    before the device's first step (a step must not switch kernels half-way). `interpret`: run the kernel on a
    CPU device through Triton's interpreter (tests only; TRITON_INTERPRET=1 must be set before this module is
    imported)."""
    device = _key(device)
    if kind not in KINDS:
        raise ValueError(f"gemm kernels {kind!r}: use one of {', '.join(KINDS)}")
    use = kind == "batch_invariant" and (device.type == "cuda" or interpret)
    if use:
        why = _unusable(device, interpret)
        if why:
            log.warning("batch-invariant GEMMs are off on %s (%s): using the library's kernels", device, why)
            use = False
    _INVARIANT[device] = use
    return "batch_invariant" if use else "library"


def active(device: torch.device | str) -> bool:
    """Whether low-precision GEMMs on `device` use the invariant kernel (configuring the default if unset)."""
    device = _key(device)
    if device not in _INVARIANT:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"choose {device}'s GEMM kernels (gemm.configure) before capturing a CUDA graph"
            )
        configure(device)
    return _INVARIANT[device]


def _key(device: torch.device | str) -> torch.device:
    """The device as tensors name it: `cuda` is the current CUDA device, `cuda:N` (so both find one entry)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def invariant(t: torch.Tensor) -> bool:
    """Whether a product of `t` (its left operand) runs the invariant kernel: low precision on such a device."""
    return kernel_for(t.device, t.dtype)


def kernel_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products of `dtype` operands on `device` run the invariant kernel (choosing the device's kernels
    now if that has not happened yet)."""
    if dtype not in LOW_PRECISION:
        return False
    use = _INVARIANT.get(device)
    return active(device) if use is None else use


def _unusable(device: torch.device, interpret: bool) -> str:
    """Why the kernel cannot serve on `device` ("" when it can): missing, failing, or not invariant there."""
    if triton is None:
        return "triton is not installed"
    if interpret and os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 was not set before model.gemm was imported"
    try:
        return _probe(device)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # a compiler or driver failure: the library still serves
        return f"the kernel failed: {type(e).__name__}: {e}"


def _probe(device: torch.device) -> str:
    """Run the kernel in each form and output dtype the model uses, for bf16 and fp16 operands, on small
    products: close to fp32, and a row's bits the same alone and among others (the property the kernel exists
    for, checked on the device itself). Each form and dtype compiles here, at start-up; a new argument pattern
    (module docstring) still compiles on first use."""
    for dtype in LOW_PRECISION:
        why = _probe_dtype(device, dtype)
        if why:
            return f"{str(dtype).removeprefix('torch.')}: {why}"
    return ""


def _probe_dtype(device: torch.device, dtype: torch.dtype) -> str:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def close(got, want):  # the kernel's output dtype, against fp32
        return torch.allclose(got.float(), want.to(got.dtype).float(), atol=5e-2, rtol=2e-2)

    x, w = rand(150, 96), rand(200, 96)
    want = x.float() @ w.float().T
    got = linear(x, w, torch.float32, force=True)
    if not (close(got, want) and close(linear(x, w, force=True), want)):  # fp32 and the operands' dtype out
        return "linear differs from an fp32 product"
    if not torch.equal(linear(x[37:38], w, torch.float32, force=True), got[37:38]):
        return "a row's linear result depends on the rows beside it"
    b = rand(96, 90)
    if not close(matmul(x, b, torch.float32, force=True), x.float() @ b.float()):
        return "matmul differs from an fp32 product"
    a, b = rand(3, 70, 40), rand(3, 40, 90)
    got = bmm(a, b, torch.float32)
    if not close(got, a.float() @ b.float()):
        return "bmm differs from an fp32 product"
    if not torch.equal(bmm(a[1:2, 5:6], b[1:2], torch.float32), got[1:2, 5:6]):
        return "a row's bmm result depends on the matrices and rows beside it"
    experts = rand(4, 48, 96)
    ends = torch.tensor([70, 70, 140, 150], dtype=torch.int32, device=device)  # expert 1 gets no rows
    starts = [0, 70, 70, 140]
    want = torch.cat(
        [x[a:b].float() @ w_e.float().T for a, b, w_e in zip(starts, ends.tolist(), experts, strict=True)]
    )
    got = grouped(x, experts, ends)  # the operands' dtype out, as the experts use it
    if not close(got, want):
        return "grouped differs from one fp32 product per group"
    alone = grouped(x[100:101], experts[2:3], ends[:1] * 0 + 1)
    if not torch.equal(alone, got[100:101]):
        return "a row's grouped result depends on its group's other rows"
    return ""


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None, *, force=False):
    """x [M, K] @ weight [N, K].T -> [M, N] in `out_dtype` (default x's), accumulated in fp32 where invariant."""
    return matmul(x, weight.t(), out_dtype, force=force)  # the kernel reads the transposed view's strides


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None, *, force=False):
    """a [M, K] @ b [K, N] -> [M, N] in `out_dtype` (default a's); b may be a strided view (a weight's .t())."""
    out_dtype = out_dtype or a.dtype
    if not (force or (invariant(a) and b.dtype == a.dtype)):
        out = a @ b
        return out if out.dtype == out_dtype else out.to(out_dtype)
    M, K = a.shape
    N = b.shape[1]
    c = a.new_empty(M, N, dtype=out_dtype)
    _launch(a, b, c, M, N, K, (0, *a.stride()), (0, *b.stride()), (0, *c.stride()))
    return c


def bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a [B, M, K] @ b [B, K, N] -> [B, M, N] through the invariant kernel (either operand may be a stride-0
    expansion). The library path is the caller's (model/attention.py pads it for the CPU)."""
    if a.dtype not in LOW_PRECISION or b.dtype != a.dtype:
        raise TypeError(f"invariant bmm takes two bf16 or two fp16 operands, not {a.dtype} and {b.dtype}")
    Bt, M, K = a.shape
    N = b.shape[2]
    c = a.new_empty(Bt, M, N, dtype=out_dtype or a.dtype)
    for lo in range(0, Bt, MAX_GRID_Z):  # a launch holds at most 65,535 matrices (CUDA's grid z limit)
        hi = min(Bt, lo + MAX_GRID_Z)
        _launch(a[lo:hi], b[lo:hi], c[lo:hi], M, N, K, a.stride(), b.stride(), c.stride(), batch=hi - lo)
    return c


def grouped(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """Rows x [M, K] in E consecutive groups ending at ends [E] (int32 cumulative row ends, on the device) times
    each group's weight [E, N, K].T -> [M, N]; rows past the last group are left undefined (rows past M, if
    the ends say so, are never touched)."""
    M, K = x.shape
    E, N, _ = weight.shape
    c = x.new_empty(M, N, dtype=out_dtype or x.dtype)
    if M and E:
        strides_b = (weight.stride(0), weight.stride(2), weight.stride(1))
        _launch(x, weight, c, M, N, K, (0, *x.stride()), strides_b, (0, *c.stride()), ends=ends)
    return c


def _launch(a, b, c, M, N, K, sa, sb, sc, batch=1, ends=None):
    if M == 0 or N == 0 or batch == 0:
        return
    E = 0 if ends is None else ends.shape[0]
    # grouped: each non-empty group's last tile may be partial, so at most M // BM + min(E, M) tiles
    tiles_m = M // BLOCK_M + min(E, M) if E else -(-M // BLOCK_M)
    grid = (tiles_m, -(-N // BLOCK_N), batch)
    if a.device.type == "cuda" and a.device.index != torch.cuda.current_device():
        with torch.cuda.device(a.device):  # Triton launches on the current device's stream
            return _launch(a, b, c, M, N, K, sa, sb, sc, batch, ends)
    _gemm_kernel[grid](
        a, b, c, c if ends is None else ends, M, N, K, E, *sa, *sb, *sc,
        GROUPED=ends is not None,
        E_BLOCK=max(16, 1 << (E - 1).bit_length()) if E else 16,
        INTERPRETED=a.device.type == "cpu",
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _gemm_kernel(
        a_ptr, b_ptr, c_ptr, ends_ptr, M, N, K, E,
        s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
        GROUPED: tl.constexpr, E_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """C = A @ B for one BM x BN tile. Program (m, n, b): tile m of matrix b, or in GROUPED mode tile m of
        the groups' tiles (each group's rows cut from its own first row, so a tile never spans two groups)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if GROUPED:
            g = tl.arange(0, E_BLOCK)
            end = tl.load(ends_ptr + g, mask=g < E, other=0).to(tl.int32)
            start = tl.load(ends_ptr + g - 1, mask=(g > 0) & (g < E), other=0).to(tl.int32)
            tiles = tl.where(g < E, (end - start + BM - 1) // BM, 0)
            tiles_end = tl.cumsum(tiles, 0)
            group = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)  # groups wholly before this tile
            mine = g == group
            first = tl.sum(tl.where(mine, start + (pid_m - (tiles_end - tiles)) * BM, 0), 0)
            stop = tl.minimum(tl.sum(tl.where(mine, end, 0), 0), M)  # 0 past the last group: all masked
            a_base = a_ptr
            b_base = b_ptr + group.to(tl.int64) * s_bb
            c_base = c_ptr
        else:
            pid_b = tl.program_id(2).to(tl.int64)
            first = pid_m * BM
            stop = M
            a_base = a_ptr + pid_b * s_ab
            b_base = b_ptr + pid_b * s_bb
            c_base = c_ptr + pid_b * s_cb
        if first < stop:
            rows = first + tl.arange(0, BM)
            cols = pid_n * BN + tl.arange(0, BN)
            row_ok = rows < stop
            col_ok = cols < N
            rows64 = rows.to(tl.int64)
            cols64 = cols.to(tl.int64)
            ks = tl.arange(0, BK)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):  # K in order, one fp32 accumulator: no split-K
                kk = k0 + ks
                k_ok = kk < K
                kk = kk.to(tl.int64)
                x = tl.load(
                    a_base + rows64[:, None] * s_am + kk[None, :] * s_ak,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                y = tl.load(
                    b_base + kk[:, None] * s_bk + cols64[None, :] * s_bn,
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if INTERPRETED:
                    # the interpreter's tl.dot multiplies bf16 tiles wrongly, and its BLAS product's bits depend
                    # on a row's place in the tile: products summed over K in order stand in for it
                    acc += tl.sum(x.to(tl.float32)[:, :, None] * y.to(tl.float32)[None, :, :], axis=1)
                else:
                    acc = tl.dot(x, y, acc)
            tl.store(
                c_base + rows64[:, None] * s_cm + cols64[None, :] * s_cn,
                acc.to(c_ptr.dtype.element_ty),
                mask=row_ok[:, None] & col_ok[None, :],
            )
