"""Dense building blocks of DiffusionGemma: RMSNorm, RoPE (default and proportional), attention, gated MLP.

Shape legend: B rows, T query tokens, S key tokens, H heads, G kv heads, d head dim, D hidden.

Numerics follow transformers' Gemma-4 / DiffusionGemma modules (norms in fp32, attention scale 1.0 because
q and k are RMS-normed, keys reused as values on full-attention layers) so fp32 logits match the reference
to ~1e-5. Attention itself (one batched pass over rows with different prefix lengths, in encoder and decoder mode) is
in model/attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import gemm
from model.attention import blocked_attention
from model.config import LayerSpec, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self._fp32: tuple[tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.fp32_weight(), self.eps)

    def fp32_weight(self) -> torch.Tensor | None:
        """The scale in fp32 (the norm's arithmetic). A low-precision weight's fp32 copy is kept, not cast on
        every call (one kernel per norm per layer per step otherwise), and remade when the parameter moves or
        changes in place; with gradients on it is cast each time, so the parameter gets its gradient."""
        w = self.weight
        if w is None or w.dtype == torch.float32 or torch.is_grad_enabled():
            return w
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._fp32 is None or self._fp32[0] != key:
            self._fp32 = (key, w.float())
        return self._fp32[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) [* weight] over the last dim, in fp32, cast back to x's dtype.

    One `F.rms_norm` call instead of six ops: on CPU it is the same arithmetic (x * rsqrt(mean(x * x) + eps),
    then * weight; pow(-0.5) is computed as rsqrt) with the same bits, and every dispatched op costs
    microseconds. The casts are skipped (not just no-ops) in fp32."""
    xf = x if x.dtype == torch.float32 else x.float()
    if weight is not None and weight.dtype != torch.float32:
        weight = weight.float()
    out = F.rms_norm(xf, (xf.shape[-1],), weight, eps)
    return out if out.dtype == x.dtype else out.type_as(x)


# CPU GEMM kernels compute the rows of a product in blocks, and a block of 1-3 rows takes another code path that
# rounds differently (measured, fp32: a product of n = 1..3 rows differs from the same rows inside a larger one).
# With several threads the rows are also split between threads in blocks of 8, so a product of 9-11 rows (17-19,
# 25-27 with 16 threads) ends in such a block too, whereas every multiple of 8 matched a 520-row product bit for
# bit at 1-16 threads (bench/README.md, "CPU batch invariance"). On CPU, products are therefore padded to
# a multiple of this many rows, so a token's result never depends on how many other tokens shared its matmul:
# batch-invariant outputs. GPU GEMMs choose algorithms by shape in other ways, so the padding would only cost time
# there and is not applied.
MIN_GEMM_ROWS = 8


def min_gemm_rows(device: torch.device) -> int:
    """The row multiple a GEMM is padded to on this device (1: no padding)."""
    return MIN_GEMM_ROWS if device.type == "cpu" else 1


def gemm_rows(n: int, device: torch.device) -> int:
    """Rows a product of n rows is padded to on `device`: the next multiple of `min_gemm_rows`."""
    m = min_gemm_rows(device)
    return -(-n // m) * m


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T, batch-invariant: on CPU by padding (MIN_GEMM_ROWS), on a GPU in low precision
    by the invariant kernel (model/gemm.py)."""
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    pad = gemm_rows(n, flat.device) - n
    if gemm.invariant(flat):
        out = gemm.linear(flat, weight)
    elif pad > 0:
        out = F.linear(F.pad(flat, (0, 0, 0, pad)), weight)[:n]
    else:
        out = F.linear(flat, weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear without bias whose product is batch-invariant."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Packed:
    """Several Linears of one input, run as one GEMM (q/k/v, gate/up): their weights stacked [sum N, K] in one
    tensor, made on first use, whose slices then *are* the Linears' parameters (one copy in memory, the
    checkpoint names and `state_dict` unchanged, in-place weight updates seen by both). Re-made when a
    parameter no longer lives there (`.to()`, `load_state_dict(assign=True)` or any `.data =` swap)."""

    def __init__(self, *linears: Linear):
        self.linears = linears
        self.sizes = [lin.weight.shape[0] for lin in linears]
        self.weight: torch.Tensor | None = None
        self._ptrs: tuple[int, ...] = ()

    def _live(self) -> bool:
        return self.weight is not None and tuple(lin.weight.data_ptr() for lin in self.linears) == self._ptrs

    def stacked(self) -> torch.Tensor:
        if not self._live():
            # a normal tensor even when first used under inference_mode: it becomes the parameters' storage
            with torch.no_grad(), torch.inference_mode(False):
                weight = torch.cat([lin.weight.detach() for lin in self.linears])
            for lin, part in zip(self.linears, weight.split(self.sizes), strict=True):
                lin.weight.data = part
            self.weight = weight
            self._ptrs = tuple(lin.weight.data_ptr() for lin in self.linears)
        return self.weight

    def trains(self) -> bool:
        """Gradients are on and wanted: the Linears then run one by one, so each parameter gets its own."""
        return torch.is_grad_enabled() and any(lin.weight.requires_grad for lin in self.linears)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> every Linear's output side by side [..., sum N] (one GEMM; no gradients)."""
        return linear(x, self.stacked())

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., K] -> each Linear's output [..., N_i]."""
        if self.trains():
            return [lin(x) for lin in self.linears]
        return list(self.whole(x).split(self.sizes, dim=-1))


# ATen's CPU GELU kernel splits a tensor of more than this many elements between all intra-op threads, each
# taking one contiguous share of ceil(numel / threads) elements (measured: the shares' ends move with the size).
GELU_PARALLEL_ELEMENTS = 6144
# Inside a share the kernel computes whole runs of 2 vectors with vector code and the remainder with scalar code,
# which rounds differently (1 ulp). 64 elements is a whole number of runs on any CPU, fp32 or bf16.
VECTOR_RUN = 64


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation. On CPU (without gradients) the tensor is padded so that each thread's share is a
    whole number of vector runs: where the shares end depends on the tensor's size, i.e. on the batch, and an
    element computed by the scalar remainder code rounds differently from the same element computed alone
    (bench/README.md, "CPU batch invariance")."""
    if x.device.type == "cpu" and not torch.is_grad_enabled():
        padded = _gelu_shares(x.numel(), torch.get_num_threads())
        if padded != x.numel():
            flat = x.new_empty(padded)  # the tail past numel is never read back
            flat[: x.numel()].view(x.shape).copy_(x)
            return F.gelu(flat, approximate="tanh")[: x.numel()].view(x.shape)
    return F.gelu(x, approximate="tanh")


def _gelu_shares(n: int, threads: int) -> int:
    """Elements to run GELU over so that every thread's share of them is a whole number of vector runs."""

    def whole(tasks: int) -> int:
        per_task = -(-n // tasks)
        return tasks * (-(-per_task // VECTOR_RUN) * VECTOR_RUN)

    padded = whole(threads if n > GELU_PARALLEL_ELEMENTS else 1)
    if threads > 1 and padded > GELU_PARALLEL_ELEMENTS:  # padding may itself cross into the parallel case
        padded = whole(threads)
    return padded


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner)
        self.up_proj = Linear(hidden, inner)
        self.down_proj = Linear(inner, hidden)
        self.__dict__["gate_up"] = Packed(
            self.gate_proj, self.up_proj
        )  # not a submodule: no state of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(gelu_tanh(gate) * up)


def rope_inv_freq(spec: LayerSpec) -> torch.Tensor:
    """Inverse frequencies, length d/2. Proportional RoPE rotates only the first fraction; the rest get 0."""
    d = spec.head_dim
    rope = spec.rope
    if rope.rope_type == "default":
        inv = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    else:
        angles = int(rope.partial_rotary_factor * d // 2)
        rotated = 1.0 / (rope.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / d))
        inv = torch.cat([rotated, torch.zeros(d // 2 - angles)])
    return inv / rope.factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, T, d] for absolute positions [B, T]."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTables:
    """The tables one forward pass shares between its layers. RoPE tables, made once per layer kind instead of
    once per layer: every layer of a kind has the same spec, hence the same inverse frequencies. Tables are
    [B, T, 1, d] (broadcast over heads); sin carries the rotate-half sign (-sin on the first half), so applying
    RoPE is x * cos + swap(x) * sin. `masks`: the attention's key-group masks (model/attention.py), which depend
    only on positions and validity, the same in every layer of a pass."""

    def __init__(self, positions: torch.Tensor, dtype: torch.dtype):
        self.positions, self.dtype = positions, dtype
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: dict = {}

    def get(self, spec: LayerSpec, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (spec.head_dim, spec.rope)
        if key not in self.tables:
            cos, sin = rope_cos_sin(inv_freq, self.positions, self.dtype)
            half = sin.shape[-1] // 2
            sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
            self.tables[key] = cos[:, :, None, :], sin[:, :, None, :]
        return self.tables[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] with `RopeTables` cos / signed sin [B, T, 1, d]; rotate-half convention (pairs i and
    i + d/2): x * cos + [-x2, x1] * sin, written as [x2, x1] * [-sin1, sin2] (negation is exact: same bits)."""
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)  # [x2, x1]: one op instead of two slices and a cat
    return x * cos + swapped * signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.num_heads = config.num_heads
        self.query_chunk = config.canvas_length  # queries per attention call (see `attend`)
        d, D = spec.head_dim, config.hidden_size
        self.q_proj = Linear(D, config.num_heads * d)
        self.k_proj = Linear(D, spec.num_kv_heads * d)
        self.v_proj = Linear(D, spec.num_kv_heads * d) if spec.has_v_proj else None
        self.o_proj = Linear(config.num_heads * d, D)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)
        projections = [self.q_proj, self.k_proj] + ([self.v_proj] if self.v_proj is not None else [])
        self.__dict__["qkv"] = Packed(*projections)  # one GEMM for q, k (and v); not a submodule
        self._qk_scale: tuple[tuple, torch.Tensor] | None = None

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: RopeTables | None = None):
        """q [B, H, T, d], and the new tokens' k, v [B, G, T, d] as they are stored in the cache. `rope`: the
        forward pass's shared tables (made here when None).

        Every head at once: the q, k (and v) heads of the one packed GEMM are RMS-normed by one call, q and k then
        scaled by their norms' weights (one [H + G, d] table) and rotated by one RoPE call. Per element these are
        the same operations as norming and rotating q, k and v one by one (each op costs microseconds)."""
        B, T, _ = x.shape
        d, H, G = self.spec.head_dim, self.num_heads, self.spec.num_kv_heads
        rope = rope if rope is not None else RopeTables(positions, x.dtype)
        cos, sin = rope.get(self.spec, self.inv_freq)
        heads = torch.cat(self.qkv(x), dim=-1) if self.qkv.trains() else self.qkv.whole(x)
        heads = heads.view(B, T, -1, d)  # [B, T, H + G (+ G), d]
        # in fp32 up to the norms' scale, then back in the model dtype for RoPE, as RMSNorm does one by one
        normed = F.rms_norm(
            heads if heads.dtype == torch.float32 else heads.float(), (d,), None, self.v_norm.eps
        )
        qk = normed[:, :, : H + G] * self._qk_weight(H, G)
        # full-attention layers use the keys before their norm's scale and RoPE as values (v_norm has no scale)
        v = normed[:, :, H + G :] if self.v_proj is not None else normed[:, :, H:]
        if x.dtype != torch.float32:
            qk, v = qk.to(x.dtype), v.to(x.dtype)
        qk = apply_rope(qk, cos, sin)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)

    def _qk_weight(self, H: int, G: int) -> torch.Tensor:
        """[H + G, d]: q_norm's weight for each query head, k_norm's for each key head (fp32, as RMSNorm scales);
        remade when either parameter changes (or always, with gradients on)."""
        qw, kw = self.q_norm.weight, self.k_norm.weight
        key = (qw.data_ptr(), qw._version, kw.data_ptr(), kw._version, qw.dtype)
        if torch.is_grad_enabled() or self._qk_scale is None or self._qk_scale[0] != key:
            table = torch.cat([qw.expand(H, -1), kw.expand(G, -1)]).float()
            if torch.is_grad_enabled():
                return table
            self._qk_scale = (key, table)
        return self._qk_scale[1]

    def attend(
        self,
        q: torch.Tensor,
        sources: list,
        q_pos: torch.Tensor,
        q_valid: torch.Tensor,
        *,
        causal: bool,
        window: int | None,
        queries_valid: bool = False,
        masks: dict | None = None,
    ) -> torch.Tensor:
        """q [B, H, T, d] over the keys of `sources` ([cached prefix | new tokens], read in that order) -> [B, T, D].

        One batched pass for rows of any prefix and new-token lengths; a row's result is bit-identical alone and
        batched (model/attention.py says why). `queries_valid` (no padding query) and `masks` (the pass's mask
        cache, `RopeTables.masks`) only save work."""
        B, H, T, d = q.shape
        # Queries are independent rows: cutting a long prefill chunk into canvas-sized pieces changes no bit and
        # bounds the transient scores per row by what admission reserves for a canvas.
        step = self.query_chunk
        if T <= step:  # one piece: no slicing
            out = blocked_attention(
                q,
                sources,
                q_pos,
                q_valid,
                causal=causal,
                window=window,
                min_rows=min_gemm_rows(q.device),
                queries_valid=queries_valid,
                masks=masks,
            )
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        outs = [
            blocked_attention(
                q[:, :, a : a + step],
                sources,
                q_pos[:, a : a + step],
                q_valid[:, a : a + step],
                causal=causal,
                window=window,
                min_rows=min_gemm_rows(q.device),
                queries_valid=queries_valid,
                masks=None if masks is None else masks.setdefault(a, {}),  # a piece's masks are its own
            )
            for a in range(0, T, step)
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
