"""Packed projections (model/layers.py `Packed`): one GEMM for q/k/v and gate/up, one copy of the weights.

Shape legend: T tokens, D hidden.

- the Linears' parameters become views of the packed weight (no second copy), the state_dict keeps its names;
- the packed output equals the Linears run one by one, before and after `.to(dtype)`, in-place updates and a
  `.data` swap (the pack is re-made when a parameter moved);
- with gradients on, each parameter still gets its own gradient;
- RoPE through the shared per-forward tables equals the per-layer formula;
- `linear` and `gelu_tanh` give a row the same bits in a batch of any row count, at 1 and 16 threads;
- a bf16 RMSNorm keeps its fp32 scale instead of casting it every call, and follows updates of the parameter.
"""

from __future__ import annotations

import pytest
import torch

from model.config import from_name
from model.layers import GatedMLP, RMSNorm, RopeTables, apply_rope, gelu_tanh, linear, rope_cos_sin
from model.transformer import DiffusionGemma
from model.weights import init_random

CFG = from_name("tiny-test")


def _separate(mlp: GatedMLP, x: torch.Tensor) -> torch.Tensor:
    gate = x @ mlp.gate_proj.weight.T
    up = x @ mlp.up_proj.weight.T
    return torch.nn.functional.gelu(gate, approximate="tanh") * up @ mlp.down_proj.weight.T


@torch.no_grad()
def test_packed_weights_are_the_parameters_and_follow_updates():
    torch.manual_seed(0)
    mlp = GatedMLP(16, 24)
    x = torch.randn(9, 16)
    names = sorted(mlp.state_dict())
    torch.testing.assert_close(mlp(x), _separate(mlp, x))
    packed = mlp.gate_up.weight  # [2 * 24, 16]
    assert packed.shape == (48, 16)
    # one copy: the parameters live inside the packed tensor
    assert mlp.gate_proj.weight.data_ptr() == packed.data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert sorted(mlp.state_dict()) == names
    mlp.up_proj.weight.mul_(3)  # in place (load_model's copy_, init_random): seen by the packed GEMM
    torch.testing.assert_close(mlp(x), _separate(mlp, x))
    mlp.gate_proj.weight.data = torch.randn(24, 16)  # a swap: the pack is re-made
    torch.testing.assert_close(mlp(x), _separate(mlp, x))
    assert mlp.gate_up.weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
    mlp.to(torch.float64)  # .to() gives every parameter its own storage: re-packed in the new dtype
    x64 = x.double()
    torch.testing.assert_close(mlp(x64), _separate(mlp, x64))
    assert mlp.gate_up.weight.dtype == torch.float64


def test_packing_under_inference_mode_leaves_trainable_parameters():
    mlp = GatedMLP(8, 12)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        mlp(x)
    assert not mlp.gate_proj.weight.is_inference()
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(2)  # an in-place update outside inference mode still works
    torch.testing.assert_close(mlp(x), _separate(mlp, x))


def test_with_gradients_each_parameter_gets_its_own():
    torch.manual_seed(1)
    mlp = GatedMLP(8, 12)
    x = torch.randn(5, 8)
    mlp(x).square().sum().backward()
    want = [p.grad.clone() for p in (mlp.gate_proj.weight, mlp.up_proj.weight)]
    mlp.zero_grad()
    ref = _separate(mlp, x).square().sum()
    ref.backward()
    for p, g in zip((mlp.gate_proj.weight, mlp.up_proj.weight), want, strict=True):
        torch.testing.assert_close(p.grad, g)


@torch.no_grad()
def test_shared_rope_tables_equal_the_rotate_half_formula():
    positions = torch.arange(40).view(2, 20) * 3
    model = DiffusionGemma(CFG)
    tables = RopeTables(positions, torch.float32)
    for layer in model.layers:
        attn = layer.self_attn
        x = torch.randn(2, 20, 4, attn.spec.head_dim)
        cos, sin = rope_cos_sin(attn.inv_freq, positions, x.dtype)
        d = x.shape[-1] // 2
        want = x * cos[:, :, None] + torch.cat([-x[..., d:], x[..., :d]], -1) * sin[:, :, None]
        assert torch.equal(apply_rope(x, *tables.get(attn.spec, attn.inv_freq)), want)
    # one table per layer kind, shared by every layer of that kind
    assert len(tables.tables) == len({(s.head_dim, s.rope) for s in CFG.layers}) < CFG.num_layers


@torch.no_grad()
def test_attention_projections_are_packed_into_one_copy():
    model = init_random(DiffusionGemma(CFG), seed=0)
    before = sum(p.numel() for p in model.parameters())
    canvas = torch.randint(0, CFG.vocab_size, (1, CFG.canvas_length))
    model.denoise(canvas, model.prefix([model.new_cache()]))
    assert sum(p.numel() for p in model.parameters()) == before
    for layer in model.layers:
        attn = layer.self_attn
        storages = {p.untyped_storage().data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight)}
        assert storages == {attn.qkv.weight.untyped_storage().data_ptr()}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projecting_every_head_at_once_equals_each_norm_and_rope_alone(dtype):
    """`Attention.project` norms the q, k (and v) heads of the packed GEMM with one call, scales q and k by one
    [H + G, d] weight table and rotates them with one RoPE call: the same bits as q_norm, k_norm, v_norm and
    RoPE applied one by one, on layers with and without a v projection (full layers use the keys as values)."""
    model = init_random(DiffusionGemma(CFG), seed=3).to(dtype)
    positions = torch.arange(30).view(2, 15) + 5
    tables = RopeTables(positions, dtype)
    kinds = {layer.self_attn.v_proj is None for layer in model.layers}
    assert kinds == {True, False}
    for layer in model.layers:
        attn = layer.self_attn
        with torch.no_grad():  # norms with distinct weights, so a swap of q and k scales would show
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 15, CFG.hidden_size).to(dtype)
        q, k, v = attn.project(x, positions, tables)
        assert q.dtype == k.dtype == v.dtype == dtype
        d = attn.spec.head_dim
        cos, sin = tables.get(attn.spec, attn.inv_freq)
        parts = [p.view(2, 15, -1, d) for p in attn.qkv(x)]  # the packed GEMM's q, k (and v)
        q_raw, k_raw = parts[0], parts[1]
        v_raw = parts[2] if attn.v_proj is not None else k_raw
        assert torch.equal(q, apply_rope(attn.q_norm(q_raw), cos, sin).transpose(1, 2))
        assert torch.equal(k, apply_rope(attn.k_norm(k_raw), cos, sin).transpose(1, 2))
        assert torch.equal(v, attn.v_norm(v_raw).transpose(1, 2))
        # the weight table follows an in-place update of a norm's weight
        attn.k_norm.weight.mul_(2)
        want = apply_rope(attn.k_norm(k_raw), cos, sin).transpose(1, 2)
        assert torch.equal(attn.project(x, positions, tables)[1], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 16])
def test_a_rows_product_does_not_depend_on_the_row_count(torch_threads, threads, dtype):
    """CPU GEMMs compute blocks of 1-3 rows another way, and with several threads split rows between threads in
    blocks of 8 (fp32 at 16 threads: products of 9-11, 17-19, 25-27 rows ended in such a block). `linear` pads to
    a multiple of 8 rows, so every row matches its bits inside a 300-row product."""
    torch_threads(threads)
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 64, generator=g) * 0.05).to(dtype)
    x = torch.randn(300, 64, generator=g).to(dtype)
    together = linear(x, w)
    for n in range(1, 41):
        for start in (0, 300 - n):
            assert torch.equal(linear(x[start : start + n], w), together[start : start + n]), (n, start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [2, 3, 6, 16])
def test_a_rows_gelu_does_not_depend_on_the_row_count(torch_threads, threads, dtype):
    """ATen's CPU GELU splits a large tensor between threads at offsets set by its size and computes the end of
    each thread's share with scalar code that rounds differently: at 16 threads ~70 of 100 sizes of [n, 64]
    changed some row's bits. `gelu_tanh` pads the shares to whole vector runs, so every row gets the bits of
    one-thread vector code (the reference: 1 thread, a size with no remainder), whatever the batch."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4000, 64, generator=g) * 3).to(dtype)
    y = (torch.randn(4000, 40, generator=g) * 3).to(dtype)  # rows that are not whole vector runs
    torch_threads(1)
    want_x, want_y = (torch.nn.functional.gelu(t, approximate="tanh") for t in (x, y))
    torch_threads(threads)
    with torch.no_grad():
        for n in [1, 7, 97, *range(500, 4000, 37)]:
            for rows in (slice(0, n), slice(4000 - n, 4000)):
                assert torch.equal(gelu_tanh(x[rows]), want_x[rows]), n
                assert torch.equal(gelu_tanh(y[rows]), want_y[rows]), n
        strided = torch.cat([x, x], dim=1)[:, :64]  # a view, as gate is in gate/up
        assert torch.equal(gelu_tanh(strided), want_x)


def test_a_low_precision_norm_keeps_its_fp32_scale_and_follows_updates():
    norm = RMSNorm(16, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(4, 16).to(torch.bfloat16)
    with torch.no_grad():
        first = norm.fp32_weight()
        assert first.dtype == torch.float32 and torch.equal(first, norm.weight.float())
        assert norm.fp32_weight() is first  # kept: no cast kernel per call
        want = torch.nn.functional.rms_norm(x.float(), (16,), norm.weight.float(), 1e-6).to(torch.bfloat16)
        assert torch.equal(norm(x), want)
        norm.weight.mul_(2)  # an in-place update (a weight load) is seen
        assert torch.equal(norm.fp32_weight(), norm.weight.float()) and norm.fp32_weight() is not first
    norm.to(torch.float32)
    assert norm.fp32_weight() is norm.weight  # fp32: the parameter itself
    norm.to(torch.bfloat16)
    norm(x).float().sum().backward()  # with gradients on, the scale is cast each time and gets its gradient
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
