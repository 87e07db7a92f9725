"""Attention of rows with different key lengths in one batched pass: fixed-size key blocks, online softmax.

Shape legend: B rows, G kv heads, Q query heads per kv head (H = G * Q), T query tokens, M = Q * T query rows of
one kv head, P keys per block (= tokens per KV page), d head dim, S keys of a dense source.

A row's keys come from one or more sources read in order — the cached prefix (pages of the KV pool, or a padded
dense tensor in training) and then the new tokens (a dense [B, G, T, d] tensor). Each source is cut into blocks
of exactly P keys; a row with fewer keys than its batch-mates gets blocks that are partly or fully masked.

Why this is batch-invariant bit for bit (a request's output must not depend on its batch-mates):
- every reduction has a shape fixed by the model, never by the batch: q·k over d, the softmax sum and the
  probabilities-times-values product over the P keys of one block; masked keys contribute exact zeros;
- a row's partial result is carried across blocks in the online-softmax form (running max m, sum l, output acc).
  A block in which the row has no key leaves it unchanged *exactly*: its max is -inf, so m stays, the rescale
  factor is exp(0) = 1, and l + 0, acc + 0 are exact. So the only blocks that change a row's numbers are its own,
  in the same order and with the same shapes whether it runs alone or beside 63 longer rows;
- batched GEMMs (`torch.bmm`) on CPU give each matrix the same bits whatever the batch count and row count,
  once there are at least two matrices and `MIN_GEMM_ROWS` rows (measured; tests/model/test_attention.py pins
  it). Below that CPU kernels switch algorithms, so query rows and the batch are padded up to those sizes.

The masks come from absolute positions: the encoder's causal sliding window (keys in (p - window, p]) and the
decoder's bidirectional view are both a comparison of key and query positions plus each key's validity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Keys per attention block and tokens per KV page (one home for both: a page is read as one block).
BLOCK_TOKENS = 64


@dataclass
class KeyBlock:
    keys: torch.Tensor  # [B, G, P, d]
    values: torch.Tensor  # [B, G, P, d]
    positions: torch.Tensor  # [B, P] absolute positions
    valid: torch.Tensor  # [B, P] bool


class DenseKeys:
    """Keys held as one padded tensor (new tokens, or a training-time prefix), read in blocks of P."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
    ):
        self.keys, self.values = keys, values  # [B, G, S, d]
        self.positions, self.valid = positions, valid  # [B, S]

    def blocks(self) -> Iterator[KeyBlock]:
        S = self.keys.shape[2]
        for a in range(0, S, BLOCK_TOKENS):
            b = min(a + BLOCK_TOKENS, S)
            pad = BLOCK_TOKENS - (b - a)
            k, v = self.keys[:, :, a:b], self.values[:, :, a:b]
            pos, ok = self.positions[:, a:b], self.valid[:, a:b]
            if pad:  # the last block is padded to P with masked zero keys: the block shape never varies
                k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
                pos, ok = F.pad(pos, (0, pad), value=-1), F.pad(ok, (0, pad), value=False)
            yield KeyBlock(k, v, pos, ok)


class PagedKeys:
    """Keys of B rows in pages of a KV pool: block j of row b is page `table[b, j]`, gathered one block at a time."""

    def __init__(
        self,
        keys: torch.Tensor,  # pool [pages, G, P, d]
        values: torch.Tensor,  # pool [pages, G, P, d]
        table: torch.Tensor,  # [B, nb] page ids (masked entries point at any page)
        positions: torch.Tensor,  # [B, nb, P]
        valid: torch.Tensor,  # [B, nb, P] bool
    ):
        self.keys, self.values, self.table = keys, values, table
        self.positions, self.valid = positions, valid

    def blocks(self) -> Iterator[KeyBlock]:
        for j in range(self.table.shape[1]):
            pages = self.table[:, j]
            yield KeyBlock(self.keys[pages], self.values[pages], self.positions[:, j], self.valid[:, j])


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched GEMM whose per-matrix result does not depend on the batch count (see the module docstring)."""
    if a.shape[0] == 1 and a.device.type == "cpu":  # a stride-0 second copy: no input is copied
        return torch.bmm(a.expand(2, *a.shape[1:]), b.expand(2, *b.shape[1:]))[:1]
    return torch.bmm(a, b)


def blocked_attention(
    q: torch.Tensor,
    sources: list,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    min_rows: int = 1,
) -> torch.Tensor:
    """q [B, H, T, d] over the keys of `sources` (DenseKeys / PagedKeys, read in order) -> [B, H, T, d].

    Attention scale is 1 (q and k are RMS-normed). `min_rows` pads the GEMMs' query rows (CPU kernels round
    differently below a few rows). Queries that see no key (padding) get zeros."""
    B, H, T, d = q.shape
    G = sources[0].keys.shape[1]
    Q = H // G
    T_pad = max(T, -(-min_rows // Q))
    if T_pad > T:
        q = F.pad(q, (0, 0, 0, T_pad - T))
        q_pos = F.pad(q_pos, (0, T_pad - T), value=-1)
        q_valid = F.pad(q_valid, (0, T_pad - T), value=False)
    M = Q * T_pad
    qg = q.reshape(B * G, M, d).float()
    m = q.new_full((B * G, M), float("-inf"), dtype=torch.float)  # running max
    l = q.new_zeros(B * G, M, dtype=torch.float)  # noqa: E741  running softmax denominator
    acc = q.new_zeros(B * G, M, d, dtype=torch.float)  # running numerator @ values
    qp = q_pos[:, :, None]  # [B, T, 1]
    inplace = not torch.is_grad_enabled()  # training keeps every intermediate for the backward pass
    for blk in (blk for src in sources for blk in src.blocks()):
        P = blk.keys.shape[2]
        mask = blk.valid[:, None, :] & q_valid[:, :, None]  # [B, T, P]
        if causal:
            kp = blk.positions[:, None, :]
            mask = mask & (kp <= qp)
            if window is not None:
                mask = mask & (kp > qp - window)
        k = blk.keys.reshape(B * G, P, d).float()
        v = blk.values.reshape(B * G, P, d).float()
        s = _bmm(qg, k.transpose(1, 2)).view(B, G, Q, T_pad, P)  # [B, G, Q, T, P]
        hide = ~mask[:, None, None]
        s = (s.masked_fill_(hide, -math.inf) if inplace else s.masked_fill(hide, -math.inf)).view(B * G, M, P)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)  # no key yet: keep exp() from -inf - -inf
        # masked keys: exp(-inf) = 0 exactly
        p = s.sub_(m_safe[..., None]).exp_() if inplace else torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)  # 1 exactly when the block changed nothing, 0 before the first key
        if inplace:  # the same arithmetic, without a second copy of the running state
            l.mul_(alpha).add_(p.sum(-1))
            acc.mul_(alpha[..., None]).add_(_bmm(p, v))
        else:
            l = l * alpha + p.sum(-1)  # noqa: E741
            acc = acc * alpha[..., None] + _bmm(p, v)
        m = m_new
    out = acc / torch.where(l > 0, l, 1.0)[..., None]  # [B*G, M, d]
    return out.view(B, H, T_pad, d)[:, :, :T].to(q.dtype)


def workspace_bytes(
    num_heads: int, kv_heads: int, head_dim: int, query_tokens: int, itemsize: int, cpu: bool
) -> int:
    """Upper bound of the transient bytes `blocked_attention` (no grad) holds per row for one layer: the query
    copies, the gathered K/V block (and fp32 copies), one block's scores and its product with the values, the fp32
    running state, the output copies, and on CPU the extra output `_bmm` makes when a batch holds a single matrix.
    Admission reserves it per row (model/kv_cache.py); bench/kv_memory.py measures the real peak against it."""
    H, G, T, d, P = num_heads, kv_heads, query_tokens, head_dim, BLOCK_TOKENS
    f32 = 0 if itemsize == 4 else 4  # .float() copies only when the model dtype is not fp32
    query = H * T * d * (itemsize + f32)  # the reshaped query and its fp32 copy
    gathered = 2 * G * P * d * (itemsize + f32)
    scores = H * T * P * 4 + 2 * T * P  # scores (updated in place); the mask and its negation
    state = 2 * H * T * d * 4 + 8 * H * T * 4  # acc, the block product; m, l, their updates and alpha
    output = H * T * d * (4 + 2 * itemsize)  # acc / l, then in the model dtype, transposed for o_proj
    single = H * T * (P + d) * 4 if cpu else 0  # the second output of `_bmm` on a single matrix
    return query + gathered + scores + state + output + single
